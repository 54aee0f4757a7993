"""Per-layer settings (`quant.layers`, ptqkit.quant.layer_bits): the quantizers carry the bits the entries give them,
later entries win, the 8-bit conventions keep their layers unless an entry names one exactly, `a` is the quantizer on
the layer's input (shared where layers read the same value), learned rounding uses each layer's own grid, a
pattern matching nothing is one line with exit status 2, and a dry run prints the per-layer table."""
import os

import pytest
import torch
import yaml

from conftest import base_tree, run_main
from ptqkit.config import validate
from ptqkit.errors import ConfigError
from ptqkit.quant import layer_bits
from ptqkit.quant.prepare import prepare_quantized

pytestmark = pytest.mark.cifar10


def _prepare(model, layers, **quant):
    cfg = validate(base_tree(quant={"layers": layers, **quant}))
    return prepare_quantized(model, cfg.quant)


def _w_bits(gm) -> dict:
    return {name: gm.get_submodule(name).weight_fake_quant.bitwidth for name in layer_bits.weight_layers(gm)}


def _a_bits(gm) -> dict:
    modules = dict(gm.named_modules())
    return {layer: [modules[q].bitwidth for q in qs] for layer, qs in layer_bits.input_quantizers(gm).items()}


def test_entries_apply_in_order_and_globs_leave_the_conventions(resnet20):
    gm, layout = _prepare(resnet20, [{"match": "*", "w": {"bits": 2}}, {"match": "layer3.*", "w": {"bits": 8}},
                                     {"match": "layer2.?.conv1", "a": {"bits": 3}}])
    w = _w_bits(gm)
    assert w["conv1"] == 8 and w["linear"] == 8               # first / last: the conventions, a glob leaves them
    assert all(w[n] == 8 for n in w if n.startswith("layer3."))  # the later entry wins
    assert all(w[n] == 2 for n in w if n.startswith(("layer1.", "layer2.")))
    a = _a_bits(gm)
    assert a["layer2.0.conv1"] == [3] and a["layer2.2.conv1"] == [3] and a["layer2.0.conv2"] == [4]
    assert a["conv1"] == [8] and a["linear"] == [8]           # network input, last layer's input
    q = gm.get_submodule("layer1.0.conv1").weight_fake_quant
    assert (q.quant_min, q.quant_max) == (0, 3) and q.activation_post_process.quant_max == 3
    assert set(layout.layer_act_quantizers) == {"layer1_2_relu2_post_act_fake_quantizer",
                                                "layer2_0_relu2_post_act_fake_quantizer",
                                                "layer2_1_relu2_post_act_fake_quantizer"}


def test_later_entry_wins_key_by_key(resnet20):
    gm, _ = _prepare(resnet20, [{"match": "layer1.0.conv1", "w": {"bits": 3, "per_channel": False}},
                                {"match": "layer1.*", "w": {"bits": 6}}])
    q = gm.get_submodule("layer1.0.conv1").weight_fake_quant
    assert q.bitwidth == 6 and not q.is_per_channel          # bits from the later entry, per_channel kept


def test_an_exact_name_overrides_the_conventions(resnet20):
    gm, _ = _prepare(resnet20, [{"match": "conv1", "w": {"bits": 4}, "a": {"bits": 6}},
                                {"match": "linear", "w": {"bits": 3}, "a": {"bits": 5}}])
    assert _w_bits(gm)["conv1"] == 4 and _w_bits(gm)["linear"] == 3
    assert _a_bits(gm)["conv1"] == [6] and _a_bits(gm)["linear"] == [5]
    # a glob matching them leaves them at the conventions' 8 bits
    gm, _ = _prepare(resnet20, [{"match": "conv*", "w": {"bits": 4}, "a": {"bits": 6}},
                                {"match": "lin*", "w": {"bits": 3}, "a": {"bits": 5}}])
    assert _w_bits(gm)["conv1"] == 8 and _w_bits(gm)["linear"] == 8
    assert _a_bits(gm)["conv1"] == [8] and _a_bits(gm)["linear"] == [8]
    # a convention set to null fixes nothing: the glob then reaches the layer
    gm, _ = _prepare(resnet20, [{"match": "conv*", "w": {"bits": 3}}], first_layer_w_bits=None)
    assert _w_bits(gm)["conv1"] == 3


def test_per_channel_symmetric_and_observer_build_a_new_quantizer(resnet20, cifar_calib):
    from ptqkit.quant import prepare as pq
    gm, _ = _prepare(resnet20, [{"match": "layer1.0.conv1", "w": {"bits": 2, "per_channel": False,
                                                                   "observer": "minmax", "symmetric": True},
                                 "a": {"bits": 8, "observer": "minmax"}}])
    layer = gm.get_submodule("layer1.0.conv1")
    wq = layer.weight_fake_quant
    assert type(wq.activation_post_process).__name__ == "MinMaxObserver" and not wq.is_per_channel
    assert (wq.quant_min, wq.quant_max) == (-2, 1)
    aq = gm.get_submodule(layer_bits.input_quantizers(gm)["layer1.0.conv1"][0])
    assert type(aq.activation_post_process).__name__ == "MinMaxObserver" and aq.bitwidth == 8
    other = gm.get_submodule("layer1.0.conv2").weight_fake_quant
    assert other.is_per_channel and type(other.activation_post_process).__name__ == "HistogramMSEObserver"
    pq.calibrate(gm, cifar_calib[:32], 32, "cpu")
    assert wq.scale.numel() == 1 and other.scale.numel() == 16
    w = wq(layer.weight).detach()
    assert len(torch.unique(torch.round(w / wq.scale))) <= 4        # a 2-bit grid


