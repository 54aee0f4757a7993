"""The activation fake-quant node reconstruction trains through (`_LsqDropFn`), on real ResNet-20 activations:
it is the documented STE/LSQ formula exactly, and MQBench's autograd formula up to MQBench's own rounding fuzz at
the ends of the integer range. And the CPU heap setting the engine runs under is scoped and restored."""
import pytest
import torch
from mqbench.fake_quantize.qdrop_quantizer import _fake_quantize_learnable_per_tensor_affine_training as mq_fq

from algorithms.quantizers import _LsqDropFn, keep_mask
from ptqkit import heap


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


def formula(x, scale, z, qmin, qmax, mask):
    """The formula of _LsqDropFn's docstring, element by element in float64."""
    x, s = x.double(), float(scale)
    r = torch.round(x / s)
    inside = (r + z >= qmin) & (r + z <= qmax)
    qc = torch.clamp(r + z, qmin, qmax) - z
    out, dx, ds = qc * s, inside.double(), torch.where(inside, r - x / s, qc)
    if mask is not None:
        out, dx, ds = torch.where(mask, out, x), torch.where(mask, dx, 1.0), torch.where(mask, ds, 0.0)
    return out, dx, ds


@pytest.mark.parametrize("keep_prob", [1.0, 0.5])
@pytest.mark.parametrize("zero_point", [0.0, 3.0])
def test_fake_quant_node_is_the_ste_lsq_formula(post_relu, keep_prob, zero_point):
    x, scale = post_relu
    torch.manual_seed(0)
    mask = keep_mask(x.shape, keep_prob, x.device) if keep_prob < 1 else None
    grad = torch.randn_like(x)
    x = x.clone().requires_grad_()
    s = scale.clone().requires_grad_()
    out = _LsqDropFn.apply(x, s, torch.tensor([zero_point]), 0, 15, mask)
    out.backward(grad)
    ref_out, ref_dx, ref_ds = formula(x.detach(), scale, zero_point, 0, 15, mask)
    assert torch.allclose(out.double(), ref_out, rtol=0, atol=1e-6)
    assert torch.equal(x.grad.double(), grad.double() * ref_dx)
    ref_grad_s = float((grad.double() * ref_ds).sum())
    assert s.grad.item() == pytest.approx(ref_grad_s, rel=1e-4)
    # the clamp is really exercised: values above the range, and (with z) the zeros below it
    assert (ref_dx == 0).any() and (x.detach() / scale > 15 - zero_point).any()


def test_fake_quant_node_agrees_with_mqbench_autograd(post_relu):
    """MQBench's round_ste computes (round(v) - v) + v, which can land an ulp outside [qmin, qmax] for a value
    rounding exactly onto an end, and then counts it as clamped: the upstream gradient is zero on such elements
    here, so both must agree everywhere else (up to the rounding of MQBench's (g / s) * s)."""
    x, scale = post_relu
    zp = torch.tensor([3.0])
    level = torch.round(x / scale) + zp
    at_end = (level == 0) | (level == 15)
    assert at_end.float().mean() > 0.001  # the fuzz really is there to avoid
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).masked_fill_(at_end, 0.0)
    grads = []
    for fn in (lambda x, s: _LsqDropFn.apply(x, s, zp, 0, 15, None), lambda x, s: mq_fq(x, s, zp, 0, 15)):
        xr, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
        out = fn(xr, s)
        out.backward(grad)
        grads.append((out.detach(), xr.grad, s.grad))
    (o1, gx1, gs1), (o2, gx2, gs2) = grads
    assert torch.allclose(o1, o2, rtol=0, atol=1e-6)
    assert torch.allclose(gx1, gx2, rtol=1e-5, atol=0)
    assert gs1.item() == pytest.approx(gs2.item(), rel=1e-4)


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
