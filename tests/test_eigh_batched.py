"""ops.eigh_batched: reference, native CPU (LAPACK, parallel over matrices) and the CUDA source run
in emulation (Jacobi kernel for n <= 64, cusolverDnXsyevBatched for groups, cusolverDnXsyevd for
single large ones), against torch.linalg.eigh on the lower triangle; on the GPU too when present (the
Jacobi kernel and cuSOLVER themselves)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import natgrad_cuda as ng
from natgrad_cuda import emulation

IMPLS = ["reference", "native", "emulated"]
TOL = {torch.float32: 2e-4, torch.float64: 1e-11}


def spd_with_garbage(n, dtype, gen, rank=None, separated=False):
    """A symmetric PSD matrix in the lower triangle, garbage above it (which must not be read)."""
    if separated:  # distinct eigenvalues, so eigenvectors are unique up to sign
        Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
        M = Q @ torch.diag(torch.linspace(1.0, 2.0 * n, n, dtype=torch.float64)) @ Q.T
    else:
        X = torch.randn(n, rank if rank is not None else n, dtype=torch.float64, generator=gen)
        M = X @ X.T / max(n, 1)
    M = M.to(dtype)
    return M + torch.triu(torch.randn(n, n, dtype=dtype, generator=gen), 1) * 1e3


def check(M, d, Q, dtype, slack=1.0):
    """d, Q: the eigendecomposition of M's lower triangle, to TOL[dtype] times ``slack``."""
    M, d, Q = M.cpu(), d.cpu(), Q.cpu()
    n = M.shape[0]
    S = (M.tril() + M.tril(-1).T).double()
    ref = torch.linalg.eigvalsh(S)
    scale = max(float(S.abs().max()), 1e-30) if n else 1.0
    assert d.dtype == dtype and Q.dtype == dtype and d.shape == (n,) and Q.shape == (n, n)
    assert torch.all(d[1:] >= d[:-1]), "eigenvalues not ascending"
    if n == 0:
        return
    assert (d.double() - ref).abs().max() <= slack * TOL[dtype] * scale
    assert (Q.double() @ torch.diag(d.double()) @ Q.double().T - S).abs().max() <= slack * 4 * TOL[dtype] * scale
    assert (Q.double().T @ Q.double() - torch.eye(n, dtype=torch.float64)).abs().max() <= \
        slack * 4 * TOL[dtype] * max(n, 1)


