"""Settings declared once: each is a dataclass field carrying its help, range and UI hints.

A config dataclass declares a setting with :func:`option`; everything else is derived from that
one declaration: the config's validation, the pipeline's check of per-call keyword arguments, the
command line's flags and the chat app's controls::

    @dataclass
    class DecodeOptions:
        steps: int = option(50, "denoising steps", minimum=1, maximum=1000, ui=(0, 100, 1))

:func:`options_of` lists a dataclass's options; :func:`check_value` validates one value and
:func:`check_options` a set of per-call values (each value, then the options that must be given
together). Every error is a :class:`~anygpt.errors.ConfigError` naming the setting, the bad value
and the valid range.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from anygpt.errors import ConfigError

__all__ = ["Option", "option", "options_of", "check_value", "check_options", "validate_options"]

_KEY = "anygpt.option"


@dataclass(frozen=True)
class Option:
    """One declared setting.

    Attributes:
        name: the field (and keyword argument) name.
        type: ``int``, ``float``, ``bool`` or ``str``.
        default: the field's default.
        help: one line for ``--help`` and the app's label.
        minimum, maximum: inclusive bounds (None: unbounded).
        above: an exclusive lower bound (``top_p > 0``).
        multiple_of: the value must be a multiple of this (``height``: 8).
        finite: a float option refuses ``nan`` and ``±inf`` (default True).
        together: the name of an option that a call's settings must give whenever they give this
            one (``height`` and ``width``): one without the other is an error of
            :func:`check_options`. (A decoder's config may set one alone: the other is then the
            model's native size.)
        ui: ``(low, high, step)`` of the app's slider; None: no slider.
        flag: the command-line flag (default ``--name-with-dashes``).
        false_flag: for booleans, a flag that sets the option to False (``--greedy``).
        nullable: whether None is a valid value (the field is ``Optional``).
    """

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    multiple_of: int | None = None
    finite: bool = True
    together: str | None = None
    ui: tuple[float, float, float] | None = None
    flag: str | None = None
    false_flag: str | None = None
    nullable: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def describe_range(self) -> str:
        """The valid values in words: ``"> 0 and <= 1"``, ``">= 8 and <= 2048, a multiple of 8"``."""
        parts = []
        if self.above is not None:
            parts.append(f"> {_number(self.above)}")
        if self.minimum is not None:
            parts.append(f">= {_number(self.minimum)}")
        if self.maximum is not None:
            parts.append(f"<= {_number(self.maximum)}")
        text = " and ".join(parts)
        if self.multiple_of is not None:
            text += (", " if text else "") + f"a multiple of {self.multiple_of}"
        return text


def _number(x: float) -> str:
    """A bound as written: integers exactly (``9223372036854775807``), other numbers with ``:g``."""
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:g}"


def option(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, multiple_of: int | None = None, finite: bool = True,
           together: str | None = None, ui: tuple[float, float, float] | None = None,
           flag: str | None = None, false_flag: str | None = None) -> Any:
    """A dataclass field that declares a setting (see :class:`Option` for the arguments)."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "above": above,
            "multiple_of": multiple_of, "finite": finite, "together": together, "ui": ui,
            "flag": flag, "false_flag": false_flag}
    return dataclasses.field(default=default, metadata={_KEY: meta})


def _base_type(hint: Any) -> tuple[type, bool]:
    """``Optional[int]`` → ``(int, True)``; ``float`` → ``(float, False)``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def options_of(cls: type) -> tuple[Option, ...]:
    """The options a dataclass declares (fields made with :func:`option`), in field order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_KEY)
        if meta is None:
            continue
        kind, nullable = _base_type(hints[f.name])
        found.append(Option(name=f.name, type=kind, default=f.default, nullable=nullable, **meta))
    return tuple(found)


def check_value(opt: Option, value: Any, path: str) -> Any:
    """``value`` validated for ``opt`` (an int is accepted for a float option and converted).

    Raises:
        ConfigError: ``"{path}: …"`` saying what was expected.
    """
    if value is None:
        if opt.nullable:
            return None
        raise ConfigError(f"{path}: must be set (a {opt.type.__name__})")
    if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"{path}: must be a finite number {opt.describe_range()}, got {value!r}") from None
    if opt.type in (int, float) and (isinstance(value, bool) or not isinstance(value, opt.type)):
        raise ConfigError(f"{path}: expected {'an integer' if opt.type is int else 'a number'}, got {value!r}")
    if opt.type in (bool, str) and not isinstance(value, opt.type):
        raise ConfigError(f"{path}: expected {'true or false' if opt.type is bool else 'a string'}, got {value!r}")
    if opt.type is float and opt.finite and not math.isfinite(value):
        bounds = opt.describe_range()
        raise ConfigError(f"{path}: must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")
    out_of_range = ((opt.minimum is not None and value < opt.minimum)
                    or (opt.maximum is not None and value > opt.maximum)
                    or (opt.above is not None and value <= opt.above)
                    or (opt.multiple_of is not None and value % opt.multiple_of != 0))
    if out_of_range:
        raise ConfigError(f"{path}: must be {opt.describe_range()}, got {value!r}")
    return value


def _check_together(options: Sequence[Option], values: Mapping[str, Any], prefix: str) -> None:
    """Each set option whose ``together`` partner is unset is an error."""
    for opt in options:
        if opt.together is not None and values.get(opt.name) is not None and values.get(opt.together) is None:
            raise ConfigError(f"{prefix}{opt.name}: must be given together with {opt.together} "
                              f"(got {opt.name}={values[opt.name]!r} and no {opt.together})")


def check_options(options: Sequence[Option], values: Mapping[str, Any], path: str = "settings") -> dict[str, Any]:
    """Per-call ``values`` (name → value; None: unset) validated against ``options``.

    Each set value is checked with :func:`check_value` (errors read ``"{path}.{name}: …"``), then
    the ``together`` rules. Names that are not in ``options`` are ignored (the caller reports
    unknown names). Returns the set values, converted (ints given for floats become floats).

    Raises:
        ConfigError: a value of the wrong type or out of range, or one of a pair given alone.
    """
    prefix = f"{path}." if path else ""
    by_name = {opt.name: opt for opt in options}
    checked = {name: check_value(by_name[name], value, f"{prefix}{name}")
               for name, value in values.items() if name in by_name and value is not None}
    _check_together(options, checked, prefix)
    return checked


def validate_options(obj: Any, path: str) -> None:
    """Check every declared option of a dataclass instance (each value; ``together`` is a rule
    of a call's settings, see :func:`check_options`), and store each as checked: an integer
    given for a float option becomes a float, as the libraries it reaches require."""
    for opt in options_of(type(obj)):
        value = check_value(opt, getattr(obj, opt.name), f"{path}.{opt.name}")
        if value is not getattr(obj, opt.name):
            object.__setattr__(obj, opt.name, value)

