"""Export a saved quantized model to ONNX through MQBench, and check the export against the PyTorch model.

    python -m ptqkit.tools.export RUN_DIR [--backend academic|tensorrt] [--images 1000] [--out DIR]

Writes into DIR (default RUN_DIR/export):
- `<model>_<bits>.onnx`: what `mqbench.convert_deploy.convert_deploy` writes for the Academic backend. Weight
  quantizers are custom `mqbench_custom::FixedPerChannelAffine` (per-tensor: `FixedPerTensorAffine`) nodes, which
  no runtime implements; activation quantizers come out as plain ONNX arithmetic (Div, Round, Add, Clip, Sub, Mul).
- `<model>_<bits>_qdq.onnx`: the same graph with every custom node replaced by standard
  QuantizeLinear -> Clip -> DequantizeLinear with the same scales and zero points (per channel on the weight's
  axis). uint8/int8 hold any range of 8 bits or fewer; the Clip narrows the saturation range to the quantizer's
  [quant_min, quant_max] (e.g. 0..15 for 4 bits), which is exactly the clamp of the fake quantizer. onnxruntime
  runs this file.
- `export_check.json`: the check. --images images of the run's evaluation set (rebuilt from the saved config; the
  seeded subset `data.evaluation.limit` would pick, not the first class folders) go through the PyTorch fake-quant
  model and through onnxruntime (CPU) on the _qdq file: agreement of the top-1 predictions (%), max and mean
  absolute difference of the logits, how many images differ at all (> 1e-3), and both top-1 accuracies.

The two runtimes sum convolutions in different orders; a pre-quantizer value within float rounding of a rounding
boundary then lands on the neighbouring integer level. That is rare (about 1 % of the images of a W4A4 ResNet-20)
and moves those images' logits by up to about one unit, so the max difference is not small, the mean is.
- with --backend tensorrt, also MQBench's TensorRT files under DIR/tensorrt (needs polygraphy and
  onnx-graphsurgeon, and numpy < 2.4: checked first).

Exit status: 0 the check passed (agreement >= --min-agreement), 1 it did not, 2 bad input or missing tools.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.metadata as md
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import warnings
from collections import Counter

import numpy as np
import torch
from mqbench.convert_deploy import convert_deploy
from mqbench.prepare_by_platform import BackendType

from ptqkit import data
from ptqkit.errors import UserError
from ptqkit.pipeline import torch_threads
from ptqkit.quant.quantizers import act_quantizers
from ptqkit.saving import load_quantized
from ptqkit.tools import cli

log = logging.getLogger("ptq.export")

BACKENDS = ("academic", "tensorrt", "onnx_qnn")
CUSTOM_DOMAIN = "mqbench_custom"
# Inputs of MQBench's custom symbolics (mqbench/custom_symbolic_opset.py).
_PER_CHANNEL_OPS = {"FixedPerChannelAffine"}                          # x, scale, zero_point, ch_axis, qmin, qmax
_PER_TENSOR_OPS = {"FixedPerTensorAffine", "LearnablePerTensorAffine"}  # x, scale, zero_point, qmin, qmax


class ExportError(UserError):
    """The model cannot be exported, or the exported graph cannot be made runnable."""


# ------------------------------------------------------------------------------------------------- export
@contextlib.contextmanager
def legacy_onnx_exporter():
    """Make `torch.onnx.export` default to the TorchScript exporter (dynamo=False) inside the block.

    torch >= 2.9 exports with dynamo by default, which fails on MQBench's fake quantizers (a data-dependent
    guard), and `convert_deploy` calls `torch.onnx.export` with no way to pass `dynamo`. It looks the function up
    on `torch.onnx` at call time, so replacing that attribute for the duration of the call is enough; the original
    is always put back. On a torch without the argument nothing is changed.
    """
    original = torch.onnx.export
    if "dynamo" not in inspect.signature(original).parameters:
        yield
        return

    @functools.wraps(original)
    def export(*args, **kwargs):
        kwargs.setdefault("dynamo", False)
        return original(*args, **kwargs)

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = original


def tensorrt_missing() -> list[str]:
    """What MQBench's Tensorrt deploy path needs and this environment lacks."""
    missing = []
    if shutil.which("polygraphy") is None:
        missing.append("polygraphy (its command on PATH: pip install polygraphy)")
    if importlib.util.find_spec("onnx_graphsurgeon") is None:
        missing.append("onnx-graphsurgeon (pip install onnx-graphsurgeon)")
    major, minor = (int(x) for x in np.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        missing.append(f"numpy < 2.4 (found {np.__version__})")
    return missing


def check_backend(backend: str) -> None:
    if backend == "onnx_qnn":
        raise ExportError("backend onnx_qnn: the ONNX_QNN export of mqbench-torch2 0.1.1 is broken (it fails in "
                          "remove_identity_and_update_affine with 'remove(x): x not in container'); use academic")
    if backend == "tensorrt":
        missing = tensorrt_missing()
        if missing:
            raise ExportError("backend tensorrt needs " + ", ".join(missing) + "; --backend academic needs none")
    elif backend != "academic":
        raise ExportError(f"backend '{backend}': expected one of {', '.join(BACKENDS)}")


def _mqbench_export(qmodel, backend_type, example: torch.Tensor, out_dir: str, name: str) -> str:
    if shutil.which("polygraphy") is None:
        log.info("polygraphy is not on PATH: MQBench's optional constant-folding pass is skipped "
                 "(the shell's 'polygraphy: not found' line is harmless)")
    os.makedirs(out_dir, exist_ok=True)
    with legacy_onnx_exporter(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on every quantizer's Python-level switches
        try:
            convert_deploy(qmodel.eval(), backend_type, dummy_input=(example,), output_path=out_dir,
                           model_name=name, input_names=["input"], output_names=["logits"],
                           dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        except UserError:
            raise
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"MQBench convert_deploy ({backend_type.name}) failed: {reason}") from None
    return os.path.join(out_dir, f"{name}.onnx")


# ------------------------------------------------------------------------------------ runnable (QDQ) model
def _int_type(qmin: int, qmax: int, zero_point: np.ndarray):
    """The 8-bit integer type holding the quantizer's range and zero points, and that type's own range."""
    for np_type, lo, hi in ((np.uint8, 0, 255), (np.int8, -128, 127)):
        if lo <= qmin and qmax <= hi and zero_point.min() >= lo and zero_point.max() <= hi:
            return np_type, (lo, hi)
    return None, None


def to_onnxruntime(src: str, dst: str) -> dict:
    """Rewrite MQBench's custom fake-quant nodes of `src` as QuantizeLinear/Clip/DequantizeLinear into `dst`."""
    import onnx   # heavy: only when an export is rewritten
    from onnx import helper, numpy_helper

    model = onnx.load(src)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def constant(name: str) -> np.ndarray:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
        if node is not None and node.op_type == "Identity":
            return constant(node.input[0])
        raise ExportError(f"exported ONNX: quantizer parameter '{name}' is not a constant; cannot rewrite it")

    nodes, added, counts, taken = [], [], Counter(), set()
    for node in graph.node:
        if node.domain != CUSTOM_DOMAIN:
            nodes.append(node)
            continue
        if node.op_type in _PER_CHANNEL_OPS:
            x, scale_name, zp_name, axis_name, lo_name, hi_name = node.input[:6]
            axis = int(constant(axis_name))
        elif node.op_type in _PER_TENSOR_OPS:
            x, scale_name, zp_name, lo_name, hi_name = node.input[:5]
            axis = None
        else:
            raise ExportError(f"exported ONNX: custom op '{node.op_type}' has no standard ONNX equivalent here")
        scale = constant(scale_name).astype(np.float32)
        zero_point = np.rint(constant(zp_name)).astype(np.int64)
        qmin, qmax = int(constant(lo_name)), int(constant(hi_name))
        if axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        np_type, full = _int_type(qmin, qmax, zero_point)
        if np_type is None:
            raise ExportError(f"exported ONNX: quantizer '{node.output[0]}' has range [{qmin}, {qmax}] and zero "
                              "points outside 8-bit integers; QuantizeLinear cannot hold it")
        base = f"{x}/qdq"  # the quantized tensor's name (e.g. layer1.0.conv1.weight/qdq) reads better than the node's
        k = 1
        while f"{base}/scale" in taken:
            k += 1
            base = f"{x}/qdq{k}"
        taken.add(f"{base}/scale")
        q_in = [x, f"{base}/scale", f"{base}/zero_point"]
        added += [numpy_helper.from_array(scale, q_in[1]), numpy_helper.from_array(zero_point.astype(np_type), q_in[2])]
        axis_attr = {} if axis is None else {"axis": axis}
        nodes.append(helper.make_node("QuantizeLinear", q_in, [f"{base}/q"], name=f"{base}/QuantizeLinear",
                                      **axis_attr))
        quantized = f"{base}/q"
        if (qmin, qmax) != full:
            # QuantizeLinear saturates to the whole integer type; the quantizer clamps to its own narrower range.
            added += [numpy_helper.from_array(np.array(qmin, dtype=np_type), f"{base}/qmin"),
                      numpy_helper.from_array(np.array(qmax, dtype=np_type), f"{base}/qmax")]
            nodes.append(helper.make_node("Clip", [quantized, f"{base}/qmin", f"{base}/qmax"], [f"{base}/clipped"],
                                          name=f"{base}/Clip"))
            quantized = f"{base}/clipped"
        nodes.append(helper.make_node("DequantizeLinear", [quantized, q_in[1], q_in[2]], [node.output[0]],
                                      name=f"{base}/DequantizeLinear", **axis_attr))
        counts[node.op_type] += 1

    # Constants that only fed the custom nodes' integer arguments are now dangling.
    used = {name for n in nodes for name in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    # The custom nodes' scale / zero-point initializers now have copies in the new nodes' own types.
    used = {name for n in graph.node for name in n.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    if not any(n.domain == CUSTOM_DOMAIN for n in graph.node):
        keep = [op for op in model.opset_import if op.domain != CUSTOM_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"rewritten ONNX does not validate: {str(exc).splitlines()[0]}") from None
    onnx.save(model, dst)
    return dict(counts)


# ---------------------------------------------------------------------------------------------------- check
def evaluation_images(cfg, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images of the run's evaluation subset: those `data.evaluation.limit: n` would evaluate.

    Not the first `n` in folder order, which are all of the first class. The limit draws a prefix of one seeded
    permutation, so these images are a subset of what the run evaluated whatever limit the run itself had.
    """
    data_cfg = copy.deepcopy(cfg.data)
    if data_cfg.evaluation.limit is None or n < data_cfg.evaluation.limit:
        data_cfg.evaluation.limit = n
    splits = data.make_splits(data_cfg)
    images, labels = zip(*data.evaluation_loader(splits, data_cfg.evaluation))
    return torch.cat(images), torch.cat(labels)


def onnxruntime_session(path: str, threads: int = 0):
    import onnxruntime as ort   # heavy (seconds): only when a check runs
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_export(qmodel, onnx_path: str, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 250,
                 threads: int = 0) -> dict:
    """Compare the PyTorch fake-quant model with onnxruntime on the same images."""
    session = onnxruntime_session(onnx_path, threads)
    input_name = session.get_inputs()[0].name
    qmodel.eval()
    agree = correct_pt = correct_ort = differing = 0
    max_diff, sum_diff, count = 0.0, 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        reference = qmodel(batch).float().numpy()
        exported = session.run(None, {input_name: batch.numpy()})[0]
        diff = np.abs(reference - exported)
        differing += int((diff.max(axis=1) > 1e-3).sum())
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.sum())
        count += diff.size
        target = labels[start:start + batch_size].numpy()
        pred_pt, pred_ort = reference.argmax(1), exported.argmax(1)
        agree += int((pred_pt == pred_ort).sum())
        correct_pt += int((pred_pt == target).sum())
        correct_ort += int((pred_ort == target).sum())
    n = len(images)
    return {"images": n, "top1_agreement_pct": 100.0 * agree / n, "disagreements": n - agree,
            "max_abs_logit_diff": max_diff, "mean_abs_logit_diff": sum_diff / max(count, 1),
            "images_with_logit_diff_over_1e-3": differing,
            "top1_pytorch": 100.0 * correct_pt / n, "top1_onnxruntime": 100.0 * correct_ort / n}


def _versions() -> dict:
    out = {}
    for pkg in ("torch", "mqbench-torch2", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _tensorrt_export(qmodel, cfg, example, out_dir: str, name: str) -> list[str]:
    q = cfg.quant
    if not (q.w.bits == q.a.bits == 8 and q.w.symmetric and q.a.symmetric):
        raise ExportError(f"backend tensorrt: TensorRT runs symmetric 8-bit; this model is W{q.w.bits}A{q.a.bits} "
                          f"(symmetric weights {q.w.symmetric}, activations {q.a.symmetric})")
    trt_dir = os.path.join(out_dir, "tensorrt")
    _mqbench_export(qmodel, BackendType.Tensorrt, example, trt_dir, name)
    ranges_path = os.path.join(trt_dir, f"{name}_clip_ranges.json")
    with open(ranges_path) as f:
        ranges = json.load(f).get("tensorrt", {}).get("blob_range", {})
    expected = len(act_quantizers(qmodel))
    if len(ranges) < expected:
        log.warning("tensorrt: %d activation ranges written for %d activation quantizers: MQBench's pass only finds "
                    "quantizers exported as custom nodes", len(ranges), expected)
    return [os.path.join(trt_dir, f) for f in sorted(os.listdir(trt_dir))]


def export_run(run_dir: str, *, backend: str = "academic", images: int = 1000, out_dir: str | None = None,
               threads: int = 0, batch_size: int = 250) -> dict:
    """Export RUN_DIR/quantized_model.pt, check it with onnxruntime, write export_check.json; the check's dict."""
    check_backend(backend)
    if images < 1:
        raise UserError(f"--images: expected a positive number, got {images}")
    model_path = os.path.join(run_dir, "quantized_model.pt")
    if not os.path.isfile(model_path):
        raise UserError(f"run '{run_dir}': no quantized_model.pt (was runtime.save_model false?)")
    with torch_threads(threads):
        return _export_run(run_dir, model_path, backend, images, out_dir or os.path.join(run_dir, "export"),
                           threads, batch_size)


def _export_run(run_dir: str, model_path: str, backend: str, images: int, out_dir: str, threads: int,
                batch_size: int) -> dict:
    qmodel, cfg = load_quantized(model_path)
    bits = f"W{cfg.quant.w.bits}A{cfg.quant.a.bits}"
    name = f"{cfg.model.name}_{bits}"
    pixels, labels = evaluation_images(cfg, images)
    log.info("exporting %s %s (%s) to %s", cfg.model.name, bits, cfg.algorithm.name, out_dir)
    mqbench_path = _mqbench_export(qmodel, BackendType.Academic, pixels[:1], out_dir, name)
    runnable_path = os.path.join(out_dir, f"{name}_qdq.onnx")
    replaced = to_onnxruntime(mqbench_path, runnable_path)
    log.info("replaced %s custom nodes by QuantizeLinear/DequantizeLinear", dict(replaced))
    result = {"run": run_dir, "model": cfg.model.name, "bits": bits, "algorithm": cfg.algorithm.name,
              "backend": backend, "onnx_mqbench_academic": mqbench_path, "onnx_checked": runnable_path,
              "replaced_custom_nodes": replaced,
              "evaluation": {"split": cfg.data.evaluation.split, "run_limit": cfg.data.evaluation.limit,
                             "images": len(pixels), "selection": "the seeded subset data.evaluation.limit picks"}}
    result.update(check_export(qmodel, runnable_path, pixels, labels, batch_size=batch_size, threads=threads))
    if backend == "tensorrt":
        result["tensorrt_files"] = _tensorrt_export(qmodel, cfg, pixels[:1], out_dir, name)
    result["versions"] = _versions()
    with open(os.path.join(out_dir, "export_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ptqkit.tools.export",
                                     description="Export a run's quantized model to ONNX and check it.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding quantized_model.pt")
    parser.add_argument("--backend", default="academic", choices=BACKENDS,
                        help="MQBench deploy backend (onnx_qnn is broken in mqbench-torch2 0.1.1 and says so)")
    parser.add_argument("--images", type=int, default=1000, help="evaluation images for the check (default 1000)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/export)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (0 = default)")
    parser.add_argument("--min-agreement", type=float, default=99.5,
                        help="top-1 agreement (%%) below which the check fails (exit 1)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    r = export_run(args.run_dir, backend=args.backend, images=args.images, out_dir=args.out, threads=args.threads)
    ok = r["top1_agreement_pct"] >= args.min_agreement
    print(f"{r['model']} {r['bits']} {r['algorithm']}: onnxruntime vs PyTorch fake-quant on {r['images']} images: "
          f"top-1 agreement {r['top1_agreement_pct']:.2f} % ({r['disagreements']} differ), max |logit diff| "
          f"{r['max_abs_logit_diff']:.3g}, top-1 {r['top1_onnxruntime']:.2f} % vs {r['top1_pytorch']:.2f} % "
          f"-> {'PASS' if ok else 'FAIL'} (>= {args.min_agreement} %)")
    print("wrote " + ", ".join([r["onnx_mqbench_academic"], r["onnx_checked"],
                                os.path.join(os.path.dirname(r["onnx_checked"]), "export_check.json")]
                               + r.get("tensorrt_files", [])))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli(main))
