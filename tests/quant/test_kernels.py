"""The quantizer backend's fused kernels (ptqkit/quant/kernels.py, fakequant.c) on real ResNet-20 activations and
weights: the C kernels equal the torch reference element for element; the reference is the documented STE/LSQ and
AdaRound formulas (checked in float64 and against MQBench's own autograd formulas); masks follow the keep
probability and depend only on their key; the fused Adam is torch's Adam. And the CPU heap setting the engine runs
under is scoped and restored."""
import shutil

import pytest
import torch
from mqbench.fake_quantize.adaround_quantizer import adaround_forward
from mqbench.fake_quantize.qdrop_quantizer import _fake_quantize_learnable_per_tensor_affine_training as mq_fq

from ptqkit.quant.quantizers import LearnedRounding
from ptqkit.algorithms import heap
from ptqkit.quant import kernels

pytestmark = pytest.mark.cifar10

native = pytest.mark.skipif(kernels.library() is None, reason="fused kernels not built (no C compiler)")


@pytest.fixture(scope="module")
def post_relu(resnet20, cifar_calib):
    """layer1.0's first ReLU output (>= 0, many exact zeros) on 32 calibration images, and a 4-bit step for it."""
    seen = []
    handle = resnet20.layer1[0].relu1.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            resnet20(cifar_calib[:32])
    finally:
        handle.remove()
    x = seen[0]
    return x, torch.tensor([float(x.quantile(0.999)) / 15])


def test_kernels_build_where_a_compiler_is():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the torch reference runs instead")
    assert kernels.library() is not None


def formula(x, scale, z, qmin, qmax, keep, stop_at_bounds=False):
    """The STE / LSQ formula, element by element in float64: output, d out / dx, d out / ds. `stop_at_bounds`: an
    element rounded onto qmin or qmax counts as clipped."""
    x, s = x.double(), float(scale)
    r = torch.round(x / s)
    inside = (r + z > qmin) & (r + z < qmax) if stop_at_bounds else (r + z >= qmin) & (r + z <= qmax)
    qc = torch.clamp(r + z, qmin, qmax) - z
    out, dx, ds = qc * s, inside.double(), torch.where(inside, r - x / s, qc)
    if keep is not None:
        out, dx, ds = torch.where(keep, out, x), torch.where(keep, dx, 1.0), torch.where(keep, ds, 0.0)
    return out, dx, ds


@pytest.mark.parametrize("keep_prob", [1.0, 0.5])
@pytest.mark.parametrize("zero_point", [0.0, 3.0])
@pytest.mark.parametrize("path", ["native", "reference"])
@pytest.mark.parametrize("stop_at_bounds", [False, True])
def test_fake_quant_is_the_ste_lsq_formula(post_relu, keep_prob, zero_point, path, stop_at_bounds, monkeypatch):
    if path == "native" and kernels.library() is None:
        pytest.skip("fused kernels not built")
    if path == "reference":
        monkeypatch.setattr(kernels, "_native", lambda *t: False)
    x, scale = post_relu
    torch.manual_seed(0)
    grad = torch.randn_like(x)
    xr, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
    torch.manual_seed(7)
    key = kernels.new_key()
    torch.manual_seed(7)   # act_fake_quant draws the same key
    out = kernels.act_fake_quant(xr, s, torch.tensor([zero_point]), 0, 15, keep_prob, stop_at_bounds)
    out.backward(grad)
    keep = kernels.keep_mask(x.shape, keep_prob, "cpu", key=key) if keep_prob < 1 else None
    ref_out, ref_dx, ref_ds = formula(x, scale, zero_point, 0, 15, keep, stop_at_bounds)
    assert torch.allclose(out.double(), ref_out, rtol=0, atol=1e-6)
    assert torch.equal(xr.grad.double(), grad.double() * ref_dx)
    assert s.grad.item() == pytest.approx(float((grad.double() * ref_ds).sum()), rel=1e-5)
    # the clamp is really exercised: values above the range, and (with z) the zeros below it
    assert (ref_dx == 0).any() and (x / scale > 15 - zero_point).any()