def test_a_is_the_shared_quantizer_on_the_layers_input():
    """torchvision ResNet-18: a downsampling block's input feeds its first conv and its downsample conv through one
    quantizer; `a` of either sets it for both, and the table says so."""
    from ptqkit.models import build_model
    model = build_model("resnet18").eval()
    entries = [{"match": "layer2.0.downsample.0", "a": {"bits": 6}}]
    gm, layout = _prepare(model, entries)
    qs = layer_bits.input_quantizers(gm)
    assert qs["layer2.0.downsample.0"] == qs["layer2.0.conv1"]
    assert _a_bits(gm)["layer2.0.conv1"] == [6] and _a_bits(gm)["layer2.0.conv2"] == [4]
    applied = layer_bits.apply_record(gm, layout, validate(base_tree(quant={"layers": entries})).quant)
    table = layer_bits.format_table(layer_bits.layer_records(gm, layout, applied))
    row = next(line for line in table.splitlines() if line.startswith("layer2.0.conv1 "))
    assert "input shared with layer2.0.downsample.0" in row and "a from layers[0]" in row


def test_learned_rounding_uses_each_layers_own_grid(resnet20, cifar_calib):
    from ptqkit.quant import prepare as pq
    from ptqkit.quant.quantizers import LearnedRounding
    gm, _ = _prepare(resnet20, [{"match": "layer1.0.conv1", "w": {"bits": 2}},
                                {"match": "layer1.0.conv2", "w": {"bits": 6}}])
    pq.calibrate(gm, cifar_calib[:32], 32, "cpu")
    layers = [gm.get_submodule(n) for n in ("layer1.0.conv1", "layer1.0.conv2")]
    rounding = LearnedRounding([(m, m.weight_fake_quant) for m in layers])
    his = rounding.hi.split(rounding.sizes)
    assert int(his[0].max()) == 3 and int(his[1].max()) == 63
    with torch.no_grad():
        rounding.alpha.normal_()                                # any learned state: hardening stays on the grid
    rounding.harden()
    for m, bits in zip(layers, (2, 6)):
        q = m.weight_fake_quant
        scale = q.scale.reshape(-1, 1, 1, 1)
        zp = q.zero_point.reshape(-1, 1, 1, 1)
        levels = torch.round(m.weight / scale) + zp
        assert levels.min() >= 0 and levels.max() <= 2 ** bits - 1
        assert torch.allclose(m.weight, (levels - zp) * scale, atol=1e-6)


def test_pattern_matching_no_layer_is_refused(resnet20):
    with pytest.raises(ConfigError) as err:
        _prepare(resnet20, [{"match": "layer1.*", "w": {"bits": 3}}, {"match": "layer9.*", "w": {"bits": 3}}])
    assert str(err.value) == ("config key 'quant.layers[1].match': expected a pattern matching a conv/linear layer "
                              "of CifarResNet (20 layers: conv1, layer1.0.conv1, layer1.0.conv2, ..., linear), got "
                              "'layer9.*'")


def test_activation_settings_are_refused_for_weight_only():
    with pytest.raises(ConfigError) as err:
        validate(base_tree(quant={"a": {"bits": None}, "layers": [{"match": "conv1", "a": {"bits": 8}}]}))
    assert str(err.value).startswith("config key 'quant.layers[0].a': expected no activation settings")


def _cli(tmp_path, capsys, tree, *args) -> tuple[int, str, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return run_main(capsys, "--config", str(path), "--quiet", *args)


def test_cli_refuses_a_pattern_matching_nothing_in_one_line(tmp_path, capsys):
    tree = base_tree(quant={"layers": [{"match": "features.1.conv.*", "w": {"bits": 2}}]},
                     runtime={"output_dir": str(tmp_path / "run"), "device": "cpu"})
    status, _, err = _cli(tmp_path, capsys, tree)
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        "error: config key 'quant.layers[0].match': expected a pattern matching a conv/linear layer of "
        "cifar_resnet20 (20 layers: conv1, layer1.0.conv1, layer1.0.conv2, ..., linear), got 'features.1.conv.*'")
    assert "Traceback" not in err and not os.path.exists(tmp_path / "run")


