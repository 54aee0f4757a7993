"""Partition of a prepared (MQBench) FX GraphModule into reconstruction units: layers, blocks, stages, groups.

A unit is a single-input, single-output piece of the graph: `input` is the node whose value enters it (a
quantized activation, or the network input), `output` the node it produces (its output activation quantizer, or
the network output). Its nodes are every ancestor of `output` back to `input`; a piece that would need any other
value from outside is not a unit.

Block units come from cut points: a node is a cut point when, at its position in topological order, it is the
only value still needed later — every path from the input to the output passes through it. Between consecutive
activation-quantizer cut points lies an "atomic segment"; residual connections therefore always fall inside one
segment. Segments are then grouped:
- `block`: segments whose weight layers belong to the same block module of a known architecture (ResNet
  BasicBlock/Bottleneck, the CIFAR option-A block, MobileNetV2 InvertedResidual, MNasNet inverted residual,
  RegNetX bottleneck); for unknown models, MQBench's automatic rule: residual-free chains of up to 3 single-layer
  segments are stacked.
- `stage`: consecutive block units at one spatial resolution (a unit that changes the resolution starts a stage).
- `layer`: one unit per conv/linear, from its input to its BN/ReLU/output quantizer (AdaRound).
Segments without weights (e.g. the input quantizer) join the next unit.
"""
from __future__ import annotations

import collections

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
import torch.nn as nn
import torchvision.models.mnasnet as tv_mnasnet
import torchvision.models.mobilenetv2 as tv_mbv2
import torchvision.models.regnet as tv_regnet
import torchvision.models.resnet as tv_resnet

from ptqkit.quant.prepare import ACT_BOUNDARY
from ptqkit.quant.quantizers import ActQuantizer, WeightQuantizer, fp_mode
from ptqkit.models import cifar_resnet
from ptqkit.errors import ConfigError

BLOCK_TYPES: tuple[type, ...] = (tv_resnet.BasicBlock, tv_resnet.Bottleneck, cifar_resnet.BasicBlock,
                                 tv_mbv2.InvertedResidual, tv_mnasnet._InvertedResidual,
                                 tv_regnet.ResBottleneckBlock)
GRANULARITIES = ("layer", "block", "stage")


@dataclass
class Unit:
    name: str
    input: fx.Node
    output: fx.Node
    nodes: list[fx.Node]                      # topological order, `input` excluded
    modules: dict[str, nn.Module] = field(default_factory=dict)  # call_module targets inside the unit
    iters_scale: int = 1                      # the unit learns for this many times the phase's iterations

    @property
    def weight_layers(self) -> list[str]:
        return [n for n, m in self.modules.items() if hasattr(m, "weight_fake_quant")]

    @property
    def weight_quantizers(self) -> list[tuple[nn.Module, WeightQuantizer]]:
        return [(m, m.weight_fake_quant) for m in self.modules.values()
                if isinstance(getattr(m, "weight_fake_quant", None), WeightQuantizer)]

    @property
    def act_quantizers(self) -> list[ActQuantizer]:
        return [m for m in self.modules.values() if isinstance(m, ActQuantizer)]

    @property
    def input_quantizers(self) -> list[ActQuantizer]:
        """Quantizers of the network input itself (in the first unit): the engine leaves their steps as calibrated."""
        return [self.modules[n.target] for n in self.nodes if n.op == "call_module"
                and isinstance(self.modules[n.target], ActQuantizer)
                and any(a.op == "placeholder" for a in n.all_input_nodes)]

    def num_params(self) -> int:
        return sum(m.weight.numel() for m in self.modules.values() if hasattr(m, "weight_fake_quant"))


def _node_args(node: fx.Node) -> list[fx.Node]:
    # Slices and other non-Node arguments (the option-A shortcut's x[:, :, ::2, ::2]) are skipped here: on
    # Python 3.11 `slice` is unhashable, which is what breaks MQBench's own block search on these models.
    return list(node.all_input_nodes)


