"""ops.eigh_refine: an eigenbasis refined from a previous one, and its certificate. The oracle is the
certificate recomputed in float64 from the dense matrix, and the Loewner bound it promises; on the CPU
and on the GPU when present (torch's BLAS and solvers there)."""
from __future__ import annotations

import pytest
import torch

from natgrad_cuda import _ext, emulation, ops


def psd(n, rank=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank or 2 * n, dtype=torch.float64, generator=g)
    return (X @ X.T / X.shape[1]).to(dtype)


def perturbed(F, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(F.shape, dtype=torch.float64, generator=g)
    return (F.double() + size * (E + E.T) / 2).to(F.dtype)


def dense_certificate(F, d, V, tau):
    """The certificate from scratch in float64: (D + tau)^-1/2 (V^T F V - D) (D + tau)^-1/2."""
    F, V = F.double(), V.double()
    S = V.T @ F @ V
    D = torch.diag(S)
    s = (D + tau).rsqrt()
    K = (S - torch.diag(D)) * s[:, None] * s[None, :]
    return float(torch.linalg.matrix_norm(K)), S


def impls(device):
    out = ["reference"]
    if _ext.native_available(torch.device(device)):
        out.append("native")
    if emulation.available() and device == "cpu":  # the emulation takes CPU tensors only
        out.append("emulated")
    return out


def cpu(results):
    return [tuple(t.cpu() for t in r) for r in results]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_certificate_matches_its_dense_definition_and_bounds_the_error(dtype, iterations, to_device):
    tau = 1e-3
    F = psd(40, rank=25, dtype=dtype)  # rank deficient, as a factor of few rows
    Q = torch.linalg.eigh(perturbed(F, 1e-3).double())[1].to(dtype)
    (d, V, kappa), = cpu(ops.eigh_refine(to_device([F]), to_device([Q]), [tau], tol=0.0, iterations=iterations))
    assert d.dtype == V.dtype == dtype and kappa.dtype == torch.float64
    eps = torch.finfo(dtype).eps
    assert torch.all(d[1:] >= d[:-1])  # ascending
    assert torch.allclose(V.double().T @ V.double(), torch.eye(40, dtype=torch.float64), atol=100 * eps)
    k, S = dense_certificate(F, d, V, tau)
    # rounding of S in the working dtype: about eps |F| per entry, scaled by 1 / tau
    slack = 40 * eps * float(torch.linalg.matrix_norm(F.double())) / tau
    assert abs(float(kappa) - k) <= 1e-9 + slack
    assert torch.allclose(d.double(), torch.diag(S), atol=10 * eps * float(F.double().norm()))
    if dtype == torch.float64:  # the promise: (1 - k)(A + tau) <= F + tau <= (1 + k)(A + tau), A = V D V^T
        A = V @ torch.diag(d) @ V.T + tau * torch.eye(40, dtype=dtype)
        L = torch.linalg.cholesky(A)
        Li = torch.linalg.inv(L)
        w = torch.linalg.eigvalsh(Li @ (F + tau * torch.eye(40, dtype=dtype)) @ Li.T)
        assert w.min() >= 1 - k - 1e-9 and w.max() <= 1 + k + 1e-9


def test_iterations_converge_from_a_nearby_basis(to_device):
    F = psd(30, seed=2)  # full rank, eigenvalues at least 0.0099 apart
    Q = torch.linalg.eigh(perturbed(F, 1e-3, seed=3))[1]  # a perturbation below the gaps
    F, Q = to_device((F, Q))
    kappas = [float(ops.eigh_refine([F], [Q], [1e-3], tol=0.0, iterations=i)[0][2]) for i in range(4)]
    assert kappas[0] > 1e-2
    # quadratic: each iteration about squares the error (4.3e-2, 1.8e-3, 2.2e-6, 1.5e-11 here)
    assert kappas[1] < 0.1 * kappas[0] and kappas[2] < 10 * kappas[1] ** 2 and kappas[3] < 10 * kappas[2] ** 2
    d, V, k = ops.eigh_refine([F], [Q], [1e-3], tol=1e-8, iterations=6)[0]
    assert float(k) <= 1e-8
    assert torch.allclose(d.cpu(), torch.linalg.eigvalsh(F.cpu()), rtol=0, atol=1e-10)


def test_stops_at_the_tolerance_and_keeps_an_exact_basis(to_device):
    F = psd(20, seed=4)
    d0, Q = torch.linalg.eigh(F)
    far = torch.linalg.eigh(perturbed(F, 0.05, seed=5))[1]
    F, Q, d0, far = to_device((F, Q, d0, far))
    d, V, k = ops.eigh_refine([F], [Q], [1e-3], tol=1e-6, iterations=5)[0]
    assert float(k) < 1e-10
    assert torch.equal(V, Q)  # certified at once: nothing turned
    assert torch.allclose(d, d0, atol=1e-12)
    # a basis far off is refined only while over the tolerance
    loose = float(ops.eigh_refine([F], [far], [1e-3], tol=10.0, iterations=5)[0][2])
    tight = float(ops.eigh_refine([F], [far], [1e-3], tol=0.0, iterations=5)[0][2])
    assert tight < loose <= 10.0


def test_reads_the_lower_triangle_only_and_batches(to_device):
    mats = [psd(n, seed=n) for n in (1, 7, 16)]
    bases = [torch.linalg.eigh(perturbed(M, 1e-3, seed=n))[1] for n, M in zip((1, 7, 16), mats)]
    mats, bases = to_device((mats, bases))
    whole = ops.eigh_refine(mats, bases, [1e-2, 1e-3, 1e-4], tol=0.0, iterations=2)
    junk = [M.tril() + torch.triu(torch.full_like(M, 7.0), 1) for M in mats]
    lower = ops.eigh_refine(junk, bases, [1e-2, 1e-3, 1e-4], tol=0.0, iterations=2)
    for (d, V, k), (d2, V2, k2), M, B, tau in zip(whole, lower, mats, bases, [1e-2, 1e-3, 1e-4]):
        assert torch.equal(d, d2) and torch.equal(V, V2) and torch.equal(k, k2)
        alone = ops.eigh_refine([M], [B], [tau], tol=0.0, iterations=2)[0]
        assert torch.equal(alone[0], d) and torch.equal(alone[1], V)
    assert ops.eigh_refine([], [], []) == []


def test_every_impl_runs_the_same_composition(device, to_device):
    F = psd(24, rank=10, seed=6, dtype=torch.float32)
    Q = torch.linalg.eigh(perturbed(F, 1e-3).double())[1].float()
    F, Q = to_device((F, Q))
    ref = ops.eigh_refine([F], [Q], [1e-3], tol=0.0, iterations=2, impl="reference")[0]
    for impl in impls(device):
        got = ops.eigh_refine([F], [Q], [1e-3], tol=0.0, iterations=2, impl=impl)[0]
        assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_non_finite_matrices_have_an_infinite_certificate(to_device):
    F = psd(8)
    Q = torch.linalg.eigh(F)[1]
    bad = F.clone()
    bad[3, 2] = float("nan")
    F, Q, bad = to_device((F, Q, bad))
    (_, _, k_bad), (_, _, k_ok) = ops.eigh_refine([bad, F], [Q, Q], [1e-3, 1e-3], iterations=2)
    assert k_bad == float("inf") and float(k_ok) < 1e-8
    neg = -torch.eye(8, dtype=torch.float64)  # a diagonal below -tau: no Loewner bound at that shift
    neg, eye = to_device((neg, torch.eye(8, dtype=torch.float64)))
    assert float(ops.eigh_refine([neg], [eye], [1e-3])[0][2]) == float("inf")


def test_checks_its_arguments():
    F = psd(5)
    Q = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="bases and shifts"):
        ops.eigh_refine([F], [Q, Q], [1.0])
    with pytest.raises(ValueError, match="bases\\[0\\] must have"):
        ops.eigh_refine([F], [Q.float()], [1.0])
    with pytest.raises(ValueError, match="bases\\[0\\] must be a square"):
        ops.eigh_refine([F], [Q[:, :3]], [1.0])
    with pytest.raises(ValueError, match="shifts\\[0\\]"):
        ops.eigh_refine([F], [Q], [0.0])
    with pytest.raises(ValueError, match="iterations"):
        ops.eigh_refine([F], [Q], [1.0], iterations=-1)
    with pytest.raises(ValueError, match="iterations must be an int"):
        ops.eigh_refine([F], [Q], [1.0], iterations=1.5)
    with pytest.raises(ValueError, match="tol"):
        ops.eigh_refine([F], [Q], [1.0], tol=-1.0)
    with pytest.raises(ValueError, match="impl"):
        ops.eigh_refine([F], [Q], [1.0], impl="cuda")
    with pytest.raises(ValueError, match="requires grad"):
        ops.eigh_refine([F.requires_grad_()], [Q], [1.0])