SIZES = [0, 1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 97, 97, 128, 257]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_on_mixed_sizes(impl, dtype, to_device, tol):
    gen = torch.Generator().manual_seed(0)
    mats = [spd_with_garbage(n, dtype, gen) for n in SIZES]
    out = ng.ops.eigh_batched(to_device(mats), impl=impl)
    assert len(out) == len(mats)
    for M, (d, Q) in zip(mats, out):
        check(M, d, Q, dtype, tol(1.0, dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_eigenvectors_match_up_to_sign(impl, to_device, tol):
    gen = torch.Generator().manual_seed(1)
    mats = [spd_with_garbage(n, torch.float64, gen, separated=True) for n in (5, 40, 70, 70, 130)]
    for M, (d, Q) in zip(mats, ng.ops.eigh_batched(to_device(mats), impl=impl)):
        _, Qr = torch.linalg.eigh(M, UPLO="L")
        cos = (Q.cpu() * Qr).sum(0).abs()
        assert torch.allclose(cos, torch.ones_like(cos), atol=tol(1e-9))


@pytest.mark.parametrize("impl", IMPLS)
def test_dead_units_rank_deficient_and_degenerate(impl, to_device, tol):
    gen = torch.Generator().manual_seed(2)
    mats = [torch.zeros(6, 6), torch.zeros(80, 80), torch.eye(9) * 3, spd_with_garbage(20, torch.float32, gen, rank=3),
            spd_with_garbage(90, torch.float32, gen, rank=5), torch.ones(33, 33)]
    for M, (d, Q) in zip(mats, ng.ops.eigh_batched(to_device(mats), impl=impl)):
        check(M, d, Q, torch.float32, tol(1.0, torch.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl, to_device, tol):
    gen = torch.Generator().manual_seed(3)
    big = spd_with_garbage(150, torch.float64, gen)
    mats = [big[::2, ::2], big[:70, :70], big.T.contiguous().T, spd_with_garbage(12, torch.float64, gen)[:, :].T.T]
    for M, (d, Q) in zip(mats, ng.ops.eigh_batched(to_device(mats), impl=impl)):
        check(M, d, Q, torch.float64, tol(1.0))


# the device fixtures (conftest.py) hold no state: the examples may share them
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 80), min_size=1, max_size=5), double=st.booleans(), seed=st.integers(0, 99))
def test_fuzzed_sizes_emulated_and_native(sizes, double, seed, kernel_impls, to_device, tol):
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    mats = [spd_with_garbage(n, dtype, gen) for n in sizes]
    for impl in kernel_impls:
        for M, (d, Q) in zip(mats, ng.ops.eigh_batched(to_device(mats), impl=impl)):
            check(M, d, Q, dtype, tol(1.0, dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_input_gives_nan(impl, to_device):
    bad = torch.eye(4)
    bad[2, 1] = float("nan")
    (d, Q), (d2, Q2) = ng.ops.eigh_batched(to_device([bad, torch.eye(3)]), impl=impl)
    assert torch.isnan(d).all() and torch.isnan(Q).all()
    assert torch.equal(d2.cpu(), torch.ones(3))


def test_float32_overflow_is_retried_in_float64():
    """Squares of 1e20 overflow float32: the Jacobi kernel gives up, syevd in float64 redoes it."""
    M = torch.diag(torch.tensor([1e20, 2e20, 3e20])) + 1e18 * torch.ones(3, 3)
    with emulation.count() as c:
        (d, Q), = ng.ops.eigh_batched([M], impl="emulated")
    assert c.by_name.get("cusolverDnXsyevd") == 1
    ref = torch.linalg.eigvalsh(M.double())
    assert torch.allclose(d.double(), ref, rtol=1e-6)
    assert d.dtype == torch.float32 and torch.isfinite(Q).all()


@pytest.mark.parametrize("n", [70, 80])
def test_the_emulated_solver_works_in_float32_as_cusolver(n):
    """The emulated cuSOLVER decomposes a float32 matrix in float32 (LAPACK's ssyevd), not in
    float64: its rounding, and its failures, are those of a float32 solver."""
    gen = torch.Generator().manual_seed(n)
    X = torch.randn(n, n + 3, generator=gen, dtype=torch.float64)
    M = (X @ X.T / (n + 3)).float()
    M = (M + M.T) / 2
    with emulation.count() as c:
        (d, Q), (d2, _) = ng.ops.eigh_batched([M, M.clone()], impl="emulated")
    assert c.by_name.get("cusolverDnXsyevBatched") == 1
    assert torch.equal(d, torch.linalg.eigh(M).eigenvalues) and torch.equal(d, d2)  # float32 LAPACK, bit for bit
    assert not torch.equal(d, torch.linalg.eigvalsh(M.double()).float())  # not float64 rounded


def test_launches_do_not_grow_with_equal_layers():
    gen = torch.Generator().manual_seed(4)
    for count in (1, 16, 64):
        mats = [spd_with_garbage(32, torch.float32, gen) for _ in range(count)]
        mats += [spd_with_garbage(96, torch.float32, gen) for _ in range(count)]
        with emulation.count() as c:
            ng.ops.eigh_batched(mats, impl="emulated")
        assert c.launches == 1
        expect = {"cusolverDnXsyevBatched": 1, "cusolverDnXsyevBatched_bufferSize": 1} if count > 1 else {
            "cusolverDnXsyevd": 1, "cusolverDnXsyevd_bufferSize": 1}
        assert {k: v for k, v in c.by_name.items() if k.startswith("cusolver")} == expect


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_opcheck(ns, to_device):
    gen = torch.Generator().manual_seed(5)
    mats = [spd_with_garbage(n, torch.float64, gen).tril() for n in (3, 40, 70)]
    mats = to_device([M + M.tril(-1).T for M in mats])  # symmetric: opcheck compares against fake/meta too
    torch.library.opcheck(getattr(torch.ops, ns).eigh_batched.default, (mats,),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input(impl):
    with pytest.raises(ValueError, match=r"mats\[1\] must be a square matrix"):
        ng.ops.eigh_batched([torch.eye(2), torch.zeros(2, 3)], impl=impl)
    with pytest.raises(ValueError, match="float32 or float64"):
        ng.ops.eigh_batched([torch.eye(2, dtype=torch.float16)], impl=impl)
    with pytest.raises(TypeError, match="tensor"):
        ng.ops.eigh_batched([[1.0]], impl=impl)
    with pytest.raises(ValueError, match="square"):
        ng.ops.eigh_batched([torch.zeros(3)], impl=impl)
    assert ng.ops.eigh_batched([], impl=impl) == []


def test_native_entry_point_checks_too():
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.natgrad.eigh_batched([torch.zeros(2, 3)])
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.natgrad_emu.eigh_batched([torch.zeros(2, 3)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [5, 33, 64])
def test_the_jacobi_kernel_stops_when_a_sweep_rotates_nothing(n, dtype):
    """The stopping rule is reachable for every size (an off-diagonal mass below eps^2 ||A||^2 is not
    for n > 32 in float32): 4-10 sweeps here, against the budget of 30. A sweep costs 7 barriers
    plus 3 per round of m - 1 rounds (m = n rounded up to even), the set-up and the last check 8."""
    gen = torch.Generator().manual_seed(n)
    X = torch.randn(n, n + 3, dtype=torch.float64, generator=gen)
    A = (X @ X.T / (n + 3)).to(dtype)
    with emulation.count() as c:
        (w, V), = ng.ops.eigh_batched([A], impl="emulated")
    m = n + n % 2
    sweeps = (c.barriers - 8) / (7 + 3 * (m - 1))
    assert sweeps == int(sweeps) and 2 <= sweeps <= 12
    ref = torch.linalg.eigvalsh(A.double())
    assert (w.double() - ref).abs().max() <= TOL[dtype] * ref.abs().max()
    assert (V.double().T @ V.double() - torch.eye(n, dtype=torch.float64)).abs().max() <= TOL[dtype]
    # A diagonal matrix needs no sweep at all.
    with emulation.count() as c:
        ng.ops.eigh_batched([torch.diag(torch.arange(1.0, n + 1, dtype=dtype))], impl="emulated")
    assert c.barriers == 8
