"""The run config: YAML with `_base_` inheritance, `--set` overrides, and validation of the whole tree.

Validation happens before any model or data is touched, so a typo costs a second, not a calibration run.
Relative paths in a config are taken relative to the current working directory (run from the repository root);
`_base_` paths are relative to the file that names them.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from ptqkit import algorithms, assets, mqbench_config  # noqa: F401  (algorithms: registers every shipped method)
from ptqkit import precision
from ptqkit.algorithms.registry import get_algorithm, registered_algorithms
from ptqkit.errors import ConfigError, UserError
from ptqkit.models import available_models
from ptqkit.schema import build, check_field, convert, spec, to_dict

log = logging.getLogger("ptq")

OBSERVERS = ("minmax", "mse", "ema_minmax", "ema_mse", "hist_mse")  # hist_mse: fast MSE search, ptqkit.quant.observers
PRESETS = ("imagenet", "cifar10", "imagenet_pm1")
BACKENDS = ("academic",)
BOUND_GRADS = ("pass", "stop")   # quant.a.bound_grad, docs/MQBENCH_GAP.md


@dataclass
class ModelConfig:
    name: str = spec(doc="model zoo name, e.g. cifar_resnet20, resnet18, mobilenet_v2")
    checkpoint: Optional[str] = spec(None, exists="file",
                                     doc="state_dict file (bare, or a dict holding 'state_dict'/'model'); the names of BRECQ's and "
                                         "timm's released files are recognised and mapped onto the zoo's modules")
    kwargs: dict = spec(factory=dict, doc="keyword arguments of the model builder, e.g. {num_classes: 10}")
    leaf_modules: list[str] = spec(factory=list,
                                   doc="module class names torch.fx must not trace into (for untraceable code)")
    algorithm_defaults: dict = spec(factory=dict, doc="this architecture's values of algorithm keys a config "
                                                      "leaves null, e.g. {weight: 0.1, T: 1.0, lamb_c: 0.005} "
                                                      "(configs/_base_/models): the references tune λ, PD-Quant's "
                                                      "T and lamb_c per architecture")

    def check(self, path):
        if self.name not in available_models():
            raise ConfigError(f"{path}.name", "one of: " + ", ".join(available_models()), self.name)


@dataclass
class CalibrationData:
    split: Optional[str] = spec("train", doc="subfolder of data.root with the calibration images; null = data.root")
    num_images: int = spec(1024, lo=1, doc="images drawn (seeded) from the calibration split")
    batch_size: int = spec(32, lo=1)
    seed: int = spec(1005, lo=0, doc="seed of the calibration draw")
    per_class: Optional[int] = spec(None, lo=1, doc="draw exactly this many images of each class instead")


@dataclass
class EvaluationData:
    split: Optional[str] = spec("test", doc="subfolder of data.root with the evaluation images; null = data.root")
    batch_size: int = spec(256, lo=1)
    workers: int = spec(2, lo=0, hi=64)
    limit: Optional[int] = spec(None, lo=1, doc="evaluate only the first N images (of a fixed seeded order)")
    cache_mb: int = spec(4096, lo=0, doc="hold the decoded evaluation images in memory when they take at most this "
                                         "many MB (CIFAR-10 test: 30; ImageNet val at 224 px: 7,200); larger sets "
                                         "are decoded again at each evaluation")


@dataclass
class DataConfig:
    root: str = spec(exists="dir", doc="dataset root in ImageFolder layout (ImageNet: the folder holding train/ val/)")
    preset: str = spec("imagenet", choices=PRESETS,
                       doc="preprocessing: imagenet (Resize 256, CenterCrop 224, mean/std), cifar10 (mean/std, "
                           "no resize), imagenet_pm1 (ImageNet crop, inputs in [-1, 1])")
    calibration: CalibrationData = spec(factory=CalibrationData)
    evaluation: EvaluationData = spec(factory=EvaluationData)
    calibration_fraction: float = spec(0.5, lo=0.0, hi=1.0,
                                       doc="when calibration and evaluation read the same folder: the seeded "
                                           "share of it kept for calibration (the rest is evaluated)")

    def check(self, path):
        for section in ("calibration", "evaluation"):
            split = getattr(self, section).split
            if split is not None and not os.path.isdir(os.path.join(assets.resolve(self.root), split)):
                raise ConfigError(f"{path}.{section}.split", f"a subfolder of {self.root}", split)
        if self.shared_folder and not 0.0 < self.calibration_fraction < 1.0:
            raise ConfigError(f"{path}.calibration_fraction",
                              "a value strictly between 0 and 1 (calibration and evaluation share a folder)",
                              self.calibration_fraction)

    @property
    def shared_folder(self) -> bool:
        return self.calibration.split == self.evaluation.split


@dataclass
class TensorQuant:
    bits: int = spec(4, lo=2, hi=8)
    per_channel: bool = spec(False)
    symmetric: bool = spec(False)
    observer: str = spec("hist_mse", choices=OBSERVERS,
                         doc="minmax, ema_minmax; mse / ema_mse (MQBench's searches, slow); hist_mse (the same "
                             "search from a histogram, 20-90x faster, ptqkit.quant.observers)")
    p: float = spec(2.0, lo=1.0, hi=4.0, doc="norm of the MSE observers' range search (2.4 in BRECQ/QDrop)")


@dataclass
class ActivationQuant(TensorQuant):
    bits: Optional[int] = spec(4, lo=2, hi=8, doc="null = no activation quantizer anywhere (weight-only "
                                                  "quantization, the W*A32 rows of the AdaRound and BRECQ tables)")
    bound_grad: Optional[str] = spec(None, choices=BOUND_GRADS,
                                     doc="gradient, while steps learn, of an element rounded onto the lowest or "
                                         "highest level: pass = as inside the grid (LSQ; the BRECQ/QDrop code on the "
                                         "torch it was written for); stop = as clipped (what MQBench's formula gets "
                                         "from the clamp of the torch here, 2.14, pytorch/pytorch#184574; "
                                         "docs/MQBENCH_GAP.md); null = the method's own: stop for brecq_joint, pass "
                                         "for the others")


def _weights_default():
    return TensorQuant(bits=4, per_channel=True)


# ------------------------------------------------------------------ per-layer settings, mixed precision
# docs/MIXED_PRECISION.md; applied by ptqkit.quant.layer_bits, the allocation by ptqkit.sensitivity
@dataclass
class LayerTensorQuant:
    """A `quant.layers` entry's weight (`w`) or input-activation (`a`) settings; null keeps what is there."""
    bits: Optional[int] = spec(None, lo=2, hi=8)
    per_channel: Optional[bool] = spec(None)
    symmetric: Optional[bool] = spec(None)
    observer: Optional[str] = spec(None, choices=OBSERVERS)
    p: Optional[float] = spec(None, lo=1.0, hi=4.0)

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class LayerQuant:
    match: str = spec(doc="fnmatch glob on conv/linear module names")
    w: LayerTensorQuant = spec(factory=LayerTensorQuant)
    a: LayerTensorQuant = spec(factory=LayerTensorQuant)

    def check(self, path):
        if not self.match.strip():
            raise ConfigError(f"{path}.match", "a non-empty fnmatch pattern of module names", self.match)
        if not self.w.settings() and not self.a.settings():
            raise ConfigError(path, "an entry that sets something under w or a (bits, per_channel, symmetric, "
                                    "observer, p)", show_actual=False)


