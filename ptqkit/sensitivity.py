"""Which layers hurt, and how many bits each deserves: per-layer sensitivity, the accumulated error along the
network, and the mixed-precision allocation of `quant.mixed` (docs/MIXED_PRECISION.md).

**Per layer, alone.** For every candidate bit-width b the model is prepared with every quantizer at b bits (the
8-bit conventions too: the analysis asks what b bits would do to each layer) and calibrated once, round to nearest,
on the first `calib_images` of the calibration draw. Every quantizer is then switched off (the FP network) and, one
probe at a time, only the quantizer(s) of one layer are switched on: its weight quantizer (`w`), or the
quantizer(s) on its input (`a`; a quantizer read by several layers is one probe, reported for each of them). The
network's logits on the next `eval_images` of the draw (held out: their ranges were not observed) give

- `kl`: KL(p_FP || p_q) of the softmax of the logits, summed over classes, averaged over images;
- `top1` / `top1_drop`: top-1 against the images' labels, and FP's top-1 minus it (percentage points);
- `agree`: top-1 agreement with the FP model (%); `logit_mse`: mean squared difference of the logits;
- `hessian` (optional, HAWQ-v2): Tr(H_l) / n_l x ||Q_b(W_l) - W_l||^2, the Hessian trace of the cross-entropy of
  the calibration images w.r.t. the layer's weights estimated by Hutchinson's method (Rademacher vectors,
  Hessian-vector products by `torch.func`: vjp of grad).

The FP activations are computed once per batch and reused: a probe recomputes only the part of the graph
downstream of its quantizer (torch.fx nodes), from the cached FP values that part reads.

**Accumulated.** The model at the config's own bits (conventions and `quant.layers` included), calibrated the same
way, against the FP model on the held-out images: each layer's output (the conv/linear output) compared with FP's
(SQNR in dB, cosine similarity averaged over images, MSE), as PPQ's graph-wise error report, and the logits' KL and
top-1.

**Allocation** (`quant.mixed`): the weight bit-widths of the free layers minimising the summed per-layer `w`
sensitivity within a budget (ptqkit.quant.allocate), written as `quant.layers` entries.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.func import functional_call, grad, vjp
from tqdm import tqdm

from ptqkit import assets, distributed
from ptqkit.algorithms import heap
from ptqkit.config import LayerQuant, LayerTensorQuant, MixedConfig, dump_config
from ptqkit.errors import ConfigError, UserError
from ptqkit.files import write_json
from ptqkit.quant import allocate, layer_bits, size
from ptqkit.quant import prepare as pq
from ptqkit.quant.quantizers import fake_quantizers, fp_mode

log = logging.getLogger("ptq")

FORMAT = "ptqkit-sensitivity-v1"
MEASURE_KEYS = {"kl": "kl", "top1": "top1_drop", "mse": "logit_mse", "hessian": "hessian"}
WHATS = ("w", "a", "both")
MIXED_RECORD = "mixed_precision.json"


@dataclass
class Settings:
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    what: str = "both"               # w | a | both (both: the two families, each measured alone)
    calib_images: int = 256          # first images of the calibration draw: ranges observed on them
    eval_images: int = 256           # the next ones: KL / top-1 measured on them
    batch_size: int = 64
    accumulated: bool = True
    hessian: bool = False
    hessian_samples: int = 16
    seed: int = 1005


# ------------------------------------------------------------------------------------------- helpers
def split_images(images: torch.Tensor, labels: torch.Tensor, s: Settings):
    """(calibration part, held-out part, its labels, a description): the first `calib_images` of the draw observe
    ranges, the next `eval_images` are measured. With fewer images, half and half."""
    n = len(images)
    if n < 2:
        raise UserError(f"sensitivity: needs at least 2 calibration images (data.calibration.num_images), got {n}")
    n_cal = min(s.calib_images, n // 2) if s.calib_images + 1 > n else s.calib_images
    n_eval = min(s.eval_images, n - n_cal)
    selection = {"draw": n, "calibration": [0, n_cal], "held_out": [n_cal, n_cal + n_eval],
                 "note": "indices into the config's calibration draw (data.calibration: split, num_images, seed); "
                         "ranges are observed on the first part, KL / top-1 measured on the held-out part"}
    return images[:n_cal], images[n_cal:n_cal + n_eval], labels[n_cal:n_cal + n_eval], selection


def uniform_quant(qcfg, bits: int):
    """`qcfg` with every quantizer at `bits` (conventions too, where set); per-layer entries keep their other
    settings; mixed precision off."""
    keep = (lambda v: None if v is None else bits)
    layers = []
    for e in qcfg.layers:
        w, a = dataclasses.replace(e.w, bits=None), dataclasses.replace(e.a, bits=None)
        if w.settings() or a.settings():
            layers.append(dataclasses.replace(e, w=w, a=a))
    return dataclasses.replace(qcfg, w=dataclasses.replace(qcfg.w, bits=bits),
                               a=dataclasses.replace(qcfg.a, bits=keep(qcfg.a.bits)),
                               first_layer_w_bits=keep(qcfg.first_layer_w_bits),
                               last_layer_w_bits=keep(qcfg.last_layer_w_bits),
                               last_layer_a_bits=keep(qcfg.last_layer_a_bits), input_bits=keep(qcfg.input_bits),
                               layers=layers, mixed=MixedConfig())


def _batches(n: int, batch: int):
    return [(i, min(i + batch, n)) for i in range(0, n, batch)]


class SuffixRunner:
    """Runs the part of a GraphModule downstream of given start nodes, reading every other value it needs from a
    cache of FP values (by node name), so that a probe costs only the layers after it."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.modules = dict(gm.named_modules())
        self.plans: dict = {}

    def plan(self, key, start_names: list[str]) -> set[str]:
        """Register a probe; return the names of the values it reads from the cache."""
        down = {self.by_name[n] for n in start_names}
        for node in self.nodes:
            if node not in down and any(a in down for a in node.all_input_nodes):
                down.add(node)
        order = [n for n in self.nodes if n in down]
        reads = {a.name for n in order for a in n.all_input_nodes if a not in down}
        self.plans[key] = order
        return reads

    def _run(self, order, values: dict):
        env = dict(values)
        for node in order:
            if node.op == "output":
                return torch.fx.node.map_arg(node.args[0], lambda n: env[n.name])
            args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            if node.op == "call_module":
                out = self.modules[node.target](*args, **kwargs)
            elif node.op == "call_function":
                out = node.target(*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                out = _fetch_attr(self.gm, node.target)
            elif node.op == "placeholder":
                out = env[node.name]
            else:
                raise RuntimeError(f"unexpected fx node {node.op}")
            env[node.name] = out
        raise RuntimeError("probe does not reach the network output")

    def full(self, x: torch.Tensor, keep: set[str]) -> tuple[dict, torch.Tensor]:
        """The whole graph on `x`; the values named in `keep`, and the output."""
        placeholder = next(n for n in self.nodes if n.op == "placeholder")
        env: dict = {placeholder.name: x}
        last_use = {}
        for i, node in enumerate(self.nodes):
            for a in node.all_input_nodes:
                last_use[a.name] = i
        kept = {placeholder.name: x} if placeholder.name in keep else {}
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out = torch.fx.node.map_arg(node.args[0], lambda n: env[n.name])
                return kept, out
            out = self._step(node, env)
            env[node.name] = out
            if node.name in keep:
                kept[node.name] = out
            for a in node.all_input_nodes:
                if last_use.get(a.name) == i and a.name not in keep:
                    env.pop(a.name, None)
        raise RuntimeError("graph without output")

    def _step(self, node, env):
        args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return _fetch_attr(self.gm, node.target)
        raise RuntimeError(f"unexpected fx node {node.op}")

    def run(self, key, cache: dict) -> torch.Tensor:
        return self._run(self.plans[key], cache)


def _fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Probe:
    key: tuple                     # ("w", layer) or ("a", quantizer names...)
    kind: str                      # w | a
    layers: list[str]              # the layers it is reported for
    starts: list[str]              # fx node names where quantization enters
    quantizers: list[str]          # module names of the weight layer (w) or of the activation quantizers (a)


def make_probes(gm: torch.fx.GraphModule, layers: list[str], what: str) -> list[Probe]:
    nodes_of: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            nodes_of.setdefault(n.target, []).append(n.name)
    probes = []
    if what in ("w", "both"):
        probes += [Probe(("w", name), "w", [name], nodes_of[name], [name]) for name in layers]
    if what in ("a", "both"):
        by_key: dict[tuple, Probe] = {}
        for name, qs in layer_bits.input_quantizers(gm).items():
            if not qs:
                continue
            key = ("a",) + tuple(sorted(qs))
            if key not in by_key:
                by_key[key] = Probe(key, "a", [], [nn_ for q in qs for nn_ in nodes_of[q]], list(qs))
            by_key[key].layers.append(name)
        probes += list(by_key.values())
    return probes


def _switch(gm: nn.Module, probe: Probe, on: bool) -> None:
    modules = dict(gm.named_modules())
    for name in probe.quantizers:
        q = modules[name].weight_fake_quant if probe.kind == "w" else modules[name]
        q.enable_fake_quant(on)


class _Logits:
    """Running sums of the logit metrics of one probe."""

    def __init__(self):
        self.kl = self.mse = 0.0
        self.correct = self.agree = self.n = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, fp_logits: torch.Tensor, fp_logp: torch.Tensor, fp_pred: torch.Tensor,
            labels: torch.Tensor):
        logits = logits.float()
        logp = F.log_softmax(logits, dim=1)
        self.kl += float((fp_logp.exp() * (fp_logp - logp)).sum())
        self.mse += float((logits - fp_logits).pow(2).mean(1).sum())
        pred = logits.argmax(1)
        self.correct += int((pred == labels).sum())
        self.agree += int((pred == fp_pred).sum())
        self.n += len(logits)

    def result(self, fp_top1: float) -> dict:
        top1 = 100.0 * self.correct / max(self.n, 1)
        return {"kl": self.kl / max(self.n, 1), "top1": top1, "top1_drop": fp_top1 - top1,
                "agree": 100.0 * self.agree / max(self.n, 1), "logit_mse": self.mse / max(self.n, 1)}


