"""ops.ekfac_precondition (EKFAC: QG [(QG^T M QA) / (S + damping)] QA^T): the reference against the
dense operator (QG (x) QA) diag(1 / (vec S + damping)) (QG (x) QA)^T in float64, and the native CPU
and CUDA (when present) and emulated CUDA kernels (four grouped-GEMM launches for all layers) against
the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import natgrad_cuda as ng
from natgrad_cuda import emulation

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def basis(n, gen):
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return Q


def layer(o, k, gen, dtype=torch.float64, grad_dtype=None, zeros=False):
    """(M, QA, QG, S): orthonormal bases and a scaling >= 0 with a few exact zeros (never-seen
    directions), or all zeros."""
    QA, QG = basis(k, gen), basis(o, gen)
    S = torch.rand(o, k, dtype=torch.float64, generator=gen) * 2
    S = torch.where(torch.rand(o, k, dtype=torch.float64, generator=gen) < 0.1, 0.0, S)
    if zeros:
        S = torch.zeros_like(S)
    M = torch.randn(o, k, dtype=torch.float64, generator=gen)
    return M.to(grad_dtype or dtype), QA.to(dtype), QG.to(dtype), S.to(dtype)


def columns(layers):
    return [list(x) for x in zip(*layers)]


def close(out, ref, tol):
    for a, b in zip(out, ref):
        a, b = a.cpu(), b.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape
        if b.numel():
            assert (a.double() - b.double()).abs().max() <= tol * b.double().abs().max().clamp_min(1e-30)


def test_reference_is_the_dense_operator():
    gen = torch.Generator().manual_seed(0)
    lam = 0.03
    for o, k in ((3, 4), (5, 2), (1, 6), (4, 1)):
        M, QA, QG, S = layer(o, k, gen)
        P, = ng.ops.ekfac_precondition([M], [QA], [QG], [S], lam, impl="reference")
        K = torch.kron(QG, QA)  # row-major vec: vec(QG^T M QA) = K^T vec(M)
        expect = (K @ ((K.T @ M.reshape(-1)) / (S.reshape(-1) + lam))).reshape(o, k)
        assert torch.allclose(P, expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "native", "emulated"])
def test_kfac_scaling_is_precondition(impl, to_device, tol):
    """S = dG dA^T (K-FAC's own eigenvalue products) gives precondition's exact damping."""
    gen = torch.Generator().manual_seed(1)
    args, eig = [], []
    for o, k in ((5, 7), (33, 31), (1, 2)):
        M, QA, QG, _ = layer(o, k, gen)
        dA = torch.rand(k, dtype=torch.float64, generator=gen)
        dG = torch.rand(o, dtype=torch.float64, generator=gen)
        args.append((M, QA, QG, torch.outer(dG, dA)))
        eig.append((M, QA, dA, QG, dG))
    out = ng.ops.ekfac_precondition(*to_device(columns(args)), 0.05, impl=impl)
    ref = ng.ops.precondition(*columns(eig), 0.05, impl="reference")
    close(out, ref, tol(1e-12))


@pytest.mark.parametrize("impl", ["reference", "native", "emulated"])
def test_zero_scaling_divides_by_the_damping(impl, to_device, tol):
    gen = torch.Generator().manual_seed(2)
    args = columns([layer(o, k, gen, zeros=True) for o, k in ((6, 9), (40, 3))])
    for P, M in zip(ng.ops.ekfac_precondition(*to_device(args), 0.5, impl=impl), args[0]):
        assert torch.allclose(P.cpu(), M / 0.5, rtol=tol(1e-12), atol=tol(1e-12))


# 0-sized, 1, odd, primes, just around the 32-wide tiles and 32-deep slabs, and larger.
SHAPES = [(1, 1), (2, 3), (13, 17), (31, 33), (32, 32), (33, 31), (64, 65), (7, 129), (97, 5), (130, 67),
          (0, 4), (4, 0), (0, 0)]
DTYPES = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
          (torch.float32, torch.float16), (torch.float64, torch.float32), (torch.float64, torch.bfloat16)]


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("dtype,grad_dtype", DTYPES)
def test_kernels_match_the_reference(impl, dtype, grad_dtype, to_device, tol):
    gen = torch.Generator().manual_seed(3)
    layers = [layer(o, k, gen, dtype, grad_dtype) for o, k in SHAPES]
    layers.append(layer(6, 9, gen, dtype, grad_dtype, zeros=True))
    args = columns(layers)
    ref = ng.ops.ekfac_precondition(*args, 1e-2, impl="reference")
    out = ng.ops.ekfac_precondition(*to_device(args), 1e-2, impl=impl)
    assert all(a.dtype == grad_dtype for a in out)
    # the result is rounded to bf16/fp16 when the gradients are
    close(out, ref, tol(TOL[dtype], dtype) if grad_dtype in (torch.float32, torch.float64) else tol(1e-2, grad_dtype))


@pytest.mark.parametrize("impl", ["native", "emulated"])
def test_layers_of_mixed_dtypes_in_one_call(impl, to_device, tol):
    """Each (gradient dtype, factor dtype) pair is one group of four launches; the results come back in
    the layers' order."""
    gen = torch.Generator().manual_seed(4)
    kinds = [(torch.float64, torch.float64), (torch.float32, torch.bfloat16), (torch.float32, torch.float32),
             (torch.float64, torch.float16), (torch.float32, torch.bfloat16), (torch.float64, torch.float64)]
    layers = [layer(o, k, gen, d, g) for (o, k), (d, g) in zip([(5, 40), (33, 2), (17, 17), (1, 64), (0, 3),
                                                                (70, 9)], kinds)]
    args = columns(layers)
    ref = ng.ops.ekfac_precondition(*args, 0.02, impl="reference")
    out = ng.ops.ekfac_precondition(*to_device(args), 0.02, impl=impl)
    for a, b, (d, g) in zip(out, ref, kinds):
        assert a.dtype == g
        close([a], [b], tol(TOL[d], d) if g in (torch.float32, torch.float64) else tol(1e-2, g))
    if impl == "emulated":
        with emulation.count() as c:
            ng.ops.ekfac_precondition(*args, 0.02, impl=impl)
        # (f64, f64), (f32, bf16), (f32, f32), (f64, f16): the (f32, bf16) group's second layer is empty
        assert c.launches == 4 * 4 and c.library_calls == 0


@pytest.mark.parametrize("impl", ["native", "emulated"])
def test_non_contiguous_inputs(impl, to_device, tol):
    gen = torch.Generator().manual_seed(5)
    M, QA, QG, S = layer(40, 70, gen)
    m, qa, qg, s = layer(5, 6, gen)
    big = torch.rand(12, 20, dtype=torch.float64, generator=gen)
    row = torch.rand(6, dtype=torch.float64, generator=gen)
    args = [[M.T.contiguous().T, M[:, ::2], m, m[:1].expand(5, 6), m],
            [QA.T.contiguous().T, basis(35, gen), qa, qa, qa.T.contiguous().T],
            [QG, QG.T.contiguous().T, qg, qg, qg],
            [S.T.contiguous().T, S[:, 1::2], big[1:10:2, 3:19:3], s[2:3].expand(5, 6), row.expand(5, 6)]]
    assert not any(t.is_contiguous() for t in args[3])
    ref = ng.ops.ekfac_precondition(*args, 0.1, impl="reference")
    for a, b in zip(ng.ops.ekfac_precondition(*to_device(args), 0.1, impl=impl), ref):
        assert torch.allclose(a.cpu(), b, rtol=tol(1e-10), atol=tol(1e-12))


# the device fixtures (conftest.py) hold no state: the examples may share them
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), min_size=1, max_size=4),
       double=st.booleans(), lam=st.floats(1e-4, 10.0), seed=st.integers(0, 99))
