"""Per-layer quantization settings (`quant.layers`) on a prepared model, and the per-layer view of a prepared model.

A *layer* is a conv or linear module that MQBench gave a weight quantizer, named as in the FP model
(`layer1.0.conv1`, `linear`). Each `quant.layers` entry names layers by an fnmatch glob (`match`) and sets

- `w`: the layer's weight quantizer (bits, per_channel, symmetric, observer, p);
- `a`: the activation quantizer(s) on the layer's *input*: MQBench's Academic placement puts one on every input of
  a conv/linear, so this is the quantizer whose output the layer reads (found through shape-only steps such as
  flatten or dropout). Where several layers read the same value (a residual block's input feeds its first conv and
  its downsampling conv), they share that one quantizer: setting `a` for one of them sets it for all of them.

Entries apply in order, key by key: a later entry's `bits` replaces an earlier one's, a key it leaves null does not.
The 8-bit conventions (`first_layer_w_bits`, `last_layer_w_bits`, `input_bits`, `last_layer_a_bits`, each when not
null) keep the layers and quantizers they fix unless an entry's `match` is exactly such a layer's name (no
wildcard): `{match: "*", w: {bits: 2}}` leaves the first and last layers at 8 bits, `{match: conv1, w: {bits: 4}}`
puts the first layer at 4. An entry matching no layer of the model is refused (ConfigError naming the pattern and
some layer names). Bits alone change the quantizer's integer range; per_channel, symmetric, observer or p build a
new MQBench fake quantizer of the same class in its place.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.fx
import torch.nn as nn
from mqbench.prepare_by_platform import BackendType, get_qconfig_by_platform

from ptqkit.errors import ConfigError
from ptqkit.quant.quantizers import ActQuantizer, copy_switches, set_bits

log = logging.getLogger(__name__)

WILDCARDS = set("*?[")
# steps between a quantizer and the layer reading it that change no value (MQBench quantizes before them or after)
_PASS_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"}
_PASS_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_PASS_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)


def is_exact(pattern: str) -> bool:
    """Whether a `match` names one layer exactly (no glob character)."""
    return not (set(pattern) & WILDCARDS)


def weight_layers(gm: nn.Module) -> list[str]:
    """The names of the modules with a weight quantizer, in graph order when `gm` is a GraphModule."""
    modules = dict(gm.named_modules())
    if isinstance(gm, torch.fx.GraphModule):
        names = [n.target for n in gm.graph.nodes if n.op == "call_module"
                 and hasattr(modules[n.target], "weight_fake_quant")]
        return list(dict.fromkeys(names))
    return [n for n, m in modules.items() if hasattr(m, "weight_fake_quant")]


def fp_layers(model: nn.Module) -> list[str]:
    """The conv/linear modules of an FP model (the layers MQBench will give weight quantizers)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def _source_quantizer(node: torch.fx.Node, modules: dict) -> torch.fx.Node | None:
    for _ in range(8):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "call_module" and isinstance(modules.get(node.target), ActQuantizer):
            return node
        passthrough = (node.op == "call_method" and node.target in _PASS_METHODS) or \
            (node.op == "call_function" and node.target in _PASS_FUNCTIONS) or \
            (node.op == "call_module" and isinstance(modules.get(node.target), _PASS_MODULES))
        if not passthrough or not node.args:
            return None
        node = node.args[0]
    return None