# ------------------------------------------------------------------------------------------ Hessian
def hessian_traces(gm: torch.fx.GraphModule, layers: list[str], images: torch.Tensor, labels: torch.Tensor,
                   samples: int, batch: int, device, seed: int, progress=None) -> dict[str, float]:
    """Hutchinson estimates of Tr(H_l), the Hessian of the mean cross-entropy w.r.t. each layer's weights (all
    quantizers of `gm` off: the FP network), E[v_l . (H v)_l] over Rademacher v; one Hessian-vector product per
    sample and batch gives every layer's estimate (the cross terms have zero mean)."""
    names = [f"{layer}.weight" for layer in layers]
    params = dict(gm.named_parameters())
    weights = {n: params[n].detach() for n in names}
    gen = torch.Generator().manual_seed(seed)
    traces = {layer: 0.0 for layer in layers}
    spans = _batches(len(images), batch)
    with fp_mode(gm):
        for start, end in spans:
            x, y = images[start:end].to(device), labels[start:end].to(device)

            def loss(w):
                return F.cross_entropy(functional_call(gm, w, (x,)), y)

            _, hvp = vjp(grad(loss), weights)     # the gradient's graph, built once per batch
            for _ in range(samples):
                v = {n: (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for n, w in weights.items()}
                (hv,) = hvp(v)                       # H v (H symmetric: the vjp of the gradient)
                for layer, n in zip(layers, names):
                    traces[layer] += float((v[n] * hv[n].detach()).sum()) * (end - start)
                if progress is not None:
                    progress.update(1)
    return {layer: t / (samples * len(images)) for layer, t in traces.items()}


# ------------------------------------------------------------------------------------------- analysis
def _observer_calibrated(fp_model, qcfg, leaf_modules, cal, batch, device):
    gm, layout = pq.prepare_quantized(fp_model, qcfg, leaf_modules)
    gm = gm.to(device)
    pq.calibrate(gm, cal, batch, device)
    return gm, layout


def analyse(cfg, fp_model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, s: Settings,
            show_progress: bool = True) -> dict:
    """The sensitivity report (a JSON-able dict; `write_outputs` writes it). On CPU, freed memory stays in the
    heap meanwhile (algorithms/heap.py, runtime.retain_cpu_heap): every probe allocates the same activations."""
    retain = torch.device(device).type == "cpu" and cfg.runtime.retain_cpu_heap
    with heap.retained_heap(retain):
        return _analyse(cfg, fp_model, images, labels, device, s, show_progress)


@torch.no_grad()
def _analyse(cfg, fp_model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, s: Settings,
             show_progress: bool = True) -> dict:
    if s.what not in WHATS:
        raise UserError(f"--what: expected one of {', '.join(WHATS)}, got {s.what!r}")
    start_time = time.perf_counter()
    device = torch.device(device)
    cal, ev, ev_y, selection = split_images(images, labels, s)
    leaf = cfg.model.leaf_modules
    base, layout = pq.prepare_quantized(fp_model, cfg.quant, leaf)
    base = base.to(device)
    records = layer_bits.layer_records(base, layout)
    layers = [r["layer"] for r in records]
    macs = size.layer_macs(base, ev[:1].to(device), layers)
    fixed_w, fixed_a = layer_bits.convention_fixed(layout, cfg.quant)
    for r in records:
        r["macs"] = macs.get(r["layer"], 0)
        r["fixed_w"] = r["layer"] in fixed_w
        r["fixed_a"] = any(q in fixed_a for q in r["a_quantizers"])

    probes = make_probes(base, layers, s.what)
    bits = sorted(set(s.bits))
    timings = {}
    t = time.perf_counter()
    models = {}
    for b in tqdm(bits, desc="calibrate per bit-width", disable=not show_progress, leave=False):
        gm, _ = _observer_calibrated(fp_model, uniform_quant(cfg.quant, b), leaf, cal, s.batch_size, device)
        for _, q in fake_quantizers(gm):
            q.disable_fake_quant()
        models[b] = gm
    timings["calibrate"] = time.perf_counter() - t

    runners = {b: SuffixRunner(gm) for b, gm in models.items()}
    keep: set[str] = set()
    for runner in runners.values():
        for p in probes:
            keep |= runner.plan(p.key, p.starts)
    fp_runner = runners[bits[0]]

    t = time.perf_counter()
    accs = {(p.key, b): _Logits() for p in probes for b in bits}
    fp_correct = 0
    spans = _batches(len(ev), s.batch_size)
    with tqdm(total=len(spans) * (1 + len(bits) * len(probes)), desc="per-layer sensitivity", unit="fwd",
              disable=not show_progress) as bar:
        for start, end in spans:
            x, y = ev[start:end].to(device), ev_y[start:end].to(device)
            cache, fp_logits = fp_runner.full(x, keep)
            fp_logits = fp_logits.float()
            fp_logp = F.log_softmax(fp_logits, dim=1)
            fp_pred = fp_logits.argmax(1)
            fp_correct += int((fp_pred == y).sum())
            bar.update(1)
            for b in bits:
                for p in probes:
                    _switch(models[b], p, True)
                    try:
                        logits = runners[b].run(p.key, cache)
                    finally:
                        _switch(models[b], p, False)
                    accs[(p.key, b)].add(logits, fp_logits, fp_logp, fp_pred, y)
                    bar.update(1)
    timings["per_layer"] = time.perf_counter() - t
    fp_top1 = 100.0 * fp_correct / len(ev)

    hessian = None
    if s.hessian:
        t = time.perf_counter()
        cal_y = labels[:len(cal)]
        spans_h = _batches(len(cal), s.batch_size)
        with torch.enable_grad(), tqdm(total=len(spans_h) * s.hessian_samples, desc="hessian (hutchinson)",
                                       disable=not show_progress, leave=False) as bar:
            hessian = hessian_traces(models[bits[0]], layers, cal, cal_y, s.hessian_samples, s.batch_size, device,
                                     s.seed, bar)
        timings["hessian"] = time.perf_counter() - t

    rows = []
    for p in probes:
        for b in bits:
            metrics = accs[(p.key, b)].result(fp_top1)
            for layer in p.layers:
                row = {"layer": layer, "what": p.kind, "bits": b, **metrics,
                       "quantizers": p.quantizers if p.kind == "a" else [layer],
                       "shared_with": [x for x in p.layers if x != layer]}
                rows.append(row)
    if hessian is not None:
        for b in bits:
            gm = models[b]
            mods = dict(gm.named_modules())
            for layer in layers:
                m = mods[layer]
                wq = m.weight_fake_quant
                wq.enable_fake_quant()
                err = float((wq(m.weight) - m.weight).pow(2).sum())
                wq.disable_fake_quant()
                # a trace estimated below 0 (few samples, a non-convex point) counts as 0: no layer is rewarded
                # for its error
                value = max(hessian[layer], 0.0) / m.weight.numel() * err
                for row in rows:
                    if row["layer"] == layer and row["what"] == "w" and row["bits"] == b:
                        row["hessian"], row["w_quant_error"] = value, err
    order = {name: i for i, name in enumerate(layers)}
    rows.sort(key=lambda r: (r["what"] != "w", order[r["layer"]], r["bits"]))

    accumulated = None
    if s.accumulated:
        t = time.perf_counter()
        pq.calibrate(base, cal, s.batch_size, device)
        accumulated = accumulated_error(base, layers, ev, ev_y, s.batch_size, device, show_progress)
        timings["accumulated"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start_time
    return {"format": FORMAT, "model": cfg.model.name, "checkpoint": cfg.model.checkpoint,
            "bits": bits, "what": s.what, "images": selection, "fp_top1": fp_top1,
            "config_bits": {"w": cfg.quant.w.bits, "a": cfg.quant.a.bits},
            "layers": records, "hessian_traces": hessian, "rows": rows, "accumulated": accumulated,
            "settings": dataclasses.asdict(s), "seconds": {k: round(v, 2) for k, v in timings.items()},
            "threads": torch.get_num_threads(), "device": str(device)}


@torch.no_grad()
def accumulated_error(qmodel: nn.Module, layers: list[str], images: torch.Tensor, labels: torch.Tensor,
                      batch: int, device, show_progress: bool = True) -> dict:
    """Every layer's output in the (calibrated) quantized model against the FP model's, on `images`."""
    modules = dict(qmodel.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[name].register_forward_hook(
        lambda m, i, o, name=name: captured.__setitem__(name, o.detach().float())) for name in layers]
    sums = {name: {"signal": 0.0, "noise": 0.0, "cos": 0.0, "n": 0, "elements": 0} for name in layers}
    logits_acc = _Logits()
    fp_correct = 0
    try:
        for start, end in tqdm(_batches(len(images), batch), desc="accumulated error", disable=not show_progress,
                               leave=False):
            x, y = images[start:end].to(device), labels[start:end].to(device)
            with fp_mode(qmodel):
                fp_logits = qmodel(x).float()
            fp_out = dict(captured)
            q_logits = qmodel(x).float()
            for name in layers:
                f, q = fp_out[name].flatten(1), captured[name].flatten(1)
                acc = sums[name]
                acc["signal"] += float(f.pow(2).sum())
                acc["noise"] += float((q - f).pow(2).sum())
                acc["cos"] += float(F.cosine_similarity(q, f, dim=1, eps=1e-12).sum())
                acc["n"] += len(f)
                acc["elements"] += f.numel()
            fp_logp = F.log_softmax(fp_logits, 1)
            fp_pred = fp_logits.argmax(1)
            fp_correct += int((fp_pred == y).sum())
            logits_acc.add(q_logits, fp_logits, fp_logp, fp_pred, y)
    finally:
        for h in hooks:
            h.remove()
    per_layer = []
    for name in layers:
        acc = sums[name]
        sqnr = 10 * math.log10(acc["signal"] / acc["noise"]) if acc["noise"] > 0 else None   # None: no error
        per_layer.append({"layer": name, "sqnr_db": sqnr, "cosine": acc["cos"] / max(acc["n"], 1),
                          "mse": acc["noise"] / max(acc["elements"], 1)})
    return {"layers": per_layer, "logits": logits_acc.result(100.0 * fp_correct / len(images))}


# ------------------------------------------------------------------------------------------- outputs
def format_report(result: dict) -> str:
    """The terminal tables: per layer, KL and top-1 drop at each bit-width (weights, then inputs), and the
    accumulated error."""
    bits = result["bits"]
    lines = []
    by = {(r["layer"], r["what"], r["bits"]): r for r in result["rows"]}
    for what, title in (("w", "weights alone"), ("a", "input activations alone")):
        if not any(r["what"] == what for r in result["rows"]):
            continue
        start, end = result["images"]["held_out"]
        lines.append(f"{title}: KL(FP || quantized) of the logits, top-1 drop (points) on {end - start} held-out "
                     f"images (FP top-1 {result['fp_top1']:.2f} %)")
        head = f"{'layer':<26} {'params':>7}  " + "  ".join(f"{f'KL@{b}':>9} {f'd@{b}':>6}" for b in bits) + "  note"
        lines.append(head)
        for rec in result["layers"]:
            cells = []
            for b in bits:
                r = by.get((rec["layer"], what, b))
                cells.append(f"{r['kl']:>9.4g} {r['top1_drop']:>6.2f}" if r else f"{'-':>9} {'-':>6}")
            note = []
            if what == "w" and rec.get("fixed_w"):
                note.append("8-bit convention")
            if what == "a" and rec.get("fixed_a"):
                note.append("8-bit convention")
            r = by.get((rec["layer"], what, bits[0]))
            if what == "a" and r and r["shared_with"]:
                note.append("shared with " + ", ".join(r["shared_with"]))
            lines.append(f"{rec['layer']:<26} {rec['params']:>7}  " + "  ".join(cells) + "  " + "; ".join(note))
        lines.append("")
    acc = result.get("accumulated")
    if acc:
        lg = acc["logits"]
        lines.append(f"accumulated: everything at the config's bits (W{result['config_bits']['w']}"
                     f"A{result['config_bits']['a']}, conventions and quant.layers), each layer's output vs FP; "
                     f"logits KL {lg['kl']:.4g}, top-1 {lg['top1']:.2f} % (drop {lg['top1_drop']:.2f})")
        lines.append(f"{'layer':<26} {'SQNR dB':>8} {'cosine':>8} {'MSE':>10}")
        for r in acc["layers"]:
            sqnr = "exact" if r["sqnr_db"] is None else f"{r['sqnr_db']:.2f}"
            lines.append(f"{r['layer']:<26} {sqnr:>8} {r['cosine']:>8.4f} {r['mse']:>10.4g}")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str, plot: bool = True) -> list[str]:
    """sensitivity.json, sensitivity.csv, accumulated.csv (when measured) and sensitivity.png into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    path = os.path.join(out_dir, "sensitivity.json")
    write_json(path, result)
    paths.append(path)
    path = os.path.join(out_dir, "sensitivity.csv")
    keys = ["layer", "what", "bits", "kl", "top1", "top1_drop", "agree", "logit_mse", "hessian"]
    info = {r["layer"]: r for r in result["layers"]}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys + ["params", "macs", "fixed_by_convention", "shared_with"])
        for r in result["rows"]:
            rec = info[r["layer"]]
            fixed = rec["fixed_w"] if r["what"] == "w" else rec["fixed_a"]
            writer.writerow([r.get(k, "") for k in keys] + [rec["params"], rec["macs"], fixed,
                                                           " ".join(r["shared_with"])])
    paths.append(path)
    if result.get("accumulated"):
        path = os.path.join(out_dir, "accumulated.csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "sqnr_db", "cosine", "mse"])
            for r in result["accumulated"]["layers"]:
                writer.writerow([r["layer"], r["sqnr_db"], r["cosine"], r["mse"]])
        paths.append(path)
    if plot:
        paths.append(plot_sensitivity(result, os.path.join(out_dir, "sensitivity.png")))
    return paths


def plot_sensitivity(result: dict, path: str) -> str:
    """Bars per layer, one colour per bit-width (KL, log scale), one panel per family; the accumulated SQNR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = [r["layer"] for r in result["layers"]]
    whats = [w for w in ("w", "a") if any(r["what"] == w for r in result["rows"])]
    panels = whats + (["acc"] if result.get("accumulated") else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.45 * len(layers)), 3.2 * len(panels)), squeeze=False)
    by = {(r["layer"], r["what"], r["bits"]): r for r in result["rows"]}
    bits = result["bits"]
    width = 0.8 / len(bits)
    colours = plt.get_cmap("viridis")
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "acc":
            acc = result["accumulated"]["layers"]
            ax.plot(range(len(acc)), [math.nan if r["sqnr_db"] is None else r["sqnr_db"] for r in acc], marker="o")
            ax.set_ylabel("SQNR (dB)")
            ax.set_title(f"accumulated: every layer at the config's bits (W{result['config_bits']['w']}"
                         f"A{result['config_bits']['a']}), each layer's output vs FP")
            ax.set_xticks(range(len(acc)))
            ax.set_xticklabels([r["layer"] for r in acc], rotation=70, fontsize=7)
            continue
        for k, b in enumerate(bits):
            values = [max(by[(layer, panel, b)]["kl"], 1e-8) if (layer, panel, b) in by else 0 for layer in layers]
            ax.bar([i + (k - (len(bits) - 1) / 2) * width for i in range(len(layers))], values, width,
                   label=f"{b} bit", color=colours(k / max(len(bits) - 1, 1)))
        ax.set_yscale("log")
        ax.set_ylabel("KL(FP || q)")
        ax.set_title(("weights" if panel == "w" else "input activations") + " of one layer quantized, the rest FP")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=70, fontsize=7)
        ax.legend(fontsize=7, ncol=len(bits))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



