"""ops.kfac_update_: the fused KL clip, weight decay, momentum and update over all parameters, native
CPU, native CUDA when present and emulated CUDA (two multi-tensor launches) against the reference,
and the reference against torch.optim.SGD."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import natgrad_cuda as ng
from natgrad_cuda import emulation

SHAPES = [(3, 4), (1,), (8193,), (64, 129), (0,), (7, 1, 3)]


def make(shapes, dtype, seed, momentum=True):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda s: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    params = [rnd(s) for s in shapes]
    grads = [rnd(s) for s in shapes]
    directions = [g * 2 + rnd(s) * 0.1 for g, s in zip(grads, shapes)]  # roughly aligned: <d, g> > 0
    bufs = [rnd(s) for s in shapes] if momentum else []
    clipped = [i % 2 == 0 for i in range(len(shapes))]
    return params, directions, grads, bufs, clipped


def run(impl, args, lr, momentum, wd, kl, device="cpu"):
    """The update on copies of args on ``device``; the parameters and buffers after it back on the CPU."""
    params, directions, grads, bufs, clipped = [[t.clone().to(device) for t in x] if i < 4 else x
                                                for i, x in enumerate(args)]
    nu = ng.ops.kfac_update_(params, directions, grads, bufs, clipped, lr, momentum, wd, kl, impl=impl)
    return [p.cpu() for p in params], [b.cpu() for b in bufs], nu


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kl", [0.0, 1e-3, 1e6])
def test_kernels_match_the_reference(impl, dtype, kl, device, tol):
    args = make(SHAPES, dtype, 0)
    p_ref, b_ref, nu_ref = run("reference", args, 0.1, 0.9, 1e-2, kl)
    p, b, nu = run(impl, args, 0.1, 0.9, 1e-2, kl, device)
    assert nu.dtype == torch.float64 and nu.shape == ()
    assert math.isclose(float(nu), float(nu_ref), rel_tol=1e-12)
    if kl == 1e-3:
        assert float(nu) < 1.0  # the clip is active
    bound = tol({torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype], dtype)
    for x, y in zip(p + b, p_ref + b_ref):
        assert x.dtype == dtype
        if y.numel():
            assert (x.double() - y.double()).abs().max() <= bound * y.double().abs().max().clamp_min(1.0)


def test_reference_is_sgd_after_the_clip():
    """kl_clip off: torch.optim.SGD's step (momentum buffers starting at zero = SGD's first step), up to
    rounding (torch fuses the alpha multiplications differently)."""
    params, directions, grads, _, clipped = make(SHAPES, torch.float64, 1)
    bufs = [torch.zeros_like(p) for p in params]
    torch_params = [p.clone().requires_grad_() for p in params]
    sgd = torch.optim.SGD(torch_params, lr=0.05, momentum=0.8, weight_decay=0.01)
    for _ in range(3):
        for tp, d in zip(torch_params, directions):
            tp.grad = d.clone()
        sgd.step()
        ng.ops.kfac_update_(params, directions, grads, bufs, clipped, 0.05, 0.8, 0.01, 0.0, impl="reference")
    for p, tp in zip(params, torch_params):
        assert torch.allclose(p, tp.detach(), rtol=1e-14, atol=1e-15)


def test_nu_formula_and_no_momentum(device, kernel_impls):
    params, directions, grads, _, clipped = make(SHAPES, torch.float64, 2, momentum=False)
    vg = sum(float(torch.vdot(d.reshape(-1), g.reshape(-1))) for d, g, c in zip(directions, grads, clipped) if c)
    lr, kl = 0.3, 1e-2
    expect = min(1.0, math.sqrt(kl / (lr * lr * vg)))
    for impl in ("reference",) + kernel_impls:
        p, _, nu = run(impl, (params, directions, grads, [], clipped), lr, 0.0, 0.0, kl, device)
        assert math.isclose(float(nu), expect, rel_tol=1e-12)
        for x, p0, d, c in zip(p, params, directions, clipped):
            assert torch.allclose(x, p0 - lr * (expect if c else 1.0) * d, rtol=1e-12, atol=1e-14)


# the device fixtures (conftest.py) hold no state: the examples may share them
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 20000), min_size=1, max_size=5), seed=st.integers(0, 99),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), kl=st.sampled_from([0.0, 1e-4, 1.0]))
def test_fuzzed(sizes, seed, momentum, kl, device, kernel_impls, tol):
    args = make([(n,) for n in sizes], torch.float32, seed, momentum=momentum > 0)
    p_ref, b_ref, nu_ref = run("reference", args, 0.2, momentum, 1e-3, kl)
    for impl in kernel_impls:
        p, b, nu = run(impl, args, 0.2, momentum, 1e-3, kl, device)
        assert math.isclose(float(nu), float(nu_ref), rel_tol=1e-10)
        for x, y in zip(p + b, p_ref + b_ref):
            assert torch.allclose(x, y, rtol=tol(1e-5, torch.float32), atol=tol(1e-6, torch.float32))


def test_two_launches_whatever_the_number_of_tensors():
    for count in (1, 16, 128):
        args = make([(33, 17)] * count, torch.float32, 3)
        with emulation.count() as c:
            run("emulated", args, 0.1, 0.9, 0.0, 1e-3)
        assert c.launches == 2 and c.library_calls == 0
        with emulation.count() as c:
            run("emulated", args, 0.1, 0.9, 0.0, 0.0)  # no trust region: no dot product
        assert c.launches == 1


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_opcheck(ns, to_device):
    params, directions, grads, bufs, clipped = to_device(make([(3, 4), (5,)], torch.float64, 4))
    torch.library.opcheck(getattr(torch.ops, ns).kfac_update_.default,
                          (params, directions, grads, bufs, clipped, 0.1, 0.9, 0.01, 1e-3))


@pytest.mark.parametrize("impl", ["reference", "native", "emulated"])
def test_bad_input(impl):
    params, directions, grads, bufs, clipped = make([(3, 4)], torch.float32, 5)
    with pytest.raises(ValueError, match="grads has 0 entries"):
        ng.ops.kfac_update_(params, directions, [], bufs, clipped, 0.1, 0.9, 0.0, 0.0, impl=impl)
    with pytest.raises(TypeError, match=r"params\[0\] must be a tensor"):
        ng.ops.kfac_update_([1.0], directions, grads, bufs, clipped, 0.1, 0.9, 0.0, 0.0, impl=impl)
    with pytest.raises(ValueError, match="momentum_buffers"):
        ng.ops.kfac_update_(params, directions, grads, [], clipped, 0.1, 0.9, 0.0, 0.0, impl=impl)
    with pytest.raises(ValueError, match=r"directions\[0\] must have params\[0\]'s shape"):
        ng.ops.kfac_update_(params, [directions[0].T], grads, bufs, clipped, 0.1, 0.9, 0.0, 0.0, impl=impl)
    with pytest.raises(ValueError, match="lr must be finite"):
        ng.ops.kfac_update_(params, directions, grads, bufs, clipped, float("nan"), 0.9, 0.0, 0.0, impl=impl)
    with pytest.raises(ValueError, match="contiguous"):
        ng.ops.kfac_update_([params[0].T], [directions[0].T], [grads[0].T], [bufs[0].T], clipped, 0.1, 0.9, 0.0,
                            0.0, impl=impl)


def test_native_entry_points_check_too():
    params, directions, grads, bufs, clipped = make([(3, 4)], torch.float32, 6)
    for op in (torch.ops.natgrad.kfac_update_, torch.ops.natgrad_emu.kfac_update_):
        with pytest.raises(RuntimeError, match="same length"):
            op(params, directions, [], bufs, clipped, 0.1, 0.9, 0.0, 0.0)
        with pytest.raises(RuntimeError, match="contiguous"):
            op([params[0].T], [directions[0].T], [grads[0].T], [bufs[0].T], clipped, 0.1, 0.9, 0.0, 0.0)
