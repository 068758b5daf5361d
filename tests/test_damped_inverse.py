"""ops.damped_inverse: (F + shift I)^-1 by Cholesky. Reference, native CPU (LAPACK, parallel over
matrices) and the CUDA source run in emulation (cusolverDnXpotrf + cusolverDnXpotrs per matrix, one
host synchronisation), and on the GPU when present, against a float64 inverse of the lower
triangle's symmetric matrix; the float64 retry of a float32 failure, NaN for what fails even in
float64."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import natgrad_cuda as ng
from natgrad_cuda import emulation

IMPLS = ["reference", "native", "emulated"]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def spd_with_garbage(n, dtype, gen, rank=None):
    """A symmetric PSD matrix in the lower triangle, garbage above it (which must not be read)."""
    X = torch.randn(n, rank if rank is not None else n, dtype=torch.float64, generator=gen)
    M = (X @ X.T / max(n, 1)).to(dtype)
    return M + torch.triu(torch.randn(n, n, dtype=dtype, generator=gen), 1) * 1e3


def oracle(M, shift):
    S = (M.tril() + M.tril(-1).T).double()
    return torch.linalg.inv(S + shift * torch.eye(M.shape[0], dtype=torch.float64))


def check(M, shift, out, dtype, tol=None):
    M, out = M.cpu(), out.cpu()
    n = M.shape[0]
    assert out.dtype == dtype and out.shape == (n, n)
    if n == 0:
        return
    ref = oracle(M, shift)
    assert (out.double() - ref).abs().max() <= (tol or TOL[dtype]) * ref.abs().max()
    assert torch.equal(out, out.T), "not symmetric"


SIZES = [0, 1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 97, 97, 128, 257]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_float64_inverse_on_mixed_sizes(impl, dtype, to_device, tol):
    gen = torch.Generator().manual_seed(0)
    mats = [spd_with_garbage(n, dtype, gen) for n in SIZES]
    shifts = [0.05 + 0.1 * i for i in range(len(mats))]
    out = ng.ops.damped_inverse(to_device(mats), shifts, impl=impl)
    assert len(out) == len(mats)
    for M, s, X in zip(mats, shifts, out):
        check(M, s, X, dtype, tol(TOL[dtype], dtype))


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_the_reference(impl, dtype, to_device, tol):
    gen = torch.Generator().manual_seed(1)
    mats = [spd_with_garbage(n, dtype, gen, rank=max(n // 3, 1)) for n in (1, 5, 33, 70, 130)]
    shifts = [0.3, 1.0, 0.01, 0.2, 2.0]
    bound = tol(TOL[dtype] * (100 if dtype == torch.float32 else 1), dtype)  # float32: conditioning up to ~100
    for a, b in zip(ng.ops.damped_inverse(to_device(mats), shifts, impl=impl),
                    ng.ops.damped_inverse(mats, shifts, impl="reference")):
        assert (a.cpu().double() - b.double()).abs().max() <= bound * b.double().abs().max()


@pytest.mark.parametrize("impl", IMPLS)
def test_only_the_lower_triangle_is_read(impl, to_device):
    gen = torch.Generator().manual_seed(2)
    for n in (4, 40, 90):
        M = spd_with_garbage(n, torch.float64, gen)
        garbage = M.clone()
        garbage[torch.triu(torch.ones(n, n, dtype=torch.bool), 1)] = float("nan")
        a, b, c = ng.ops.damped_inverse(to_device([M.tril(), M, garbage]), [0.1] * 3, impl=impl)
        assert torch.isfinite(c).all()
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl, to_device, tol):
    gen = torch.Generator().manual_seed(3)
    big = spd_with_garbage(150, torch.float64, gen)
    sym = big.tril() + big.tril(-1).T
    mats = [sym[::2, ::2], big[:70, :70], big.T.contiguous().T, sym.T[5:40, 5:40], sym[:1, :1].expand(3, 3)]
    out = ng.ops.damped_inverse(to_device(mats), [0.5] * len(mats), impl=impl)
    for M, X in zip(mats, out):
        check(M, 0.5, X, torch.float64, tol(TOL[torch.float64]))


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes_in_one_call(impl, to_device, tol):
    gen = torch.Generator().manual_seed(7)
    mats = [spd_with_garbage(n, dtype, gen) for n, dtype in ((30, torch.float32), (20, torch.float64),
                                                              (70, torch.float64), (5, torch.float32))]
    for M, X in zip(mats, ng.ops.damped_inverse(to_device(mats), [0.2] * 4, impl=impl)):
        check(M, 0.2, X, M.dtype, tol(TOL[M.dtype], M.dtype))


# the device fixtures (conftest.py) hold no state: the examples may share them
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 80), min_size=1, max_size=5), double=st.booleans(), seed=st.integers(0, 99),
       shift=st.floats(0.05, 10.0))
def test_fuzzed_sizes_emulated_and_native(sizes, double, seed, shift, kernel_impls, to_device, tol):
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    mats = [spd_with_garbage(n, dtype, gen) for n in sizes]
    for impl in kernel_impls:
        for M, X in zip(mats, ng.ops.damped_inverse(to_device(mats), [shift] * len(mats), impl=impl)):
            check(M, shift, X, dtype, tol=tol(10 * TOL[dtype], dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_failure_is_retried_in_float64(impl, to_device):
    """1 + 1e-9 rounds to 1 in float32: the all-ones matrix plus the shift is singular there, and
    positive definite in float64."""
    F, good = torch.ones(5, 5), torch.eye(3) * 2
    with emulation.count() as c:
        X, Y = ng.ops.damped_inverse(to_device([F, good]), [1e-9, 1.0], impl=impl)
    X, Y = X.cpu(), Y.cpu()
    assert X.dtype == torch.float32 and torch.isfinite(X).all()
    ref = oracle(F, 1e-9)
    assert (X.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(Y, torch.eye(3) / 3, rtol=1e-6, atol=0)
    if impl == "emulated":  # both in float32, then the failed one again in float64
        assert c.by_name.get("cusolverDnXpotrf") == 3 and c.by_name.get("cusolverDnXpotrs") == 3
    S = F + 1e-9 * torch.eye(5)
    assert int(torch.linalg.cholesky_ex(S)[1]) != 0, "the float32 factorisation is meant to fail"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_what_fails_in_float64_too_is_nan(impl, dtype, to_device):
    indefinite = -torch.eye(4, dtype=dtype)
    bad = torch.eye(4, dtype=dtype)
    bad[2, 1] = float("nan")
    inf = torch.eye(3, dtype=dtype)
    inf[0, 0] = float("inf")
    good = spd_with_garbage(6, dtype, torch.Generator().manual_seed(4))
    out = [X.cpu() for X in ng.ops.damped_inverse(to_device([indefinite, bad, good, inf]), [0.5] * 4, impl=impl)]
    for X in out[:2] + out[3:]:
        assert X.dtype == dtype and torch.isnan(X).all()
    check(good, 0.5, out[2], dtype)


def test_library_calls_per_matrix_and_one_synchronisation():
    gen = torch.Generator().manual_seed(5)
    for count in (1, 7):
        mats = [spd_with_garbage(n, torch.float32, gen) for n in [12, 40] * count] + [torch.zeros(0, 0)]
        with emulation.count() as c:
            ng.ops.damped_inverse(mats, [0.1] * len(mats), impl="emulated")
        assert c.launches == 0
        # one workspace query per size (the group's calls share the workspace), two calls per matrix
        expect = {"cusolverDnXpotrf_bufferSize": 2, "cusolverDnXpotrf": 2 * count, "cusolverDnXpotrs": 2 * count}
        assert {k: v for k, v in c.by_name.items() if k.startswith("cusolver")} == expect


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_opcheck(ns, to_device):
    gen = torch.Generator().manual_seed(6)
    mats = [spd_with_garbage(n, torch.float64, gen) for n in (3, 40, 70)] + [torch.zeros(0, 0, dtype=torch.float64)]
    mats = to_device(mats)
    torch.library.opcheck(getattr(torch.ops, ns).damped_inverse.default, (mats, [0.1, 0.2, 0.3, 0.4]))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input(impl):
    with pytest.raises(ValueError, match=r"mats\[1\] must be a square matrix"):
        ng.ops.damped_inverse([torch.eye(2), torch.zeros(2, 3)], [1.0, 1.0], impl=impl)
    with pytest.raises(ValueError, match="float32 or float64"):
        ng.ops.damped_inverse([torch.eye(2, dtype=torch.float16)], [1.0], impl=impl)
    with pytest.raises(TypeError, match=r"mats\[0\] must be a tensor"):
        ng.ops.damped_inverse([[1.0]], [1.0], impl=impl)
    with pytest.raises(ValueError, match="shifts has 1 entries but mats has 2"):
        ng.ops.damped_inverse([torch.eye(2), torch.eye(2)], [1.0], impl=impl)
    with pytest.raises(ValueError, match=r"shifts\[1\] must be > 0"):
        ng.ops.damped_inverse([torch.eye(2), torch.eye(2)], [1.0, 0.0], impl=impl)
    with pytest.raises(ValueError, match=r"shifts\[0\] must be finite"):
        ng.ops.damped_inverse([torch.eye(2)], [float("nan")], impl=impl)
    with pytest.raises(TypeError, match=r"shifts\[0\]"):
        ng.ops.damped_inverse([torch.eye(2)], ["1"], impl=impl)
    with pytest.raises(ValueError, match="requires grad"):
        ng.ops.damped_inverse([torch.eye(2, requires_grad=True)], [1.0], impl=impl)
    assert ng.ops.damped_inverse([], [], impl=impl) == []


def test_native_entry_points_check_too():
    for op in (torch.ops.natgrad.damped_inverse, torch.ops.natgrad_emu.damped_inverse):
        with pytest.raises(RuntimeError, match="square"):
            op([torch.zeros(2, 3)], [1.0])
        with pytest.raises(RuntimeError, match=r"shifts\[0\] must be finite and > 0"):
            op([torch.eye(2)], [-1.0])
        with pytest.raises(RuntimeError, match="shifts has 2 entries"):
            op([torch.eye(2)], [1.0, 1.0])
        with pytest.raises(RuntimeError, match="float32 or float64"):
            op([torch.eye(2, dtype=torch.float16)], [1.0])


@pytest.mark.skipif(not emulation.available(), reason="emulated backend not built")
def test_equal_sizes_share_a_batch_but_not_their_results():
    # The CUDA path treats equal sizes as one batch: each result is still the inverse of its own
    # matrix with its own shift, and writing into one leaves the others as they were.
    gen = torch.Generator().manual_seed(6)
    mats = [spd_with_garbage(9, torch.float64, gen) for _ in range(3)]
    shifts = [0.5, 0.01, 2.0]
    out = ng.ops.damped_inverse(mats, shifts, impl="emulated")
    for M, s, X in zip(mats, shifts, out):
        check(M, s, X, torch.float64)
    before = out[1].clone()
    out[0].add_(1.0)
    out[2].zero_()
    assert torch.equal(out[1], before)