# ------------------------------------------------------------------------------- the per-layer plan, size
def describe_layers(cfg, fp_model: nn.Module, example: torch.Tensor) -> str:
    """The per-layer table a dry run prints (weight bits, per-channel, input-activation bits, parameters, MACs)
    and the model's size at those bits."""
    gm, layout = pq.prepare_quantized(fp_model, cfg.quant, cfg.model.leaf_modules)
    applied = layer_bits.apply_record(gm, layout, cfg.quant)
    records = layer_bits.layer_records(gm, layout, applied)
    macs = size.layer_macs(gm, example, [r["layer"] for r in records])
    total = size.model_size(records, macs)
    return (f"per-layer quantization ({len(records)} conv/linear layers; a bits = the quantizer on the layer's "
            "input):\n" + layer_bits.format_table(records, macs) + "\n" + size_line(total))


def size_line(total: dict) -> str:
    return (f"size: {total['params']:,} weights, average {total['avg_w_bits']:.3f} bits, {total['w_bytes']:,.0f} "
            f"bytes, {total['bops'] / 1e9:.4g} GBOPs per image ({total['macs']:,} MACs)")


@torch.no_grad()
def model_size(qmodel: nn.Module, example: torch.Tensor) -> dict:
    """ptqkit.quant.size.model_size of a prepared (quantized) model, with its per-layer bits."""
    records = layer_bits.layer_records(qmodel)
    macs = size.layer_macs(qmodel, example, [r["layer"] for r in records])
    out = size.model_size(records, macs)
    out["layers"] = {r["layer"]: {"w_bits": r["w_bits"], "a_bits": r["a_bits"], "params": r["params"],
                                  "macs": macs.get(r["layer"], 0)} for r in records}
    return out