def test_fuzzed(shapes, double, lam, seed, kernel_impls, to_device, tol):
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    args = columns([layer(o, k, gen, dtype) for o, k in shapes])
    ref = ng.ops.ekfac_precondition(*args, lam, impl="reference")
    for impl in kernel_impls:
        out = ng.ops.ekfac_precondition(*to_device(args), lam, impl=impl)
        close(out, ref, tol(5 * TOL[dtype], dtype))


def test_four_launches_whatever_the_number_of_layers():
    gen = torch.Generator().manual_seed(6)
    for count in (1, 16, 64):
        args = columns([layer(33, 17, gen, torch.float32) for _ in range(count)])
        with emulation.count() as c:
            ng.ops.ekfac_precondition(*args, 0.01, impl="emulated")
        assert c.launches == 4 and c.library_calls == 0
    # nothing to compute: no launch (an empty grid is a launch error)
    args = columns([layer(0, 5, gen), layer(3, 0, gen)])
    with emulation.count() as c:
        out = ng.ops.ekfac_precondition(*args, 0.01, impl="emulated")
    assert c.launches == 0 and [tuple(P.shape) for P in out] == [(0, 5), (3, 0)]


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_opcheck(ns, to_device):
    gen = torch.Generator().manual_seed(7)
    args = to_device(columns([layer(3, 5, gen), layer(40, 33, gen, torch.float32, torch.bfloat16)]))
    torch.library.opcheck(getattr(torch.ops, ns).ekfac_precondition.default, (*args, 0.05))


