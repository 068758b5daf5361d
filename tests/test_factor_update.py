"""ops.factor_update_: reference against the native CPU kernel over shapes, dtypes and layouts."""
import math

import pytest
import torch

import natgrad_cuda as ng
from natgrad_cuda import ops, reference

native = pytest.mark.skipif(not ng._ext.native_available("cpu"), reason="extension not built")

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _case(rows, widths, fdtype=torch.float64, xdtype=torch.float64, ones=None, seed=0, transpose=False):
    g = torch.Generator().manual_seed(seed)
    ones = ones if ones is not None else [bool(i % 2) for i in range(len(widths))]
    factors, inputs = [], []
    for n, d, a in zip(rows, widths, ones):
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        # transpose: a non-contiguous (column-major) view of the same values
        X = X.T.contiguous().T if transpose else X
        inputs.append(X.to(xdtype))
        B = torch.randn(d + a, d + a, generator=g, dtype=torch.float64)
        factors.append((B @ B.T).to(fdtype))  # symmetric, like every real factor
    return factors, inputs, ones


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def test_reference_matches_definition():
    X = torch.randn(9, 4, dtype=torch.float64)
    F = torch.eye(5, dtype=torch.float64)
    reference.factor_update_([F], [X], 0.25, [0.5], [True])
    Xa = torch.cat([X, torch.ones(9, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(F, 0.25 * torch.eye(5, dtype=torch.float64) + 0.5 * Xa.T @ Xa, rtol=0, atol=1e-13)


@native
@pytest.mark.parametrize(
    "rows,widths",
    [([0], [3]), ([1], [1]), ([7], [5]), ([13, 1, 64], [31, 33, 1]), ([129], [97]), ([300], [257]),
     ([5] * 20, list(range(1, 21))), ([2048], [65])],
)
@pytest.mark.parametrize("transpose", [False, True])
def test_native_matches_reference_fp64(rows, widths, transpose):
    factors, inputs, ones = _case(rows, widths, transpose=transpose)
    expected = [F.clone() for F in factors]
    scales = [1.0 / (i + 1) for i in range(len(factors))]
    ops.factor_update_(expected, inputs, 0.9, scales, ones, impl="reference")
    ops.factor_update_(factors, inputs, 0.9, scales, ones, impl="native")
    for F, E in zip(factors, expected):
        assert _rel(F, E) < TOL[torch.float64]
        assert torch.equal(F, F.T) or _rel(F, F.T) < 1e-15


@native
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fdtype", [torch.float32, torch.float64])
def test_native_dtypes(xdtype, fdtype):
    factors, inputs, ones = _case([37, 64], [17, 40], fdtype=fdtype, xdtype=xdtype, seed=3)
    expected = [F.clone() for F in factors]
    ops.factor_update_(expected, inputs, 0.5, [0.1, 2.0], ones, impl="reference")
    ops.factor_update_(factors, inputs, 0.5, [0.1, 2.0], ones, impl="native")
    for F, E in zip(factors, expected):
        assert F.dtype == fdtype
        assert _rel(F, E) < TOL[fdtype]


@native
def test_default_impl_is_native_when_built():
    factors, inputs, ones = _case([10], [3])
    expected = [F.clone() for F in factors]
    ops.factor_update_(expected, inputs, 1.0, [1.0], ones, impl="reference")
    ops.factor_update_(factors, inputs, 1.0, [1.0], ones)
    assert _rel(factors[0], expected[0]) < 1e-13


@native
def test_opcheck():
    factors, inputs, ones = _case([11, 4], [6, 3], fdtype=torch.float32, xdtype=torch.float32)
    torch.library.opcheck(torch.ops.natgrad.factor_update_.default, (factors, inputs, 0.95, [0.5, 1.0], ones))


@pytest.mark.parametrize("impl", ["reference", pytest.param("native", marks=native)])
def test_bad_input(impl):
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="inputs"):
        ops.factor_update_([torch.zeros(3, 3)], [], 1.0, [1.0], [False], impl=impl)
    with pytest.raises(ValueError, match=r"factors\[0\]"):
        ops.factor_update_([torch.zeros(3, 3)], [X], 1.0, [1.0], [True], impl=impl)
    with pytest.raises(ValueError, match="decay"):
        ops.factor_update_([torch.zeros(3, 3)], [X], math.nan, [1.0], [False], impl=impl)
    with pytest.raises(ValueError, match=r"scales\[0\]"):
        ops.factor_update_([torch.zeros(3, 3)], [X], 1.0, [math.inf], [False], impl=impl)
    with pytest.raises(ValueError, match=r"inputs\[0\]"):
        ops.factor_update_([torch.zeros(3, 3)], [torch.randn(2, 4, 3)], 1.0, [1.0], [False], impl=impl)
    with pytest.raises(ValueError, match=r"factors\[0\]"):
        ops.factor_update_([torch.zeros(3, 3, dtype=torch.int64)], [X], 1.0, [1.0], [False], impl=impl)
    with pytest.raises(ValueError, match="impl"):
        ops.factor_update_([torch.zeros(3, 3)], [X], 1.0, [1.0], [False], impl="gpu")