MEASURES = ("kl", "top1", "mse", "hessian")


@dataclass
class MixedBudget:
    avg_w_bits: Optional[float] = spec(None, lo=1.0, hi=32.0,
                                       doc="average weight bits over every conv/linear weight, weighted by "
                                           "parameter count (the 8-bit convention layers included)")
    w_bytes: Optional[float] = spec(None, lo=0.0, doc="bytes of every conv/linear weight at its bits (scales, "
                                                      "zero points, biases, BN not counted)")
    bops: Optional[float] = spec(None, lo=0.0, doc="bit-operations per image: sum over conv/linear layers of MACs x "
                                                   "weight bits x input-activation bits (32 where the input is not "
                                                   "quantized); YAML reads 6.5e+8, not 6.5e8, as a number")

    def check(self, path):
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        if len(given) > 1:
            raise ConfigError(path, "one budget (avg_w_bits, w_bytes or bops)", given)

    @property
    def kind(self) -> Optional[str]:
        return next((f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None), None)


@dataclass
class MixedConfig:
    budget: MixedBudget = spec(factory=MixedBudget)
    candidates: list[int] = spec(factory=lambda: [2, 3, 4], lo=2, hi=8,
                                 doc="weight bit-widths a layer may get (layers the 8-bit conventions fix keep "
                                     "theirs and count toward the budget)")
    measure: str = spec("kl", choices=MEASURES,
                        doc="the per-layer cost summed by the allocation: kl (KL divergence of the logits from FP), "
                            "top1 (top-1 drop on the held-out images), mse (of the logits), hessian (HAWQ-v2: "
                            "Hutchinson trace / params x weight quantization error)")
    solver: str = spec("exact", choices=("exact", "greedy"),
                       doc="exact = multiple-choice knapsack by scipy.optimize.milp; greedy = from the fewest bits, "
                           "raise the layer with the largest error per added cost while the budget allows")
    sensitivity: Optional[str] = spec(None, exists="file",
                                      doc="sensitivity.json written by python -m ptqkit.tools.sensitivity (for this "
                                          "model; weight rows at every candidate); null = measured at the start of "
                                          "the run with the settings below")
    calib_images: int = spec(256, lo=1, doc="sensitivity: calibration images whose ranges are observed (the first "
                                            "of the run's calibration draw)")
    eval_images: int = spec(256, lo=1, doc="sensitivity: the next ones, held out, on which KL and top-1 are measured")
    hessian_samples: int = spec(16, lo=1, doc="sensitivity: Hutchinson samples (measure hessian)")

    def check(self, path):
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"{path}.candidates", "a non-empty list of distinct bit-widths", self.candidates)

    @property
    def enabled(self) -> bool:
        return self.budget.kind is not None