# -------------------------------------------------------------------------------- mixed precision
def load_sensitivity(path: str, key: str = "quant.mixed.sensitivity") -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, "a sensitivity.json written by python -m ptqkit.tools.sensitivity "
                          f"({type(exc).__name__})", path) from None
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        raise ConfigError(key, f"a sensitivity.json written by python -m ptqkit.tools.sensitivity ({FORMAT})", path)
    return result


def _costs(result: dict, layers: list[str], candidates: list[int], measure: str, model: str, where: str):
    metric = MEASURE_KEYS[measure]
    rows = {(r["layer"], r["bits"]): r for r in result["rows"] if r["what"] == "w"}
    if result.get("model") != model:
        raise ConfigError("quant.mixed.sensitivity", f"a sensitivity file of model {model}",
                          f"{where} (model {result.get('model')})")
    costs = {}
    for layer in layers:
        costs[layer] = {}
        for b in candidates:
            row = rows.get((layer, b))
            if row is None or row.get(metric) is None:
                what = f"{layer} at {b} bits" if row is None else f"{metric} of {layer} at {b} bits"
                hint = " (measure hessian: run the tool with --hessian)" if measure == "hessian" else ""
                raise ConfigError("quant.mixed.sensitivity", f"weight rows for every layer at bits "
                                  f"{candidates}{hint}", f"{where} (missing: {what})")
            costs[layer][b] = float(row[metric])
    return costs


