#!/usr/bin/env python
"""Print the config reference (every key, its type, default and meaning) as Markdown, from the schema itself.

    python -m tools.config_reference            # common sections and every registered algorithm
"""
from __future__ import annotations

from ptqkit.config import DataConfig, ModelConfig, QuantConfig, RuntimeConfig
from ptqkit.schema import describe


def _table(rows) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in rows:
        lines.append(f"| `{key}` | {tp} | `{default!r}` | {doc} |".replace("\n", " "))
    return "\n".join(lines)


def reference() -> str:
    from algorithms.registry import get_algorithm, registered_algorithms
    parts = []
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("quant", QuantConfig),
                         ("runtime", RuntimeConfig)):
        parts.append(f"### `{section}`\n\n{_table(describe(cls, section))}\n")
    for name in registered_algorithms():
        cls = get_algorithm(name).Config
        rows = [r for r in describe(cls, "algorithm") if r[0] != "algorithm.name"]
        parts.append(f"### `algorithm.name: {name}`\n\n{_table(rows) if rows else '(no parameters)'}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference())
