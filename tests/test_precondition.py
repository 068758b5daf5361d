"""ops.precondition: the reference against dense damped inverses of G (x) A, and the native CPU and
CUDA (when present) and emulated CUDA kernels (four grouped-GEMM launches for all layers) against the
reference; low-rank eigenbases (QA (in, rA), QG (out, rG)) against the dense inverses of exactly
low-rank factors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import natgrad_cuda as ng
from natgrad_cuda import emulation

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def layer(o, k, gen, dtype=torch.float64, grad_dtype=None, dead=False):
    def spd(n):
        X = torch.randn(n, n + 2, dtype=torch.float64, generator=gen)
        S = X @ X.T / (n + 2)
        return torch.zeros_like(S) if dead else S

    A, G = spd(k), spd(o)
    dA, QA = torch.linalg.eigh(A)
    dG, QG = torch.linalg.eigh(G)
    M = torch.randn(o, k, dtype=torch.float64, generator=gen)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return (M.to(grad_dtype or dtype), cast(QA), cast(dA.clamp_min(0)), cast(QG), cast(dG.clamp_min(0))), (A, G)


def columns(layers):
    return [list(x) for x in zip(*[args for args, _ in layers])]


@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_reference_is_the_dense_damped_inverse(inverse, to_device):
    gen = torch.Generator().manual_seed(0)
    lam = 0.03
    for o, k in ((3, 4), (5, 2), (1, 6)):
        (M, QA, dA, QG, dG), (A, G) = layer(o, k, gen)
        P, = ng.ops.precondition(*to_device([[M], [QA], [dA], [QG], [dG]]), lam, inverse=inverse, impl="reference")
        P = P.cpu()
        if inverse == "eigen":
            expect = torch.linalg.solve(torch.kron(G, A) + lam * torch.eye(o * k, dtype=torch.float64),
                                        M.reshape(-1)).reshape(o, k)
        else:
            pi = math.sqrt((A.trace() / k) / (G.trace() / o))
            expect = torch.linalg.solve(G + math.sqrt(lam) / pi * torch.eye(o, dtype=torch.float64), M) @ \
                torch.linalg.inv(A + pi * math.sqrt(lam) * torch.eye(k, dtype=torch.float64))
        assert torch.allclose(P, expect, rtol=1e-10, atol=1e-12)


SHAPES = [(1, 1), (2, 3), (31, 33), (32, 32), (33, 31), (64, 65), (7, 129), (97, 5), (0, 4), (4, 0)]


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("inverse", ["eigen", "factored"])
@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                              (torch.float64, torch.float32)])
def test_kernels_match_the_reference(impl, inverse, dtype, grad_dtype, to_device, tol):
    gen = torch.Generator().manual_seed(1)
    layers = [layer(o, k, gen, dtype, grad_dtype) for o, k in SHAPES]
    layers.append(layer(6, 9, gen, dtype, grad_dtype, dead=True))  # dead units: all eigenvalues zero
    args = columns(layers)
    ref = ng.ops.precondition(*args, 1e-2, inverse=inverse, impl="reference")
    out = [P.cpu() for P in ng.ops.precondition(*to_device(args), 1e-2, inverse=inverse, impl=impl)]
    # the result is rounded to bf16/fp16 when the gradients are
    bound = tol(TOL[dtype], dtype) if grad_dtype in (torch.float32, torch.float64) else tol(1e-2, grad_dtype)
    for a, b in zip(out, ref):
        assert a.dtype == grad_dtype and a.shape == b.shape
        if b.numel():
            assert (a.double() - b.double()).abs().max() <= bound * b.double().abs().max().clamp_min(1e-30)


@pytest.mark.parametrize("impl", ["native", "emulated"])
def test_non_contiguous_inputs(impl, to_device, tol):
    gen = torch.Generator().manual_seed(2)
    (M, QA, dA, QG, dG), _ = layer(40, 70, gen)
    args = [[M.T.contiguous().T, M[:, ::2]], [QA.T.contiguous().T, QA[::2, ::2].contiguous()],
            [dA, dA[::2].clone()], [QG, QG], [dG, dG]]
    # the second layer: a strided gradient against its own (valid, if artificial) eigenbasis
    args[1][1], _ = torch.linalg.qr(args[1][1])
    ref = ng.ops.precondition(*args, 0.1, impl="reference")
    for a, b in zip(ng.ops.precondition(*to_device(args), 0.1, impl=impl), ref):
        assert torch.allclose(a.cpu(), b, rtol=tol(1e-10), atol=tol(1e-12))


# the device fixtures (conftest.py) hold no state: the examples may share them
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), min_size=1, max_size=4),
       double=st.booleans(), factored=st.booleans(), lam=st.floats(1e-4, 10.0), seed=st.integers(0, 99))
def test_fuzzed(shapes, double, factored, lam, seed, kernel_impls, to_device, tol):
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    args = columns([layer(o, k, gen, dtype) for o, k in shapes])
    inverse = "factored" if factored else "eigen"
    ref = ng.ops.precondition(*args, lam, inverse=inverse, impl="reference")
    for impl in kernel_impls:
        for a, b in zip(ng.ops.precondition(*to_device(args), lam, inverse=inverse, impl=impl), ref):
            if b.numel():
                assert (a.cpu() - b).abs().max() <= tol(5 * TOL[dtype], dtype) * b.abs().max().clamp_min(1e-30)


def test_four_launches_whatever_the_number_of_layers():
    gen = torch.Generator().manual_seed(3)
    for count in (1, 16, 64):
        args = columns([layer(33, 17, gen, torch.float32) for _ in range(count)])
        with emulation.count() as c:
            ng.ops.precondition(*args, 0.01, impl="emulated")
        assert c.launches == 4 and c.library_calls == 0


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_opcheck(ns, to_device):
    gen = torch.Generator().manual_seed(4)
    args = to_device(columns([layer(o, k, gen) for o, k in ((3, 5), (40, 33))]))
    torch.library.opcheck(getattr(torch.ops, ns).precondition.default, (*args, 0.05, False))
    torch.library.opcheck(getattr(torch.ops, ns).precondition.default, (*args, 0.05, True))


@pytest.mark.parametrize("impl", ["reference", "native", "emulated"])
def test_bad_input(impl):
    gen = torch.Generator().manual_seed(5)
    (M, QA, dA, QG, dG), _ = layer(3, 4, gen)
    ok = [[M], [QA], [dA], [QG], [dG]]
    with pytest.raises(ValueError, match="QG has 2 entries"):
        ng.ops.precondition([M], [QA], [dA], [QG, QG], [dG], 0.1, impl=impl)
    with pytest.raises(TypeError, match=r"grads\[0\] must be a tensor"):
        ng.ops.precondition([[1.0]], [QA], [dA], [QG], [dG], 0.1, impl=impl)
    with pytest.raises(ValueError, match="damping must be > 0"):
        ng.ops.precondition(*ok, 0.0, impl=impl)
    with pytest.raises(ValueError, match="damping must be finite"):
        ng.ops.precondition(*ok, float("inf"), impl=impl)
    with pytest.raises(ValueError, match=r"QA\[0\] must have shape \(4, r\) with r <= 4"):
        ng.ops.precondition([M], [QG], [dA], [QG], [dG], 0.1, impl=impl)
    with pytest.raises(ValueError, match=r"QG\[0\] must have shape \(3, r\) with r <= 3"):
        ng.ops.precondition([M], [QA], [dA], [torch.zeros(3, 4, dtype=QG.dtype)], [dA], 0.1, impl=impl)
    with pytest.raises(ValueError, match=r"dA\[0\] shape \(r,\)"):
        ng.ops.precondition([M], [QA[:, :2]], [dA], [QG], [dG], 0.1, impl=impl)
    with pytest.raises(ValueError, match="share one dtype"):
        ng.ops.precondition([M], [QA.float()], [dA], [QG], [dG], 0.1, impl=impl)
    with pytest.raises(ValueError, match="inverse"):
        ng.ops.precondition(*ok, 0.1, inverse="cholesky", impl=impl)
    with pytest.raises(ValueError, match="2-D"):
        ng.ops.precondition([M.reshape(-1)], [QA], [dA], [QG], [dG], 0.1, impl=impl)
    with pytest.raises(ValueError, match="grads"):
        ng.ops.precondition([M.int()], [QA], [dA], [QG], [dG], 0.1, impl=impl)


def test_native_entry_points_check_too():
    gen = torch.Generator().manual_seed(6)
    (M, QA, dA, QG, dG), _ = layer(3, 4, gen)
    for op in (torch.ops.natgrad.precondition, torch.ops.natgrad_emu.precondition):
        with pytest.raises(RuntimeError, match="QA"):
            op([M], [QG], [dA], [QG], [dG], 0.1, False)
        with pytest.raises(RuntimeError, match=r"QA\[0\] must be \(4, r\) with r <= 4 and dA\[0\] \(r\)"):
            op([M], [QA[:, :2]], [dA], [QG], [dG], 0.1, False)
        with pytest.raises(RuntimeError, match=r"QG\[0\] must be \(3, r\) with r <= 3"):
            op([M], [QA], [dA], [torch.zeros(3, 4, dtype=QG.dtype)], [dA], 0.1, True)
        with pytest.raises(RuntimeError, match="damping"):
            op([M], [QA], [dA], [QG], [dG], -1.0, False)


# ---- low rank ---------------------------------------------------------------------------------------


def low_rank_layer(o, k, ra, rg, gen, dtype=torch.float64, grad_dtype=None, dead=False):
    """The leading ra (rg) eigenpairs of factors A (G) that are exactly of rank ra (rg): QA (k, ra) is
    a column slice of an orthonormal basis (a strided view), dA ascending and positive (zero if dead)."""
    def factor(n, r):
        Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
        d = torch.rand(r, dtype=torch.float64, generator=gen).sort().values * 2 + 0.05
        d = torch.zeros_like(d) if dead else d
        Q = Q[:, n - r:]
        return Q, d, Q @ torch.diag(d) @ Q.T

    QA, dA, A = factor(k, ra)
    QG, dG, G = factor(o, rg)
    M = torch.randn(o, k, dtype=torch.float64, generator=gen)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return (M.to(grad_dtype or dtype), cast(QA), cast(dA), cast(QG), cast(dG)), (A, G)


def dense_oracle(M, A, G, lam, inverse):
    o, k = M.shape
    M = M.double()
    if inverse == "eigen":
        return torch.linalg.solve(torch.kron(G, A) + lam * torch.eye(o * k, dtype=torch.float64),
                                  M.reshape(-1)).reshape(o, k)
    ta, tg = A.trace() / k, G.trace() / o
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    IG = torch.linalg.inv(G + math.sqrt(lam) / pi * torch.eye(o, dtype=torch.float64))
    IA = torch.linalg.inv(A + pi * math.sqrt(lam) * torch.eye(k, dtype=torch.float64))
    return IG @ M @ IA


LOW_RANK = [(5, 7, 3, 5), (6, 4, 4, 2), (9, 8, 2, 3), (1, 6, 0, 1), (4, 5, 0, 0), (7, 3, 3, 7), (33, 40, 5, 33),
            (12, 70, 33, 1)]


@pytest.mark.parametrize("impl", ["reference", "native", "emulated"])
@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_low_rank_is_the_dense_damped_inverse_of_the_low_rank_factors(impl, inverse, to_device, tol):
    gen = torch.Generator().manual_seed(7)
    lam = 0.03
    layers = [low_rank_layer(o, k, ra, rg, gen) for o, k, ra, rg in LOW_RANK]
    layers.append(low_rank_layer(6, 9, 2, 3, gen, dead=True))
    out = ng.ops.precondition(*to_device(columns(layers)), lam, inverse=inverse, impl=impl)
    for P, ((M, *_), (A, G)) in zip(out, layers):
        expect = dense_oracle(M, A, G, lam, inverse)
        assert (P.cpu() - expect).abs().max() <= tol(1e-10) * expect.abs().max()


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("inverse", ["eigen", "factored"])
@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float32, torch.bfloat16), (torch.float64, torch.float16)])
def test_low_rank_kernels_match_the_reference(impl, inverse, dtype, grad_dtype, to_device, tol):
    """Low-rank layers mixed with full ones (one launch per stage for all), shapes just above a tile."""
    gen = torch.Generator().manual_seed(8)
    layers = [low_rank_layer(o, k, ra, rg, gen, dtype, grad_dtype)
              for o, k, ra, rg in [(33, 65, 17, 33), (97, 5, 1, 4), (64, 33, 33, 31), (0, 4, 0, 0), (3, 2, 0, 0)]]
    layers += [layer(o, k, gen, dtype, grad_dtype) for o, k in ((31, 33), (7, 129))]
    args = columns(layers)
    ref = ng.ops.precondition(*args, 1e-2, inverse=inverse, impl="reference")
    out = [P.cpu() for P in ng.ops.precondition(*to_device(args), 1e-2, inverse=inverse, impl=impl)]
    bound = tol(TOL[dtype], dtype) if grad_dtype in (torch.float32, torch.float64) else tol(1e-2, grad_dtype)
    for a, b in zip(out, ref):
        assert a.dtype == grad_dtype and a.shape == b.shape
        if b.numel():
            assert (a.double() - b.double()).abs().max() <= bound * b.double().abs().max()


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_low_rank_non_contiguous_inputs(impl, inverse, to_device, tol):
    gen = torch.Generator().manual_seed(11)
    (M, QA, dA, QG, dG), _ = low_rank_layer(40, 70, 9, 12, gen)
    (m, qa, da, qg, dg), _ = low_rank_layer(5, 6, 2, 5, gen)
    args = [[M.T.contiguous().T, m[:1].expand(5, 6)], [QA.contiguous(), qa], [dA, da[:1].expand(2)],
            [QG.T.contiguous().T, qg], [dG, dg.flip(0)]]
    ref = ng.ops.precondition(*args, 0.1, inverse=inverse, impl="reference")
    for a, b in zip(ng.ops.precondition(*to_device(args), 0.1, inverse=inverse, impl=impl), ref):
        assert torch.allclose(a.cpu(), b, rtol=tol(1e-10), atol=tol(1e-12))


# the device fixtures (conftest.py) hold no state: the examples may share them
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50), st.floats(0, 1), st.floats(0, 1)),
                       min_size=1, max_size=4),
       double=st.booleans(), factored=st.booleans(), lam=st.floats(1e-3, 10.0), seed=st.integers(0, 99))
def test_low_rank_fuzzed(shapes, double, factored, lam, seed, kernel_impls, to_device, tol):
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    args = columns([low_rank_layer(o, k, int(fa * k), int(fg * o), gen, dtype) for o, k, fa, fg in shapes])
    inverse = "factored" if factored else "eigen"
    ref = ng.ops.precondition(*args, lam, inverse=inverse, impl="reference")
    for impl in kernel_impls:
        for a, b in zip(ng.ops.precondition(*to_device(args), lam, inverse=inverse, impl=impl), ref):
            if b.numel():
                assert (a.cpu() - b).abs().max() <= tol(5 * TOL[dtype], dtype) * b.abs().max()


@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_low_rank_four_launches(inverse):
    gen = torch.Generator().manual_seed(9)
    for count in (1, 16):
        layers = [low_rank_layer(33, 17, 5, 33, gen, torch.float32) for _ in range(count)]
        layers += [layer(33, 17, gen, torch.float32) for _ in range(count)]
        with emulation.count() as c:
            ng.ops.precondition(*columns(layers), 0.01, inverse=inverse, impl="emulated")
        assert c.launches == 4 and c.library_calls == 0
    # rank 0 on both sides: P = M / damping (pi = 1), and the stages with no tiles are not launched
    args = columns([low_rank_layer(5, 6, 0, 0, gen)])
    with emulation.count() as c:
        out, = ng.ops.precondition(*args, 0.5, inverse=inverse, impl="emulated")
    assert c.launches == (1 if inverse == "eigen" else 2)
    assert torch.allclose(out, args[0][0] / 0.5, rtol=1e-14, atol=0)


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_low_rank_opcheck(ns, to_device):
    gen = torch.Generator().manual_seed(10)
    args = to_device(columns([low_rank_layer(o, k, ra, rg, gen) for o, k, ra, rg in ((3, 5, 2, 3), (40, 33, 7, 1))]))
    torch.library.opcheck(getattr(torch.ops, ns).precondition.default, (*args, 0.05, False))
    torch.library.opcheck(getattr(torch.ops, ns).precondition.default, (*args, 0.05, True))