@dataclass
class QuantConfig:
    backend: str = spec("academic", choices=BACKENDS, doc="MQBench backend")
    w: TensorQuant = spec(factory=_weights_default, doc="weights")
    a: ActivationQuant = spec(factory=ActivationQuant, doc="activations")
    first_layer_w_bits: Optional[int] = spec(8, lo=2, hi=8, doc="first conv's weight bits; null = w.bits")
    last_layer_w_bits: Optional[int] = spec(8, lo=2, hi=8, doc="last layer's weight bits; null = w.bits")
    last_layer_a_bits: Optional[int] = spec(8, lo=2, hi=8, doc="bits of the last layer's input; null = a.bits")
    input_bits: Optional[int] = spec(8, lo=2, hi=8, doc="bits of the network input (image); null = no quantizer")
    learn_input_step: bool = spec(False, doc="kept for older configs; no method learns the network input "
                                             "quantizer's step either way: a unit learns the steps it produces, "
                                             "and the first unit's input is the image, whose quantizer keeps its "
                                             "calibrated 8-bit step, as in MQBench's loop (docs/MQBENCH_GAP.md)")
    fold_bn: bool = spec(False, doc="fold BN into convs before quantizing (BRECQ/QDrop); Academic keeps BN")
    layers: list[LayerQuant] = spec(factory=list,
                                    doc="per-layer settings, applied in order (later entries win, key by key): "
                                        "{match: GLOB, w: {...}, a: {...}}; match is an fnmatch glob on conv/linear "
                                        "module names (one matching none is refused); w and a take bits, "
                                        "per_channel, symmetric, observer, p (null/absent = unchanged); a = the "
                                        "quantizer(s) on the layer's input (shared with every layer reading the same "
                                        "value); a layer fixed by an 8-bit convention changes only for an entry "
                                        "whose match is its exact name; docs/MIXED_PRECISION.md")
    mixed: MixedConfig = spec(factory=MixedConfig, doc="mixed precision: off unless a budget is given")

    def check(self, path):
        if self.a.bits is None:
            for i, entry in enumerate(self.layers):
                if entry.a.settings():
                    raise ConfigError(f"{path}.layers[{i}].a", "no activation settings (quant.a.bits is null: "
                                      "weight-only quantization has no activation quantizer)", entry.a.settings())