def plan_mixed(cfg, fp_model: nn.Module, example: torch.Tensor, result: dict, where: str = "measured") -> dict:
    """Solve `quant.mixed` against a sensitivity result: the allocation and its record (nothing is changed)."""
    m = cfg.quant.mixed
    kind, value = m.budget.kind, getattr(m.budget, m.budget.kind)
    gm, layout = pq.prepare_quantized(fp_model, cfg.quant, cfg.model.leaf_modules)
    records = layer_bits.layer_records(gm, layout)
    layers = [r["layer"] for r in records]
    macs = size.layer_macs(gm, example, layers)
    fixed_w, _ = layer_bits.convention_fixed(layout, cfg.quant)
    applied = layer_bits.apply_record(gm, layout, cfg.quant)
    user_bits = {name for name, st in applied.weights.items() if "bits" in st}
    fixed = {r["layer"]: r["w_bits"] for r in records if r["layer"] in fixed_w or r["layer"] in user_bits}
    free = [r for r in records if r["layer"] not in fixed]
    candidates = sorted(m.candidates)
    costs = _costs(result, [r["layer"] for r in free], candidates, m.measure, cfg.model.name, where)
    total_params = sum(r["params"] for r in records)
    fixed_used = sum(size.layer_cost(kind, r["params"], macs[r["layer"]], r["w_bits"], r["a_bits"])
                     for r in records if r["layer"] in fixed)
    cap = size.capacity(kind, value, total_params)
    weights = [[size.layer_cost(kind, r["params"], macs[r["layer"]], b, r["a_bits"]) for b in candidates]
               for r in free]
    cost_rows = [[costs[r["layer"]][b] for b in candidates] for r in free]
    try:
        choice = allocate.SOLVERS[m.solver](cost_rows, weights, cap - fixed_used)
    except allocate.InfeasibleBudget as exc:
        least = size.in_budget_units(kind, exc.least + fixed_used, total_params)
        fixed_text = ", ".join(f"{name} {bits}" for name, bits in fixed.items()) or "none"
        raise ConfigError(f"quant.mixed.budget.{kind}", f"a budget of at least {least:.6g} (every free layer at "
                          f"{candidates[0]} bits; fixed layers and their bits: {fixed_text})", value) from None
    allocation = {r["layer"]: candidates[j] for r, j in zip(free, choice)}
    used = fixed_used + sum(w[j] for w, j in zip(weights, choice))
    return {"budget": {"kind": kind, "value": value, "used": size.in_budget_units(kind, used, total_params),
                       "capacity": size.in_budget_units(kind, cap, total_params)},
            "candidates": candidates, "measure": m.measure, "solver": m.solver, "sensitivity": where,
            "allocation": allocation, "fixed": fixed,
            "objective": sum(costs[layer][b] for layer, b in allocation.items()),
            "note": "fixed: layers the 8-bit conventions or the config's own quant.layers entries give weight bits; "
                    "they keep them and count toward the budget"}