def input_quantizer_nodes(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """For every layer, the activation-quantizer node(s) its input comes from (empty: an unquantized input)."""
    modules = dict(gm.named_modules())
    out: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and hasattr(modules[node.target], "weight_fake_quant"):
            found = [q for a in node.all_input_nodes if (q := _source_quantizer(a, modules)) is not None]
            out.setdefault(node.target, [])
            out[node.target] += [q for q in found if q not in out[node.target]]
    return out


def input_quantizers(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """For every layer, the names of the activation quantizers on its input."""
    return {layer: [n.target for n in nodes] for layer, nodes in input_quantizer_nodes(gm).items()}


def check_patterns(entries, layers: list[str], model_name: str, path: str = "quant.layers") -> None:
    """Every entry's `match` must match at least one layer (ConfigError naming the pattern and some layers)."""
    for i, entry in enumerate(entries):
        if not any(fnmatch.fnmatchcase(name, entry.match) for name in layers):
            shown = layers[:3] + (["..."] if len(layers) > 4 else []) + layers[-1:] if len(layers) > 4 else layers
            raise ConfigError(f"{path}[{i}].match", f"a pattern matching a conv/linear layer of {model_name} "
                              f"({len(layers)} layers: {', '.join(shown)})", entry.match)


@dataclass
class Applied:
    """What `quant.layers` changed: per layer / quantizer, the settings and the entries that set them."""
    weights: dict[str, dict] = field(default_factory=dict)        # layer -> settings
    activations: dict[str, dict] = field(default_factory=dict)    # quantizer -> settings
    sources: dict[str, list[int]] = field(default_factory=dict)   # layer or quantizer -> entry indices
    kept: dict[str, list[int]] = field(default_factory=dict)      # convention layer -> glob entries that left it


def resolve(entries, layers: list[str], inputs: dict[str, list[str]], fixed_w: set[str],
            fixed_a: set[str]) -> Applied:
    """Which settings each weight layer and each activation quantizer gets, by the precedence rules above."""
    applied = Applied()
    for i, entry in enumerate(entries):
        w, a = entry.w.settings(), entry.a.settings()
        exact = is_exact(entry.match)
        matched = [name for name in layers if fnmatch.fnmatchcase(name, entry.match)]
        for name in matched:
            if w:
                if name in fixed_w and not exact:
                    applied.kept.setdefault(name, []).append(i)
                else:
                    applied.weights.setdefault(name, {}).update(w)
                    applied.sources.setdefault(name, []).append(i)
            if a:
                for q in inputs.get(name, []):
                    if q in fixed_a and not exact:
                        applied.kept.setdefault(q, []).append(i)
                    else:
                        applied.activations.setdefault(q, {}).update(a)
                        applied.sources.setdefault(q, []).append(i)
    return applied


def _replace(old, kind: str, base, settings: dict, qconfig_dict: Callable):
    """A new fake quantizer of `old`'s class built from `base` (a TensorQuant) with `settings`, `old`'s switches."""
    tq = dataclasses.replace(base, **{k: v for k, v in settings.items() if k != "bits"})
    qconfig = get_qconfig_by_platform(BackendType.Academic,
                                      qconfig_dict(SimpleNamespace(w=tq, a=tq)))
    new = (qconfig.weight if kind == "w" else qconfig.activation)()
    if type(new) is not type(old):
        raise TypeError(f"per-layer quantizer of class {type(new).__name__}, expected {type(old).__name__}")
    copy_switches(new, old)   # the Python switches the forward reads, and the buffers
    for attr in ("prob", "bound_grad", "learn_step"):
        if attr in vars(old):
            setattr(new, attr, getattr(old, attr))
    return new.to(old.scale.device)


def _set_module(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, module)


def convention_fixed(layout, qcfg) -> tuple[set[str], set[str]]:
    """The layers whose weights, and the quantizers whose activations, an 8-bit convention fixes (a convention
    set to null fixes nothing)."""
    fixed_w = set()
    if qcfg.first_layer_w_bits is not None:
        fixed_w |= set(layout.first_layers)
    if qcfg.last_layer_w_bits is not None and layout.last_layer is not None:
        fixed_w.add(layout.last_layer)
    fixed_a = set(layout.input_quantizers) if qcfg.input_bits is not None else set()
    if qcfg.last_layer_a_bits is not None and layout.last_input_quantizer is not None:
        fixed_a.add(layout.last_input_quantizer)
    return fixed_w, fixed_a


def apply(gm: torch.fx.GraphModule, layout, qcfg, qconfig_dict: Callable, model_name: str = "the model") -> Applied:
    """Apply `qcfg.layers` to a prepared model whose conventions are already applied (ptqkit.quant.prepare)."""
    entries = list(getattr(qcfg, "layers", None) or [])
    if not entries:
        return Applied()
    layers = weight_layers(gm)
    check_patterns(entries, layers, model_name)
    inputs = input_quantizers(gm)
    fixed_w, fixed_a = convention_fixed(layout, qcfg)
    applied = resolve(entries, layers, inputs, fixed_w, fixed_a)
    modules = dict(gm.named_modules())
    for name, settings in applied.weights.items():
        layer = modules[name]
        if set(settings) - {"bits"}:
            layer.weight_fake_quant = _replace(layer.weight_fake_quant, "w", qcfg.w, settings, qconfig_dict)
        if "bits" in settings:
            set_bits(layer.weight_fake_quant, settings["bits"])
    for name, settings in applied.activations.items():
        q = modules[name]
        if set(settings) - {"bits"}:
            bits = q.bitwidth
            q = _replace(q, "a", qcfg.a, settings, qconfig_dict)
            set_bits(q, bits)
            _set_module(gm, name, q)
        if "bits" in settings:
            set_bits(q, settings["bits"])
    for name, idx in applied.kept.items():
        log.info("quant.layers%s: %s is fixed by an 8-bit convention and kept; an entry whose match is its exact "
                 "name changes it", idx, name)
    return applied


def apply_record(gm: torch.fx.GraphModule, layout, qcfg) -> Applied:
    """What `apply` did (or would do) to this prepared model, changing nothing."""
    entries = list(getattr(qcfg, "layers", None) or [])
    return resolve(entries, weight_layers(gm), input_quantizers(gm), *convention_fixed(layout, qcfg))


# ------------------------------------------------------------------------------------------ per-layer table
def layer_records(gm: torch.fx.GraphModule, layout=None, applied: Applied | None = None) -> list[dict]:
    """One record per layer: weight bits / per-channel / observer, its input quantizers and their bits,
    parameters, and why it has those bits (convention, quant.layers entries)."""
    modules = dict(gm.named_modules())
    inputs = input_quantizers(gm)
    readers: dict[str, list[str]] = {}
    for layer, qs in inputs.items():
        for q in qs:
            readers.setdefault(q, []).append(layer)
    records = []
    for name in weight_layers(gm):
        layer = modules[name]
        wq = layer.weight_fake_quant
        qs = inputs.get(name, [])
        notes = []
        if layout is not None:
            if name in layout.first_layers:
                notes.append("first")
            if name == layout.last_layer:
                notes.append("last")
        if applied is not None:
            for part, keys in (("w", [name]), ("a", qs)):
                idx = [i for key in keys for i in applied.sources.get(key, [])]
                if idx:
                    notes.append(f"{part} from layers" + "".join(f"[{i}]" for i in dict.fromkeys(idx)))
                idx = [i for key in keys for i in applied.kept.get(key, [])]
                if idx:
                    notes.append(f"{part} kept by the convention against layers" +
                                 "".join(f"[{i}]" for i in dict.fromkeys(idx)))
        shared = sorted({r for q in qs for r in readers[q] if r != name})
        records.append({
            "layer": name, "type": type(layer).__name__, "params": int(layer.weight.numel()),
            "w_bits": int(wq.bitwidth), "w_per_channel": bool(wq.is_per_channel),
            "w_observer": type(wq.activation_post_process).__name__,
            "a_bits": max((int(modules[q].bitwidth) for q in qs), default=None),
            "a_quantizers": qs, "a_shared_with": shared, "notes": notes})
    return records


def format_table(records: list[dict], macs: dict[str, int] | None = None) -> str:
    """The per-layer table a dry run prints."""
    head = (f"{'layer':<28} {'type':<7} {'params':>8} {'MACs':>10} {'w bits':>6} {'per-ch':>6} "
            f"{'a bits (input)':>14}  notes")
    lines = [head]
    for r in records:
        a = "fp" if r["a_bits"] is None else str(r["a_bits"])
        m = "" if macs is None else f"{macs.get(r['layer'], 0):,}"
        notes = list(r["notes"]) + ([f"input shared with {', '.join(r['a_shared_with'])}"] if r["a_shared_with"]
                                    else [])
        lines.append(f"{r['layer']:<28} {r['type'][:7]:<7} {r['params']:>8,} {m:>10} {r['w_bits']:>6} "
                     f"{'yes' if r['w_per_channel'] else 'no':>6} {a:>14}  {'; '.join(notes)}")
    return "\n".join(lines)
