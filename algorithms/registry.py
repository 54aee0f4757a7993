"""Registry of PTQ algorithms: `@register("qdrop")` on a class, `get_algorithm(name)` to look one up.

An algorithm class holds a `Config` dataclass (its own hyper-parameters, with the reference defaults and checks)
and a `run(context)` method returning the quantized model. Registration happens when the plugin's module is
imported: `ptqkit.algorithms` imports every shipped plugin once, explicitly; a config's `custom_imports` imports
the user's own.
"""
from __future__ import annotations

from ptqkit.errors import ConfigError

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
        raise ConfigError("algorithm.name", "a registered algorithm (one of: " + ", ".join(registered_algorithms())
                          + ")", name)
    return _ALGORITHMS[name]


def multi_process_algorithms() -> list[str]:
    """The registered algorithms that run under torchrun."""
    return [n for n in registered_algorithms() if _ALGORITHMS[n].multi_process]