@native
@pytest.mark.parametrize("keep_prob", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("stop_at_bounds", [False, True])
def test_native_equals_reference_element_for_element(post_relu, keep_prob, stop_at_bounds):
    x, scale = post_relu
    x = x * 1.7 - 0.4   # values on both sides of the range
    thr, key = kernels.threshold(keep_prob), 12345
    for train in (False, True):
        out, code = kernels._forward(x, scale, -3.0, 12.0, key, thr, train, stop_at_bounds)
        ref_out, ref_code = kernels._reference_forward(x, scale, -3.0, 12.0, key, thr, train, stop_at_bounds)
        assert torch.equal(out, ref_out)
        if train:
            assert torch.equal(code, ref_code)
    grad = torch.randn_like(x)
    gx = torch.empty_like(x)
    gs = kernels.library().ptq_fq_backward(code.data_ptr(), grad.data_ptr(), gx.data_ptr(), x.numel(), 1, 2)
    ref_gx, ref_gs = kernels._reference_backward(ref_code, grad, True)
    assert torch.equal(gx, ref_gx)
    # float lanes against a double sum: the error is relative to the summed magnitudes, not to the (cancelling) sum
    clamped = ref_code.abs() > kernels.CODE_OFFSET / 2
    ds = torch.where(clamped, ref_code - torch.sign(ref_code) * kernels.CODE_OFFSET, ref_code)
    assert abs(gs - float(ref_gs)) <= 1e-6 * float((ds.double() * grad.double()).abs().sum())
    mask = kernels.keep_mask(x.shape, keep_prob, "cpu", key=key)
    assert torch.equal(mask, (kernels.draws(x.numel(), key, "cpu") < thr).view(x.shape))


@pytest.mark.parametrize("stop_at_bounds", [False, True])
def test_per_channel_activations_follow_the_same_formula(post_relu, stop_at_bounds):
    from ptqkit.quant.quantizers import ActQuantizer
    from mqbench.observer import MinMaxObserver
    x, scale = post_relu
    channels = x.shape[1]
    q = ActQuantizer(MinMaxObserver, quant_min=0, quant_max=15, ch_axis=1, qscheme=torch.per_channel_affine)
    q.scale = torch.nn.Parameter(scale.repeat(channels) * torch.linspace(0.5, 1.5, channels))
    q.zero_point = torch.zeros(channels, dtype=torch.int)
    q.bound_grad = "stop" if stop_at_bounds else "pass"
    q.disable_observer()
    q.enable_fake_quant()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    xr = x.clone().requires_grad_()
    q(xr).backward(grad)
    for c in (0, channels // 2, channels - 1):
        ref_out, ref_dx, ref_ds = formula(x[:, c], q.scale[c].detach(), 0.0, 0, 15, None, stop_at_bounds)
        # d/dx of (x / s + const) · s: one rounding in float32
        assert torch.allclose(xr.grad[:, c].double(), grad[:, c].double() * ref_dx, rtol=1e-6, atol=0)
        assert q.scale.grad[c].item() == pytest.approx(float((grad[:, c].double() * ref_ds).sum()), rel=1e-5, abs=1e-4)


def torch_clamp_stops_at_bounds() -> bool:
    """Whether this torch's clamp gives gradient 0 to a value exactly on its bound (pytorch/pytorch#184574; 1 before)."""
    v = torch.zeros(1, requires_grad=True)
    torch.clamp(v, 0.0, 1.0).sum().backward()
    return v.grad.item() == 0.0


def test_fake_quant_agrees_with_mqbench_autograd(post_relu):
    """MQBench's formula, round_ste(x / s) then torch.clamp, takes its treatment of the values rounded exactly onto
    qmin or qmax from torch's clamp: on a torch whose clamp stops the gradient at its bounds it is
    bound_grad "stop" on every element; on one that passes it, it is "pass" except where round_ste's
    (round(v) - v) + v lands an ulp outside the range (those elements are left out of the comparison)."""
    x, scale = post_relu
    zp = torch.tensor([3.0])
    level = torch.round(x / scale) + zp
    at_end = (level == 0) | (level == 15)
    assert at_end.float().mean() > 0.001  # the elements where the conventions differ are really there
    stop = torch_clamp_stops_at_bounds()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    if not stop:
        grad = grad.masked_fill_(at_end, 0.0)
    grads = []
    for fn in (lambda x, s: kernels.act_fake_quant(x, s, zp, 0, 15, stop_at_bounds=stop),
               lambda x, s: mq_fq(x, s, zp, 0, 15)):
        xr, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
        out = fn(xr, s)
        out.backward(grad)
        grads.append((out.detach(), xr.grad, s.grad))
    (o1, gx1, gs1), (o2, gx2, gs2) = grads
    assert torch.equal(o1, o2)
    assert torch.allclose(gx1, gx2, rtol=1e-5, atol=0)
    assert gs1.item() == pytest.approx(gs2.item(), rel=1e-4)


def test_bound_conventions_differ_on_real_activations(post_relu):
    """At 2 bits most post-ReLU values round onto 0 or 3: the two conventions give different step gradients, and
    "stop" passes no gradient to any of those elements."""
    x, _ = post_relu
    scale = torch.tensor([float(x.quantile(0.99)) / 3])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for stop in (False, True):
        xr, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
        kernels.act_fake_quant(xr, s, torch.tensor([0.0]), 0, 3, stop_at_bounds=stop).backward(grad)
        results[stop] = (xr.grad, s.grad.item())
    level = torch.round(x / scale).clamp(0, 3)
    on_bounds = (level == 0) | (level == 3)
    assert on_bounds.float().mean() > 0.5
    assert torch.equal(results[True][0][on_bounds], torch.zeros(int(on_bounds.sum())))
    assert (results[False][0][on_bounds & (x / scale < 3)] != 0).any()
    assert results[True][1] != pytest.approx(results[False][1], rel=0.05)


def test_keep_mask_follows_the_probability_and_its_key():
    for p in (0.5, 0.25, 0.9):
        m = kernels.keep_mask((256, 1024), p, "cpu", key=99)
        assert abs(m.float().mean().item() - p) < 0.005
        assert torch.equal(m, kernels.keep_mask((256, 1024), p, "cpu", key=99))
    a, b = kernels.keep_mask((4096,), 0.5, "cpu", key=1), kernels.keep_mask((4096,), 0.5, "cpu", key=2)
    assert 0.45 < (a == b).float().mean().item() < 0.55   # different keys: unrelated masks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.keep_mask((300000,), 0.5, "cpu", key=5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, kernels.keep_mask((300000,), 0.5, "cpu", key=5))   # thread count changes nothing


def test_mix_rows_takes_each_element_from_one_side(cifar_calib):
    a, b = cifar_calib[:64], -cifar_calib[:64] - 10
    rows = torch.tensor([5, 0, 63, 5])
    mixed = kernels.mix_rows(a, b, rows, 0.5, "cpu", key=3)
    keep = kernels.keep_mask(mixed.shape, 0.5, "cpu", key=3)
    assert torch.equal(mixed, torch.where(keep, a[rows], b[rows]))


@pytest.fixture(scope="module")
def layer_weights(resnet20):
    """layer2.0's two convs, quantized 2-bit per channel (real weights)."""
    from conftest import base_tree
    from ptqkit.algorithms.base import RunContext
    from ptqkit.algorithms.registry import get_algorithm
    from ptqkit.config import validate
    cfg = validate(base_tree(quant={"w": {"bits": 2}}, algorithm={"name": "qdrop"}))
    method = get_algorithm("qdrop")(cfg.algorithm)
    ctx = RunContext(cfg, resnet20, torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.device("cpu"),
                     show_progress=False)
    qmodel, _ = method.prepare(ctx)
    from ptqkit.quant.quantizers import calibration_mode
    with calibration_mode(qmodel), torch.no_grad():
        qmodel(torch.zeros(1, 3, 32, 32))
    layers = [(qmodel.get_submodule(n), qmodel.get_submodule(n).weight_fake_quant)
              for n in ("layer2.0.conv1", "layer2.0.conv2")]
    return layers


@pytest.mark.parametrize("path", ["native", "reference"])
def test_learned_rounding_is_mqbench_adaround(layer_weights, path, monkeypatch):
    if path == "native" and kernels.library() is None:
        pytest.skip("fused kernels not built")
    if path == "reference":
        monkeypatch.setattr(kernels, "_native", lambda *t: False)
    rounding = LearnedRounding(layer_weights)
    with torch.no_grad():
        rounding.alpha.add_(torch.randn(rounding.alpha.shape, generator=torch.Generator().manual_seed(0)))
    beta = 7.0
    with rounding.installed(beta) as penalty:
        soft = [wq.soft_weight for _, wq in layer_weights]
        (sum((w * w).sum() for w in soft) + penalty).backward()
    grad = rounding.alpha.grad.clone()
    # MQBench's formulas through autograd, layer by layer, on views of the same V
    alpha = rounding.alpha.detach().clone().requires_grad_()
    offsets = [0, rounding.sizes[0]]
    refs, penalty_ref = [], 0.0
    for (layer, wq), o, n in zip(layer_weights, offsets, rounding.sizes):
        a = alpha[o:o + n].view(layer.weight.shape)
        refs.append(adaround_forward(layer.weight, wq.scale, wq.zero_point.long(), wq.quant_min, wq.quant_max,
                                     wq.ch_axis, a, 1.1, -0.1))
        h = torch.clamp(torch.sigmoid(a) * 1.2 + (-0.1), 0, 1)
        penalty_ref = penalty_ref + (1 - (2 * h - 1).abs().pow(beta)).sum()
    (sum((w * w).sum() for w in refs) + penalty_ref).backward()
    for w, ref in zip(soft, refs):
        assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-6)
    assert float(penalty.detach()) == pytest.approx(float(penalty_ref), rel=1e-5)
    assert torch.allclose(grad, alpha.grad, rtol=1e-4, atol=1e-6)
    # hard rounding: MQBench's get_hard_value, bit for bit
    for w, (layer, wq), o, n in zip(rounding.hard_weights(), layer_weights, offsets, rounding.sizes):
        ref = adaround_forward(layer.weight, wq.scale, wq.zero_point.long(), wq.quant_min, wq.quant_max, wq.ch_axis,
                               rounding.alpha.detach()[o:o + n].view(layer.weight.shape), 1.1, -0.1, hard_value=True)
        assert torch.equal(w, ref)


@pytest.mark.parametrize("path", ["native", "reference"])
def test_adam_is_torch_adam(path, monkeypatch):
    if path == "native" and kernels.library() is None:
        pytest.skip("fused kernels not built")
    if path == "reference":
        monkeypatch.setattr(kernels, "_native", lambda *t: False)
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5000, generator=gen)), torch.nn.Parameter(torch.rand(1, generator=gen))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = kernels.Adam([{"params": [ours[0]], "lr": 1e-3}, {"params": [ours[1]], "lr": 4e-5}])
    ref = torch.optim.Adam([{"params": [theirs[0]], "lr": 1e-3}, {"params": [theirs[1]], "lr": 4e-5}])
    for step in range(50):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for o, t, g in zip(ours, theirs, grads):
            o.grad, t.grad = g.clone(), g.clone()
        opt.param_groups[1]["lr"] = ref.param_groups[1]["lr"] = 4e-5 * (1 - step / 50)
        opt.step()
        ref.step()
    for o, t in zip(ours, theirs):
        assert torch.allclose(o, t, rtol=1e-5, atol=1e-7)


def test_retained_heap_is_scoped_and_nests():
    if heap._glibc() is None:
        pytest.skip("not glibc")
    assert heap._depth[0] == 0
    with heap.retained_heap() as on:
        assert on and heap._depth[0] == 1
        with heap.retained_heap() as inner:  # nested scopes leave the outer one in charge
            assert inner and heap._depth[0] == 1
        assert heap._depth[0] == 1
        big = torch.ones(64 * 2 ** 20 // 4)  # above glibc's largest mmap threshold: from the heap here
        assert float(big.sum()) == big.numel()
        del big
    assert heap._depth[0] == 0
    with heap.retained_heap(enabled=False) as on:
        assert not on and heap._depth[0] == 0