@dataclass
class RuntimeConfig:
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))
    seed: int = spec(1005, lo=0, doc="seed of everything but the calibration draw")
    threads: int = spec(0, lo=0, hi=512, doc="torch CPU threads; 0 = torch's default")
    output_dir: str = spec("runs/default", doc="run folder; an existing one is never overwritten (a suffix is added)")
    save_model: bool = spec(True, doc="save the quantized model (quantizer state, rounded weights)")
    reuse_fp32: bool = spec(True, doc="reuse the FP32 result measured by an earlier run of the same model "
                                      "(architecture and weights), evaluation images (bytes), preset, device kind "
                                      "and torch version (a key in the cache folder, ptqkit.cache); false = "
                                      "measure it again")
    retain_cpu_heap: bool = spec(True, doc="on CPU with glibc, keep freed memory in the heap during reconstruction "
                                           "instead of unmapping it (algorithms/heap.py); false = glibc's default")
    tf32: bool = spec(False, doc="CUDA only: let FP32 convolutions and matmuls run in TF32 (Ampere and later; "
                                 "torch's own default for cuDNN). false = FP32 is FP32, as on the CPU: the FP32 "
                                 "figures and the CPU/CUDA agreement depend on it; true is faster on "
                                 "convolution-bound units, with a 10-bit mantissa in the products")
    deterministic: bool = spec(False, doc="CUDA only: the same results from the same inputs on the same GPU, which "
                                          "bit-exact resume needs there (on the CPU it holds anyway): cuDNN's "
                                          "deterministic algorithms with autotuning off, torch's deterministic "
                                          "mode (an op without a deterministic kernel warns), "
                                          "CUBLAS_WORKSPACE_CONFIG=:4096:8. Costs speed where cuDNN's fastest "
                                          "convolution is not deterministic (python -m ptqkit.tools.gpu_check "
                                          "reports the loop time with it on; docs/GPU.md)")
    compute_dtype: str = spec("float32", choices=tuple(precision.DTYPES),
                              doc="arithmetic of the learning steps: the engine's unit forward and backward (a "
                                  "method's loss terms included), PD-Quant's distribution correction, FDDA's "
                                  "generator and student steps. bfloat16 = under torch.autocast: convolutions and "
                                  "linear layers in bfloat16; the learned rounding variables, steps and weights, "
                                  "their optimiser state, the fake quantization and the losses stay float32, as do "
                                  "caching, evaluation, the saved model and export (docs/RUNNING.md). A run on a "
                                  "device without native bfloat16 (a CPU without AVX512-BF16, AMX or ARM BF16; a "
                                  "GPU before compute capability 8.0) is refused before any work")


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    quant: QuantConfig
    algorithm: Any  # the registered algorithm's own config dataclass, with `name`
    runtime: RuntimeConfig
    custom_imports: list = dataclasses.field(default_factory=list)  # the user's modules, imported before the rest

    def to_dict(self) -> dict:
        return to_dict(self)


SECTIONS = ("model", "data", "quant", "algorithm", "runtime")
TOP_LEVEL = SECTIONS + ("custom_imports",)


def import_custom(modules, search_dirs=()) -> list[str]:
    """Import the user's modules (`custom_imports: [my_methods, ...]`) so that what they register — methods, loss
    terms, models — is known by name before the rest of the config is checked. A module is looked up in
    `search_dirs` (the config file's folder), the working directory, then the usual import path."""
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise ConfigError("custom_imports", "a list of module names", modules)
    extra = [d for d in (*search_dirs, os.getcwd()) if d not in sys.path]
    sys.path[:0] = extra
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name is not None and name.split(".")[0] == exc.name.split(".")[0]:
                    raise ConfigError("custom_imports", "a module found in the config's folder, the working "
                                      "directory or the Python path", name) from None
                raise ConfigError("custom_imports", f"a module that imports cleanly (ModuleNotFoundError: {exc})",
                                  name) from None
            except ConfigError:
                raise
            except Exception as exc:  # the user's module failed while importing: say where, in one line
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ConfigError("custom_imports", f"a module that imports cleanly ({type(exc).__name__}: "
                                  f"{reason})", name) from None
    finally:
        for d in extra:
            sys.path.remove(d)
    return list(modules)


