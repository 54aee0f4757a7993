#!/usr/bin/env python
"""Print the config reference (every key, its type, default and meaning) as Markdown, from the schema itself.

    python -m ptqkit.tools.config_reference            # common sections and every registered algorithm
    python -m ptqkit.tools.config_reference --write    # the same into docs/CONFIG.md (a test checks it is current)
"""
from __future__ import annotations

from ptqkit.algorithms.registry import get_algorithm, registered_algorithms
from ptqkit.config import DataConfig, ModelConfig, QuantConfig, RuntimeConfig
from ptqkit.schema import describe


def _table(rows) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in rows:
        lines.append(f"| `{key}` | {tp} | `{default!r}` | {doc} |".replace("\n", " "))
    return "\n".join(lines)


def reference() -> str:
    parts = []
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("quant", QuantConfig),
                         ("runtime", RuntimeConfig)):
        parts.append(f"### `{section}`\n\n{_table(describe(cls, section))}\n")
    for name in registered_algorithms():
        cls = get_algorithm(name).Config
        rows = [r for r in describe(cls, "algorithm") if r[0] != "algorithm.name"]
        parts.append(f"### `algorithm.name: {name}`\n\n{_table(rows) if rows else '(no parameters)'}\n")
    return "\n".join(parts)


HEADER = ("# Config reference\n\nGenerated from the schema by `python -m ptqkit.tools.config_reference --write`; every "
          "key is validated before a run starts.\n\n")


def document() -> str:
    return HEADER + reference()


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--write"]:
        with open("docs/CONFIG.md", "w") as f:
            f.write(document())
    else:
        print(reference())
