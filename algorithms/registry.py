"""Registry of PTQ algorithms: `@register("qdrop")` on a class, `get_algorithm(name)` to look one up.

An algorithm class holds a `Config` dataclass (its own hyper-parameters, with the reference defaults and checks)
and a `run(context)` method returning the quantized model. Registration happens when the plugin's module is
imported: `ptqkit.algorithms` imports every shipped plugin once, explicitly; a config's `custom_imports` imports
the user's own; and an installed package can advertise its module under the entry-point group `ptqkit.plugins`
(`[options.entry_points] ptqkit.plugins = my_methods = my_package.methods`), loaded the first time a name is not
found.
"""
from __future__ import annotations

import logging
from importlib import metadata

from ptqkit.errors import ConfigError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "ptqkit.plugins"
_entry_points_loaded = False


def load_entry_points(force: bool = False) -> list[str]:
    """Import the modules installed packages advertise under `ptqkit.plugins` (once). A plugin that fails to import
    is named in one warning line and skipped: another package's fault must not stop a run that does not use it."""
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return []
    _entry_points_loaded = True
    loaded = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
            loaded.append(ep.name)
        except Exception as exc:  # noqa: BLE001  (any import failure of a third-party plugin)
            log.warning("plugin %s (%s) did not import: %s: %s", ep.name, ep.value, type(exc).__name__,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return loaded

_ALGORITHMS: dict[str, type] = {}


def register(name: str):
    def decorator(cls):
        if name in _ALGORITHMS:
            holder = _ALGORITHMS[name]
            raise KeyError(f"algorithm '{name}' is already registered by {holder.__module__}.{holder.__qualname__}")
        cls.name = name
        _ALGORITHMS[name] = cls
        return cls
    return decorator


def registered_algorithms() -> list[str]:
    return sorted(_ALGORITHMS)


def get_algorithm(name) -> type:
    if name not in _ALGORITHMS:
        load_entry_points()
    if name not in _ALGORITHMS:
        raise ConfigError("algorithm.name", "a registered algorithm (one of: " + ", ".join(registered_algorithms())
                          + ")", name)
    return _ALGORITHMS[name]


def multi_process_algorithms() -> list[str]:
    """The registered algorithms that may run under torchrun (a composition only when all its parts do)."""
    return [n for n in registered_algorithms() if _ALGORITHMS[n].multi_process]


# ------------------------------------------------------------------------------- loss terms for `compose`
_TERMS: dict[str, type] = {}


def register_term(name: str):
    """Register a loss term (a `Reconstruction` part whose hooks add to the loss) under `name`, for a composition's
    `terms: {name: {its keyword arguments}}`."""
    def decorator(cls):
        if name in _TERMS:
            holder = _TERMS[name]
            raise KeyError(f"loss term '{name}' is already registered by {holder.__module__}.{holder.__qualname__}")
        _TERMS[name] = cls
        return cls
    return decorator


def registered_terms() -> list[str]:
    return sorted(_TERMS)


def get_term(name: str) -> type:
    if name not in _TERMS:
        load_entry_points()
    if name not in _TERMS:
        raise ConfigError(f"algorithm.terms.{name}", "a registered loss term (one of: "
                          + (", ".join(registered_terms()) or "none yet: register one with "
                             "ptqkit.algorithms.registry.register_term") + ")", show_actual=False)
    return _TERMS[name]