# ---------------------------------------------------------------------------------------------- loading
def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}': not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config file '{path}'{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}': expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """Merge `override` into a copy of `base`; a mapping with `_delete_: true` replaces instead of merging."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and value.get("_delete_"):
            out[key] = {k: v for k, v in value.items() if k != "_delete_"}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_tree(path: str, _seen: tuple = ()) -> dict:
    """Read a config file and everything it inherits through `_base_` (a path or a list of paths)."""
    path = os.path.normpath(path)
    if path in _seen:
        raise UserError(f"config file '{path}': `_base_` inheritance loops back to itself")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("_base_", "a path or a list of paths", bases)
    merged: dict = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        merged = deep_merge(merged, load_yaml_tree(base_path, _seen + (path,)))
    return deep_merge(merged, data)


def apply_overrides(tree: dict, overrides) -> dict:
    """Apply `key.path=value` strings; the value is parsed as YAML (`4`, `true`, `[1, 2]`, `null`)."""
    tree = copy.deepcopy(tree)
    for item in overrides or ():
        if "=" not in item:
            raise UserError(f"--set '{item}': expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "a mapping to set a sub-key in", child)
            node = child
        node[parts[-1]] = value
    return tree


def validate(tree: dict, search_dirs=()) -> Config:
    """Check the whole merged tree and build the typed config. Raises ConfigError on the first problem.
    `search_dirs`: where `custom_imports` modules are looked for first (the config file's folder)."""
    unknown = [k for k in tree if k not in TOP_LEVEL]
    if unknown:
        raise ConfigError(str(unknown[0]), "a known section (one of: " + ", ".join(TOP_LEVEL) + ")",
                          show_actual=False)
    custom = import_custom(tree.get("custom_imports", []), search_dirs)
    for section in SECTIONS:
        if not isinstance(tree.get(section, {}), dict):
            raise ConfigError(section, "a mapping", tree.get(section))
    model = build(ModelConfig, tree.get("model", {}), "model")
    data = build(DataConfig, tree.get("data", {}), "data")
    quant = build(QuantConfig, tree.get("quant", {}), "quant")
    runtime = build(RuntimeConfig, tree.get("runtime", {}), "runtime")
    algo_tree = dict(tree.get("algorithm", {}))
    name = algo_tree.pop("name", "naive")
    algo_cls = get_algorithm(name)
    params = build(algo_cls.Config, algo_cls.expand(algo_tree), "algorithm")
    params.name = name
    apply_algorithm_defaults(params, model.algorithm_defaults)
    cfg = Config(model=model, data=data, quant=quant, algorithm=params, runtime=runtime, custom_imports=custom)
    params.finalize(cfg)
    if quant.a.bound_grad is None:
        quant.a.bound_grad = params.default_bound_grad()
    return cfg


def _keys(config_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls) if f.init}


def apply_algorithm_defaults(params, defaults: dict) -> None:
    """The model's per-architecture values for the algorithm keys this method has and the config left null; a key
    no registered method has is a typo, refused."""
    known = set().union(*(_keys(get_algorithm(n).Config) for n in registered_algorithms()))
    for key, value in defaults.items():
        if key not in known:
            raise ConfigError(f"model.algorithm_defaults.{key}", "a key of some registered algorithm", value)
        if key in _keys(type(params)) and getattr(params, key) is None:
            field = next(f for f in dataclasses.fields(params) if f.name == key)
            hints = typing.get_type_hints(type(params))
            setattr(params, key, convert(value, hints[key], f"model.algorithm_defaults.{key}"))
            check_field(getattr(params, key), field.metadata, f"model.algorithm_defaults.{key}")


def load_config(path: str, overrides=()) -> Config:
    """The validated config of a file: ours, or an MQBench PTQ example config (translated first; `--set` overrides
    then name native keys)."""
    return validate(apply_overrides(load_tree(path), overrides), [os.path.dirname(os.path.abspath(path))])


def load_tree(path: str) -> dict:
    """A config file's merged tree in this toolkit's schema (an MQBench PTQ config is translated)."""
    tree = load_yaml_tree(path)
    if mqbench_config.is_mqbench_config(tree):
        log.info("%s is an MQBench PTQ config: translated (ptqkit.mqbench_config); --dry-run prints the native "
                 "equivalent", path)
        tree = mqbench_config.translate(tree)
    return tree


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