def plan_line(plan: dict) -> str:
    """One line saying what an allocation is: budget asked and used, measure, solver, sensitivity file."""
    b = plan["budget"]
    return (f"mixed precision: budget {b['kind']} {b['value']:g} (used {b['used']:.6g}), candidates "
            f"{plan['candidates']}, measure {plan['measure']}, solver {plan['solver']}, sensitivity "
            f"{plan['sensitivity']}; summed {plan['measure']} {plan['objective']:.4g}")


def allocation_entries(plan: dict) -> list[LayerQuant]:
    return [LayerQuant(match=layer, w=LayerTensorQuant(bits=bits)) for layer, bits in plan["allocation"].items()]


def allocation_yaml(cfg_layers: list, plan: dict) -> str:
    """The complete `quant.layers` (the config's own entries, then the allocation) as a file to include or paste."""
    entries = []
    for e in cfg_layers:
        entry = {"match": e.match}
        for part in ("w", "a"):
            if getattr(e, part).settings():
                entry[part] = getattr(e, part).settings()
        entries.append(entry)
    entries += [{"match": layer, "w": {"bits": bits}} for layer, bits in plan["allocation"].items()]
    b = plan["budget"]
    head = (f"# quant.layers from mixed precision: budget {b['kind']} {b['value']:g} (used {b['used']:.6g}), "
            f"candidates {plan['candidates']}, measure {plan['measure']}, solver {plan['solver']}\n"
            "# Include it (_base_: allocation.yaml) in a config without quant.layers or quant.mixed of its own (a\n"
            "# list in the including file replaces this one), or paste it (docs/MIXED_PRECISION.md).\n")
    return head + yaml.safe_dump({"quant": {"layers": entries}}, sort_keys=False, default_flow_style=None)


