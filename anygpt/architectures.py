"""The public architecture configs of the real components, kept as data, not weights.

Each file ``anygpt/presets/architectures/<name>.json`` describes one released model (Vicuna-7B,
Stable Diffusion v1.5, AudioLDM-L-full, zeroscope v2 576w) as the configs of its parts, keyed
like the folders of its hub repository (``unet``, ``vae``, ``text_encoder``, ...). Every part
names its library and class and says where its values come from (``source``). ImageBind-huge
is not here: its sizes are :data:`anygpt.encoders.IMAGEBIND_HUGE_ARCH`.

With these, a real-size model can be built with random weights and without any download: to
count its parameters (on the meta device) or to time it. A decoder config builds one with
``arch: {architecture: <name>}``.

Example::

    from anygpt.architectures import build_component, component_spec

    unet = build_component(component_spec("stable-diffusion-v1-5", "unet"), seed=0)
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
from collections.abc import Mapping
from typing import Any

from anygpt.config import PRESET_DIR
from anygpt.errors import ConfigError, UnknownNameError
from anygpt.seeding import seeded

__all__ = ["ARCHITECTURE_DIR", "list_architectures", "load_architecture", "architecture_for",
           "component_spec", "model_config", "build_component"]

#: The folder of the architecture files; the package's own, whatever the current directory.
ARCHITECTURE_DIR = PRESET_DIR / "architectures"

_LIBRARIES = ("diffusers", "transformers")


def list_architectures() -> list[str]:
    """Names of the architecture files shipped in :data:`ARCHITECTURE_DIR`."""
    return sorted(path.stem for path in ARCHITECTURE_DIR.glob("*.json"))


@functools.cache
def _read(name: str) -> dict[str, Any]:
    return json.loads((ARCHITECTURE_DIR / f"{name}.json").read_text())


def load_architecture(name: str) -> dict[str, Any]:
    """The architecture ``name``: ``{"name", "description", "hub_id", "components": {...}}``.

    The result is a copy: changing it changes nothing for the next caller.

    Raises:
        UnknownNameError: no such file (the message lists the shipped ones).
    """
    if "/" in name or name not in list_architectures():
        raise UnknownNameError("architecture", name, list_architectures(),
                               hint=f"Architecture files live in {ARCHITECTURE_DIR}")
    return copy.deepcopy(_read(name))


def architecture_for(hub_id: str) -> str:
    """The name of the architecture file of the model released as ``hub_id``.

    Raises:
        UnknownNameError: no architecture file names that hub id.
    """
    for name in list_architectures():
        if _read(name).get("hub_id") == hub_id:
            return name
    hub_ids = [_read(name).get("hub_id", "") for name in list_architectures()]
    raise UnknownNameError("hub id with an architecture file", hub_id, hub_ids)


def component_spec(name: str, component: str) -> dict[str, Any]:
    """One part of an architecture: ``{"library", "class", "config", "source", ...}``.

    Raises:
        UnknownNameError: the architecture or its part is unknown.
    """
    components = load_architecture(name)["components"]
    if component not in components:
        raise UnknownNameError(f"component of {name}", component, list(components))
    return components[component]


def _attribute(spec: Mapping[str, Any], key: str, library: str) -> Any:
    """The class named by ``spec[key]`` in ``spec["module"]`` (default: the library itself)."""
    module = spec.get("module", library) if key == "class" else library
    if module.split(".")[0] != library:
        raise ConfigError(f"architecture component {spec.get('class')!r}: module {module!r} is not part of "
                          f"{library}")
    try:
        return getattr(importlib.import_module(module), spec[key])
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"architecture component: {library} has no {spec[key]!r} ({exc})") from exc


def _library(spec: Mapping[str, Any]) -> str:
    library = spec.get("library")
    if library not in _LIBRARIES:
        raise ConfigError(f"architecture component {spec.get('class')!r}: library must be one of "
                          f"{', '.join(_LIBRARIES)}, got {library!r}")
    return library


def model_config(spec: Mapping[str, Any]) -> Any:
    """The ``transformers`` config object of a part that names a ``config_class`` (e.g. a
    ``CLIPTextConfig``); ``CLIPConfig`` and other configs with sub-configs take them as dicts."""
    if "config_class" not in spec:
        raise ConfigError(f"architecture component {spec.get('class')!r} has no config_class")
    return _attribute(spec, "config_class", "transformers")(**spec["config"])


def build_component(spec: Mapping[str, Any], seed: int = 0) -> Any:
    """Build one part with random weights seeded by ``seed`` (the caller's random state is kept).

    A part with a ``config_class`` is ``cls(config_class(**config))`` (transformers models, and
    diffusers' safety checker); any other diffusers part is ``cls.from_config(config)`` (models
    and schedulers). Under ``torch.device("meta")`` or ``accelerate.init_empty_weights`` the
    weights take no memory, which is how parameters are counted.

    Raises:
        ConfigError: the library or class is unknown, or the config does not fit the class.
    """
    library = _library(spec)
    cls = _attribute(spec, "class", library)
    try:
        with seeded(seed):
            if "config_class" in spec:
                return cls(model_config(spec))
            return cls.from_config(dict(spec["config"]))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"architecture component {spec['class']!r} cannot be built from its config: {exc}") from exc
