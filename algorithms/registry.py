"""Registry of PTQ algorithms: `@register("qdrop")` on a class, `get_algorithm(name)` to look one up.

An algorithm class holds a `Config` dataclass (its own hyper-parameters, with the reference defaults and checks)
and a `run(context)` method returning the quantized model. Registration happens when `algorithms` is imported:
`algorithms/__init__.py` imports every plugin module once, explicitly.
"""
from __future__ import annotations

from ptqkit.errors import ConfigError

_ALGORITHMS: dict[str, type] = {}


def register(name: str):
    def decorator(cls):
        if name in _ALGORITHMS:
            holder = _ALGORITHMS[name]
            raise KeyError(f"algorithm '{name}' is already registered by {holder.__module__}.{holder.__qualname__}")
        if not hasattr(cls, "Config"):
            raise TypeError(f"algorithm '{name}' ({cls.__qualname__}) has no Config dataclass")
        cls.name = name
        _ALGORITHMS[name] = cls
        return cls
    return decorator


def registered_algorithms() -> list[str]:
    import algorithms  # noqa: F401  (fills the registry)
    return sorted(_ALGORITHMS)


def get_algorithm(name) -> type:
    names = registered_algorithms()
    if name not in _ALGORITHMS:
        raise ConfigError("algorithm.name", "a registered algorithm (one of: " + ", ".join(names) + ")", name)
    return _ALGORITHMS[name]