def read_mixed_record(run_dir: str) -> dict | None:
    """The mixed_precision.json an earlier start of the run wrote into `run_dir`, if any."""
    path = os.path.join(run_dir, MIXED_RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def apply_mixed(cfg, fp_model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, run_dir: str | None,
                *, dry_run: bool = False, show_progress: bool = True) -> dict | None:
    """`quant.mixed` at the start of a run: measure (or read) the sensitivity, solve, and turn the allocation into
    `quant.layers` entries of `cfg` (changed in place; `quant.mixed` is then off, so that the run folder's
    config.yaml, the saved model and a resumed run build the allocated model as it is). Writes sensitivity/,
    allocation.yaml and mixed_precision.json into `run_dir`. Returns the record for results.json (None when
    mixed precision is off; a dry run without a sensitivity file returns a note and changes nothing)."""
    m = cfg.quant.mixed
    if not m.enabled:
        return None
    start = time.perf_counter()
    spec = dataclasses.asdict(m)
    example = images[:1].to(device)
    if m.sensitivity is not None:
        where = m.sensitivity
        result = load_sensitivity(assets.resolve(m.sensitivity))
    elif dry_run:
        return {"note": f"mixed precision: the allocation ({m.budget.kind} {getattr(m.budget, m.budget.kind):g}, "
                        f"candidates {m.candidates}, measure {m.measure}, solver {m.solver}) is computed when the "
                        "run starts, from a sensitivity analysis of every layer at each candidate; the table shows "
                        "the bits before it"}
    else:
        if distributed.world_size() > 1:
            raise ConfigError("quant.mixed.sensitivity", "a sensitivity file under torchrun (measure it first: python "
                              "-m ptqkit.tools.sensitivity --config ... --what w)", None)
        settings = Settings(bits=sorted(m.candidates), what="w", calib_images=m.calib_images,
                            eval_images=m.eval_images, batch_size=max(32, cfg.data.calibration.batch_size),
                            accumulated=False, hessian=m.measure == "hessian", hessian_samples=m.hessian_samples,
                            seed=cfg.runtime.seed)
        log.info("mixed precision: measuring each layer's sensitivity at %s bits (%d + %d calibration images)",
                 settings.bits, settings.calib_images, settings.eval_images)
        result = analyse(cfg, fp_model, images, labels, device, settings, show_progress)
        where = "measured"
        if run_dir is not None and distributed.is_main():
            write_outputs(result, os.path.join(run_dir, "sensitivity"))
            where = os.path.join(run_dir, "sensitivity", "sensitivity.json")
    plan = plan_mixed(cfg, fp_model, example, result, where)
    own_layers = list(cfg.quant.layers)
    cfg.quant.layers = own_layers + allocation_entries(plan)
    cfg.quant.mixed = MixedConfig()
    qmodel, _ = pq.prepare_quantized(fp_model, cfg.quant, cfg.model.leaf_modules)
    plan["size"] = model_size(qmodel, example)
    plan["spec"] = spec
    plan["seconds"] = round(time.perf_counter() - start, 2)
    log.info("mixed precision (%s, %s): %s; %s", plan["measure"], plan["solver"],
             ", ".join(f"{k} {v}" for k, v in plan["allocation"].items()), size_line(plan["size"]))
    if run_dir is not None and not dry_run and distributed.is_main():
        with open(os.path.join(run_dir, "allocation.yaml"), "w") as f:
            f.write(allocation_yaml(own_layers, plan))
        write_json(os.path.join(run_dir, MIXED_RECORD), plan)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
    return plan
