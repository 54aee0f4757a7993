"""Small FX helpers: run a unit on its own, run the network up to some nodes, run the rest after a node.

The GraphModules built here share their submodules (and so their weights and quantizers) with the prepared
model: learning a unit's rounding through its own module changes the prepared model.
"""
from __future__ import annotations

import torch.fx as fx


def _ancestors(targets: list[fx.Node], stop: fx.Node | None = None) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(targets)
    while stack:
        node = stack.pop()
        if node in seen or node is stop:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def _build(gm: fx.GraphModule, nodes: set[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
           single_output: bool) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"unit_input_{i}" if node.op != "placeholder" else node.name)
    for node in gm.graph.nodes:
        if node in nodes and node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[outputs[0]] if single_output else tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, graph)


def unit_module(gm: fx.GraphModule, unit) -> fx.GraphModule:
    """`unit.input` -> `unit.output`."""
    return _build(gm, set(unit.nodes), [unit.input], [unit.output], True)


def prefix_module(gm: fx.GraphModule, outputs: list[fx.Node]) -> fx.GraphModule:
    """Network input -> the values of `outputs` (a tuple), computing nothing else."""
    nodes = _ancestors(outputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and n in nodes]
    return _build(gm, nodes, placeholders, outputs, False)


def suffix_module(gm: fx.GraphModule, start: fx.Node) -> fx.GraphModule:
    """The value of `start` -> the network output. `start` must be a cut point (nothing after it needs
    anything computed before it)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    final = output.args[0]
    nodes = _ancestors([final], stop=start)
    leaks = [n for n in nodes if n.op == "placeholder"]
    if leaks:
        raise ValueError(f"the rest of the network after {start.name} needs the network input again")
    return _build(gm, nodes, [start], [final], True)
