"""ops.kron_matmul: P = IG M IA for every layer. The reference against the Kronecker product, and
the native CPU and CUDA (when present) and emulated CUDA kernels (two grouped-GEMM launches for all
layers) against the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import natgrad_cuda as ng
from natgrad_cuda import emulation

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def layer(o, k, gen, dtype=torch.float64, grad_dtype=None):
    def sym(n):
        X = torch.randn(n, n, dtype=torch.float64, generator=gen)
        return X + X.T

    M = torch.randn(o, k, dtype=torch.float64, generator=gen)
    return M.to(grad_dtype or dtype), sym(k).to(dtype), sym(o).to(dtype)


def columns(layers):
    return [list(x) for x in zip(*layers)]


def test_reference_is_the_kronecker_product(to_device):
    gen = torch.Generator().manual_seed(0)
    for o, k in ((3, 4), (5, 2), (1, 6)):
        M, IA, IG = layer(o, k, gen)
        P, = ng.ops.kron_matmul(*to_device([[M], [IA], [IG]]), impl="reference")
        P = P.cpu()
        # row-major vec: vec(IG M IA) = (IG (x) IA^T) vec(M), IA symmetric
        expect = (torch.kron(IG, IA) @ M.reshape(-1)).reshape(o, k)
        assert torch.allclose(P, expect, rtol=1e-12, atol=1e-12)


SHAPES = [(1, 1), (2, 3), (31, 33), (32, 32), (33, 31), (64, 65), (7, 129), (97, 5), (0, 4), (4, 0)]


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                              (torch.float64, torch.float32)])
def test_kernels_match_the_reference(impl, dtype, grad_dtype, to_device, tol):
    gen = torch.Generator().manual_seed(1)
    args = columns([layer(o, k, gen, dtype, grad_dtype) for o, k in SHAPES])
    ref = ng.ops.kron_matmul(*args, impl="reference")
    out = ng.ops.kron_matmul(*to_device(args), impl=impl)
    # the result is rounded to bf16/fp16 when the gradients are
    bound = tol(TOL[dtype], dtype) if grad_dtype in (torch.float32, torch.float64) else tol(1e-2, grad_dtype)
    for a, b in zip(out, ref):
        assert a.dtype == grad_dtype and a.shape == b.shape and a.is_contiguous()
        if b.numel():
            assert (a.cpu().double() - b.double()).abs().max() <= bound * b.double().abs().max().clamp_min(1e-30)


@pytest.mark.parametrize("impl", ["native", "emulated"])
def test_non_contiguous_inputs(impl, to_device, tol):
    gen = torch.Generator().manual_seed(2)
    M, IA, IG = layer(40, 70, gen)
    args = [[M.T.contiguous().T, M[:, ::2], M[:1, :3].expand(5, 3)],
            [IA.T.contiguous().T, IA[::2, ::2], IA[:3, :3]],
            [IG, IG, IG[:1, :1].expand(5, 5)]]
    ref = ng.ops.kron_matmul(*args, impl="reference")
    for a, b in zip(ng.ops.kron_matmul(*to_device(args), impl=impl), ref):
        assert torch.allclose(a.cpu(), b, rtol=tol(1e-10), atol=tol(1e-12))


# the device fixtures (conftest.py) hold no state: the examples may share them
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), min_size=1, max_size=4),
       double=st.booleans(), seed=st.integers(0, 99))
def test_fuzzed(shapes, double, seed, kernel_impls, to_device, tol):
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    args = columns([layer(o, k, gen, dtype) for o, k in shapes])
    ref = ng.ops.kron_matmul(*args, impl="reference")
    for impl in kernel_impls:
        for a, b in zip(ng.ops.kron_matmul(*to_device(args), impl=impl), ref):
            if b.numel():
                assert (a.cpu() - b).abs().max() <= tol(5 * TOL[dtype], dtype) * b.abs().max().clamp_min(1e-30)


def test_two_launches_whatever_the_number_of_layers():
    gen = torch.Generator().manual_seed(3)
    for count in (1, 16, 64):
        args = columns([layer(33, 17, gen, torch.float32) for _ in range(count)])
        with emulation.count() as c:
            ng.ops.kron_matmul(*args, impl="emulated")
        assert c.launches == 2 and c.library_calls == 0
    # one pair of launches per pair of gradient and factor dtypes; none for empty gradients
    args = columns([layer(5, 6, gen, torch.float32), layer(5, 6, gen, torch.float64), layer(0, 3, gen)])
    with emulation.count() as c:
        ng.ops.kron_matmul(*args, impl="emulated")
    assert c.launches == 4


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_opcheck(ns, to_device):
    gen = torch.Generator().manual_seed(4)
    args = to_device(columns([layer(o, k, gen) for o, k in ((3, 5), (40, 33), (0, 2))]))
    torch.library.opcheck(getattr(torch.ops, ns).kron_matmul.default, tuple(args))


@pytest.mark.parametrize("impl", ["reference", "native", "emulated"])
def test_bad_input(impl):
    gen = torch.Generator().manual_seed(5)
    M, IA, IG = layer(3, 4, gen)
    with pytest.raises(ValueError, match="IG has 2 entries"):
        ng.ops.kron_matmul([M], [IA], [IG, IG], impl=impl)
    with pytest.raises(TypeError, match=r"IA\[0\] must be a tensor"):
        ng.ops.kron_matmul([M], [[1.0]], [IG], impl=impl)
    with pytest.raises(ValueError, match=r"IA\[0\] must be \(4, 4\)"):
        ng.ops.kron_matmul([M], [IG], [IG], impl=impl)
    with pytest.raises(ValueError, match="share one dtype"):
        ng.ops.kron_matmul([M], [IA.float()], [IG], impl=impl)
    with pytest.raises(ValueError, match="share one dtype"):
        ng.ops.kron_matmul([M], [IA.half()], [IG.half()], impl=impl)
    with pytest.raises(ValueError, match="2-D"):
        ng.ops.kron_matmul([M.reshape(-1)], [IA], [IG], impl=impl)
    with pytest.raises(ValueError, match=r"grads\[0\] must be fp32"):
        ng.ops.kron_matmul([M.int()], [IA], [IG], impl=impl)
    with pytest.raises(ValueError, match="requires grad"):
        ng.ops.kron_matmul([M.requires_grad_()], [IA], [IG], impl=impl)
    assert ng.ops.kron_matmul([], [], [], impl=impl) == []


def test_native_entry_points_check_too():
    gen = torch.Generator().manual_seed(6)
    M, IA, IG = layer(3, 4, gen)
    for op in (torch.ops.natgrad.kron_matmul, torch.ops.natgrad_emu.kron_matmul):
        with pytest.raises(RuntimeError, match="IA"):
            op([M], [IG], [IG])
        with pytest.raises(RuntimeError, match="IG"):
            op([M], [IA], [IA])
        with pytest.raises(RuntimeError, match="same length"):
            op([M], [IA, IA], [IG])
        with pytest.raises(RuntimeError, match="fp32, fp64, bf16 or fp16"):
            op([M.int()], [IA], [IG])