def make_unit(gm: fx.GraphModule, name: str, input_node: fx.Node, output_node: fx.Node) -> Unit:
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    seen: set[fx.Node] = set()
    stack = [output_node]
    while stack:
        node = stack.pop()
        if node is input_node or node in seen:
            continue
        if node.op == "placeholder":
            raise ValueError(f"unit {name}: needs the network input besides {input_node.name}; not a single-input "
                             "piece of the graph")
        seen.add(node)
        stack.extend(_node_args(node))
    nodes = sorted(seen, key=order.__getitem__)
    mods = {n.target: modules[n.target] for n in nodes if n.op == "call_module"}
    return Unit(name, input_node, output_node, nodes, mods)


def _atomic_segments(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(input, output) pairs between consecutive activation-quantizer cut points, in order."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for arg in _node_args(node):
            last_use[arg] = i
    live: set[fx.Node] = set()
    boundaries = []
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        live = {n for n in live if last_use.get(n, -1) > i}
        if last_use.get(node, -1) > i:
            live.add(node)
        is_quant = (node.op == "call_module" and isinstance(modules[node.target], ActQuantizer)) or \
            node.meta.get(ACT_BOUNDARY, False)       # weight-only: where the quantizer was
        if node.op == "placeholder" or (is_quant and live == {node}):
            boundaries.append(node)
    output = next(n for n in nodes if n.op == "output")
    final = output.args[0]
    if not isinstance(final, fx.Node):
        raise ValueError("the model must return a single tensor")
    segments = list(zip(boundaries[:-1], boundaries[1:]))
    if boundaries[-1] is not final:
        segments.append((boundaries[-1], final))
    return segments


def _block_of(module_name: str, block_names: list[str]) -> str | None:
    for b in block_names:
        if module_name == b or module_name.startswith(b + "."):
            return b
    return None


def _spatial(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape[2:]) if meta is not None and len(meta.shape) == 4 else None


def partition(gm: fx.GraphModule, fp_model: nn.Module, granularity: str = "block",
              example_input: torch.Tensor | None = None) -> list[Unit]:
    """Units of `gm` at the given granularity. `fp_model` is the unprepared model (for block module types);
    `example_input` (one image is enough) gives spatial sizes for `stage`."""
    if granularity not in GRANULARITIES:
        raise ConfigError("algorithm.granularity", "one of " + ", ".join(GRANULARITIES), granularity)
    if granularity == "layer":
        return _layer_units(gm)
    segments = [make_unit(gm, "", i, o) for i, o in _atomic_segments(gm)]
    # Weightless segments (the input quantizer, a pooling step) join the next unit.
    merged: list[list[Unit]] = []
    pending: list[Unit] = []
    for seg in segments:
        pending.append(seg)
        if seg.weight_layers:
            merged.append(pending)
            pending = []
    if pending:
        if merged:
            merged[-1].extend(pending)
        else:
            merged.append(pending)

    block_names = [n for n, m in fp_model.named_modules() if isinstance(m, BLOCK_TYPES)]
    groups: list[list[Unit]] = []
    group_blocks: list[str | None] = []
    if block_names:
        for group in merged:
            blocks = {_block_of(layer, block_names) for seg in group for layer in seg.weight_layers}
            block = blocks.pop() if len(blocks) == 1 and None not in blocks else None
            if groups and block is not None and group_blocks[-1] == block:
                groups[-1].extend(group)
            else:
                groups.append(list(group))
                group_blocks.append(block)
    else:
        groups = _stack_chains(merged)
        group_blocks = [None] * len(groups)
    units = [_join(gm, g, b) for g, b in zip(groups, group_blocks)]
    if granularity == "stage":
        units = _stages(gm, units, example_input)
    return _unique_names(units)


def _unique_names(units: list[Unit]) -> list[Unit]:
    """Logs, results and resume records find units by name: a name two units would share gets each one's index."""
    counts = collections.Counter(u.name for u in units)
    for k, u in enumerate(units):
        if counts[u.name] > 1:
            u.name = f"{u.name}#{k}"
    return units


def _stack_chains(merged: list[list[Unit]], max_layers: int = 3) -> list[list[Unit]]:
    """MQBench's automatic rule: residual-free single-layer segments are stacked up to `max_layers`."""
    out: list[list[Unit]] = []
    count = 0
    for group in merged:
        layers = sum(len(s.weight_layers) for s in group)
        if layers == 1 and out and 0 < count < max_layers:
            out[-1].extend(group)
            count += 1
        else:
            out.append(list(group))
            count = 1 if layers == 1 else max_layers
    return out


def _name(gm: fx.GraphModule, unit: Unit) -> str:
    """The deepest module holding the unit's weight layers and BNs (pooling, dropout and quantizers are often
    outside it) when it holds no other weight layer; else the unit's layers (e.g. MNasNet's stem, three units that
    are children of one `layers` Sequential: `layers.0`, `layers.3`, `layers.6`)."""
    names = [n for n, m in unit.modules.items()
             if hasattr(m, "weight_fake_quant") or isinstance(m, nn.modules.batchnorm._BatchNorm)]
    common = []
    for items in zip(*(n.split(".") for n in names)):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    owner = ".".join(common)
    foreign = [n for n, m in gm.named_modules() if hasattr(m, "weight_fake_quant") and
               n.startswith(owner + ".") and n not in unit.modules]
    if owner and not foreign:
        return owner
    layers = unit.weight_layers
    return layers[0] if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"


def _join(gm: fx.GraphModule, group: list[Unit], block: str | None = None) -> Unit:
    unit = make_unit(gm, "", group[0].input, group[-1].output)
    unit.name = block or _name(gm, unit)
    return unit


def merge_units(gm: fx.GraphModule, units: list[Unit]) -> Unit:
    """One unit covering consecutive `units` (MRECG groups)."""
    for a, b in zip(units, units[1:]):
        if b.input is not a.output:
            raise ValueError(f"units {a.name} and {b.name} are not consecutive")
    merged = make_unit(gm, "", units[0].input, units[-1].output)
    merged.name = "+".join(u.name for u in units)
    return merged


def _stages(gm: fx.GraphModule, units: list[Unit], example_input) -> list[Unit]:
    if example_input is None:
        raise ValueError("stage granularity needs an example input for spatial sizes")
    with fp_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(example_input[:1])
    groups: list[list[Unit]] = []
    for u in units:
        resolution_changes = _spatial(u.input) != _spatial(u.output)
        first_or_last = not groups or not u.weight_layers or _spatial(u.output) is None
        if resolution_changes or first_or_last or _spatial(groups[-1][-1].output) is None:
            groups.append([u])
        else:
            groups[-1].append(u)
    stages = []
    for g in groups:
        unit = merge_units(gm, g) if len(g) > 1 else g[0]
        unit.name = f"{g[0].name}..{g[-1].name}" if len(g) > 1 else g[0].name
        stages.append(unit)
    return stages


def _layer_units(gm: fx.GraphModule) -> list[Unit]:
    """One unit per weight layer: its input node to the end of its conv/BN/ReLU/quantizer chain."""
    modules = dict(gm.named_modules())
    units = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not hasattr(modules[node.target], "weight_fake_quant"):
            continue
        inputs = _node_args(node)
        if len(inputs) != 1:
            raise ValueError(f"layer {node.target} has {len(inputs)} inputs")
        end = node
        # Follow single-user elementwise successors (BN, activation, output quantizer), stop at the next layer
        # or where the value is shared (a residual add needs the shortcut too).
        while len(end.users) == 1:
            nxt = next(iter(end.users))
            if nxt.op == "output" or len(_node_args(nxt)) != 1:
                break
            mod = modules.get(nxt.target) if nxt.op == "call_module" else None
            if mod is not None and hasattr(mod, "weight_fake_quant"):
                break
            if nxt.op == "call_module" and not isinstance(mod, (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, ActQuantizer,
                                                                  nn.Hardswish, nn.SiLU, nn.Identity)):
                break
            if nxt.op in ("call_function", "call_method") and nxt.target not in (
                    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, "relu"):
                break
            end = nxt
            if isinstance(mod, ActQuantizer):
                break
        units.append(make_unit(gm, node.target, inputs[0], end))
    return units


def describe_units(units: list[Unit]) -> str:
    lines = [f"{'#':>3}  {'unit':<28} {'layers':>6} {'weights':>9} {'act quantizers':>15}  modules"]
    for i, u in enumerate(units):
        layers = u.weight_layers
        lines.append(f"{i:>3}  {u.name:<28} {len(layers):>6} {u.num_params():>9} {len(u.act_quantizers):>15}  "
                     + ", ".join(layers))
    return "\n".join(lines)
