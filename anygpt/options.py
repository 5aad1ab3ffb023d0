"""Settings declared once: each is a dataclass field carrying its help, range and UI hints.

A config dataclass declares a setting with :func:`option`; everything else is derived from that
one declaration: the config's validation, the pipeline's check of per-call keyword arguments, the
command line's flags and the chat app's controls::

    @dataclass
    class DecodeOptions:
        steps: int = option(50, "denoising steps", minimum=1, ui=(0, 100, 1))

:func:`options_of` lists a dataclass's options; :func:`check_value` validates one value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from anygpt.errors import ConfigError

__all__ = ["Option", "option", "options_of", "check_value", "validate_options"]

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
        above: an exclusive lower bound (``temperature > 0``).
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
    ui: tuple[float, float, float] | None = None
    flag: str | None = None
    false_flag: str | None = None
    nullable: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def describe_range(self) -> str:
        parts = []
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.minimum is not None:
            parts.append(f">= {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        return " and ".join(parts)


def option(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, ui: tuple[float, float, float] | None = None,
           flag: str | None = None, false_flag: str | None = None) -> Any:
    """A dataclass field that declares a setting (see :class:`Option` for the arguments)."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "above": above, "ui": ui,
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
        value = float(value)
    if opt.type in (int, float) and (isinstance(value, bool) or not isinstance(value, opt.type)):
        raise ConfigError(f"{path}: expected {'an integer' if opt.type is int else 'a number'}, got {value!r}")
    if opt.type in (bool, str) and not isinstance(value, opt.type):
        raise ConfigError(f"{path}: expected {'true or false' if opt.type is bool else 'a string'}, got {value!r}")
    out_of_range = ((opt.minimum is not None and value < opt.minimum)
                    or (opt.maximum is not None and value > opt.maximum)
                    or (opt.above is not None and value <= opt.above))
    if out_of_range:
        raise ConfigError(f"{path}: must be {opt.describe_range()}, got {value!r}")
    return value


def validate_options(obj: Any, path: str) -> None:
    """Check every declared option of a dataclass instance."""
    for opt in options_of(type(obj)):
        check_value(opt, getattr(obj, opt.name), f"{path}.{opt.name}")