@pytest.mark.parametrize("impl", ["reference", "native", "emulated"])
def test_bad_input(impl):
    gen = torch.Generator().manual_seed(8)
    M, QA, QG, S = layer(3, 4, gen)
    ok = [[M], [QA], [QG], [S]]
    call = lambda *a, **kw: ng.ops.ekfac_precondition(*a, **kw, impl=impl)  # noqa: E731
    with pytest.raises(ValueError, match="QG has 2 entries but grads has 1"):
        call([M], [QA], [QG, QG], [S], 0.1)
    with pytest.raises(ValueError, match="S has 0 entries"):
        call([M], [QA], [QG], [], 0.1)
    with pytest.raises(TypeError, match=r"grads\[0\] must be a tensor"):
        call([[1.0]], [QA], [QG], [S], 0.1)
    with pytest.raises(TypeError, match=r"S\[0\] must be a tensor"):
        call([M], [QA], [QG], [None], 0.1)
    with pytest.raises(ValueError, match="damping must be > 0"):
        call(*ok, 0.0)
    with pytest.raises(ValueError, match="damping must be finite"):
        call(*ok, float("inf"))
    with pytest.raises(ValueError, match="damping must be finite"):
        call(*ok, float("nan"))
    with pytest.raises(TypeError, match="damping"):
        call(*ok, "0.1")
    with pytest.raises(ValueError, match="2-D"):
        call([M.reshape(-1)], [QA], [QG], [S], 0.1)
    with pytest.raises(ValueError, match=r"QA\[0\] must be a full \(4, 4\) eigenbasis.*low-rank"):
        call([M], [QA[:, 2:]], [QG], [S], 0.1)  # the leading eigenvectors only
    with pytest.raises(ValueError, match=r"QG\[0\] must be a full \(3, 3\) eigenbasis.*low-rank"):
        call([M], [QA], [QG[:, 1:]], [S], 0.1)
    with pytest.raises(ValueError, match=r"QA\[0\] must be a full \(4, 4\)"):
        call([M], [QG], [QG], [S], 0.1)
    with pytest.raises(ValueError, match=r"S\[0\] must have grads\[0\]'s shape \(3, 4\)"):
        call([M], [QA], [QG], [S.T], 0.1)
    with pytest.raises(ValueError, match=r"QA\[0\], QG\[0\] and S\[0\] must share one dtype"):
        call([M], [QA], [QG], [S.float()], 0.1)
    with pytest.raises(ValueError, match="share one dtype, float32 or float64"):
        call([M], [QA.half()], [QG.half()], [S.half()], 0.1)
    with pytest.raises(ValueError, match=r"grads\[0\] must be fp32, fp64, bf16 or fp16"):
        call([M.int()], [QA], [QG], [S], 0.1)
    with pytest.raises(ValueError, match=r"grads\[0\] requires grad.*no derivative"):
        call([M.clone().requires_grad_()], [QA], [QG], [S], 0.1)
    with pytest.raises(ValueError, match=r"S\[0\] requires grad"):
        call([M], [QA], [QG], [S.clone().requires_grad_()], 0.1)
    with torch.no_grad():  # what an optimizer does: fine
        call([M], [QA], [QG], [S.clone().requires_grad_()], 0.1)
    assert call([], [], [], [], 0.1) == []


def test_native_entry_points_check_too():
    gen = torch.Generator().manual_seed(9)
    M, QA, QG, S = layer(3, 4, gen)
    for op in (torch.ops.natgrad.ekfac_precondition, torch.ops.natgrad_emu.ekfac_precondition):
        with pytest.raises(RuntimeError, match="same length"):
            op([M], [QA], [QG], [], 0.1)
        with pytest.raises(RuntimeError, match=r"QA\[0\] must be a full \(4, 4\) eigenbasis"):
            op([M], [QA[:, 1:]], [QG], [S], 0.1)
        with pytest.raises(RuntimeError, match=r"QG\[0\] must be a full \(3, 3\) eigenbasis"):
            op([M], [QA], [QG[:, :2]], [S], 0.1)
        with pytest.raises(RuntimeError, match=r"S\[0\] must be \(3, 4\)"):
            op([M], [QA], [QG], [S.T], 0.1)
        with pytest.raises(RuntimeError, match="share one dtype"):
            op([M], [QA], [QG.float()], [S], 0.1)
        with pytest.raises(RuntimeError, match=r"grads\[0\] must be fp32"):
            op([M.int()], [QA], [QG], [S], 0.1)
        with pytest.raises(RuntimeError, match="damping"):
            op([M], [QA], [QG], [S], -1.0)
        with pytest.raises(RuntimeError, match="argument 'S' requires grad"):
            op([M], [QA], [QG], [S.clone().requires_grad_()], 0.1)