def test_dry_run_prints_the_per_layer_table(tmp_path, capsys):
    tree = base_tree(quant={"layers": [{"match": "layer3.*", "w": {"bits": 8}},
                                       {"match": "layer1.0.conv1", "w": {"bits": 2, "per_channel": False},
                                        "a": {"bits": 8}}]})
    tree["data"]["calibration"]["num_images"] = 8
    status, out, err = _cli(tmp_path, capsys, tree, "--dry-run")
    assert status == 0, err[-2000:]
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("per-layer quantization (20 conv/linear"))
    rows = {line.split()[0]: line.split() for line in lines[head + 2:head + 22]}
    assert len(rows) == 20 and list(rows)[0] == "conv1" and list(rows)[-1] == "linear"
    # layer, type, params, MACs, w bits, per-channel, a bits, notes...
    assert rows["conv1"][2:7] == ["432", "442,368", "8", "yes", "8"] and "first" in rows["conv1"]
    assert rows["layer1.0.conv1"][4:7] == ["2", "no", "8"]
    assert rows["layer3.2.conv2"][2:7] == ["36,864", "2,359,296", "8", "yes", "4"]
    assert rows["layer2.0.conv1"][4:7] == ["4", "yes", "4"]
    assert rows["linear"][4:7] == ["8", "yes", "8"] and "last" in rows["linear"]
    assert any(line.startswith("size: 268,336 weights, average ") for line in lines)


# ------------------------------------------------------------------------------------------ every method
SHORT = {"iters": 3, "log_every": 1, "act_init_images": 16}
METHODS = [
    ("naive", {}),
    ("qdrop", SHORT),
    ("ptmq", SHORT),            # switches activation bit-widths: an entry's `a` must stay as the entry says
    ("adaround", SHORT),
    ("brecq", {**SHORT, "act_iters": 2}),
    ("brecq_joint", SHORT),
    ("pdquant", {**SHORT, "dc_steps": 2, "dc_batch": 16}),
    ("mrecg", {**SHORT, "top_k": 2}),
    ("compose", {**SHORT, "preset": "qdrop", "grouping": "mrecg"}),
    ("fdda", {"epochs": 2, "iters_per_epoch": 2, "warmup_epochs": 1, "act_freeze_epoch": 1, "g_width": 16}),
]
FAST_METHODS = {"naive", "qdrop", "ptmq", "adaround", "brecq_joint", "fdda"}
MIXED_LAYERS = [{"match": "layer1.*", "w": {"bits": 2}},
                {"match": "layer2.1.conv1", "w": {"bits": 3, "per_channel": False}},
                {"match": "layer3.2.conv2", "w": {"bits": 8}, "a": {"bits": 6}}]


def _expected_w_bits(name: str) -> int:
    if name in ("conv1", "linear", "layer3.2.conv2"):
        return 8
    return 2 if name.startswith("layer1.") else 3 if name == "layer2.1.conv1" else 4


@pytest.mark.parametrize("name,params", [m if m[0] in FAST_METHODS else pytest.param(*m, marks=pytest.mark.slow)
                                         for m in METHODS])
def test_every_method_returns_the_per_layer_bits(resnet20, cifar_calib, name, params):
    """The model a method returns has each layer's bits and quantized weights on that layer's own grid."""
    from ptqkit import data
    from ptqkit.algorithms.base import RunContext
    from ptqkit.algorithms.registry import get_algorithm
    tree = dict(quant={"layers": MIXED_LAYERS}, algorithm={"name": name, **params})
    if name == "fdda":   # one image per class, the observers its own tests use
        tree["data"] = {"calibration": {"per_class": 1}}
        tree["quant"].update(w={"observer": "minmax"}, a={"observer": "ema_minmax"})
    cfg = validate(base_tree(**tree))
    if name == "fdda":
        images, labels = data.draw_calibration(data.make_splits(cfg.data), cfg.data.calibration)
    else:
        images, labels = cifar_calib[:32], torch.zeros(32, dtype=torch.long)
    torch.manual_seed(1005)
    ctx = RunContext(cfg=cfg, fp_model=resnet20, calib_images=images, calib_labels=labels,
                     device=torch.device("cpu"), show_progress=False)
    qmodel = get_algorithm(name)(cfg.algorithm).run(ctx)
    for layer in layer_bits.weight_layers(qmodel):
        module = qmodel.get_submodule(layer)
        wq = module.weight_fake_quant
        bits = _expected_w_bits(layer)
        assert wq.bitwidth == bits and wq.quant_max - wq.quant_min + 1 == 2 ** bits, layer
        assert wq.is_per_channel == (layer != "layer2.1.conv1"), layer
        shape = [-1] + [1] * (module.weight.dim() - 1) if wq.is_per_channel else [1] * module.weight.dim()
        with torch.no_grad():
            levels = torch.round(wq(module.weight) / wq.scale.reshape(shape)) + wq.zero_point.reshape(shape)
        assert wq.quant_min <= levels.min() and levels.max() <= wq.quant_max, layer
    a = _a_bits(qmodel)
    assert a["layer3.2.conv2"] == [6] and a["conv1"] == [8] and a["linear"] == [8]
    assert a["layer2.0.conv2"] == [4]
