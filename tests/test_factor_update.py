"""ops.factor_update_: reference against the native kernels (CPU, and CUDA when present) and the
emulated CUDA kernel over shapes, dtypes and layouts; opcheck; bad input; launches per call on the
CUDA path."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import natgrad_cuda as ng
from natgrad_cuda import ops, reference

native = pytest.mark.skipif(not ng._ext.native_available("cpu"), reason="extension not built")
emulated = pytest.mark.skipif(not ng.emulation.available(), reason="emulated backend not built")
# The compiled implementations, each checked against the reference.
IMPLS = [pytest.param("native", marks=native), pytest.param("emulated", marks=emulated)]

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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "rows,widths",
    [([0], [3]), ([1], [1]), ([7], [5]), ([13, 1, 64], [31, 33, 1]), ([129], [97]), ([300], [257]),
     ([5] * 20, list(range(1, 21))), ([2048], [65]), ([3, 40], [0, 32]),
     ([8192, 30], [16, 16])],  # a tall narrow layer (BLAS on the CPU) beside a short one (direct loop)
)
@pytest.mark.parametrize("transpose", [False, True])
def test_matches_reference_fp64(impl, rows, widths, transpose, to_device, tol):
    factors, inputs, ones = _case(rows, widths, transpose=transpose)
    expected = [F.clone() for F in factors]
    scales = [1.0 / (i + 1) for i in range(len(factors))]
    ops.factor_update_(expected, inputs, 0.9, scales, ones, impl="reference")
    factors = to_device(factors)
    ops.factor_update_(factors, to_device(inputs), 0.9, scales, ones, impl=impl)
    for F, E in zip(factors, expected):
        F = F.cpu()
        assert _rel(F, E) < tol(TOL[torch.float64])
        assert torch.equal(F, F.T) or _rel(F, F.T) < 1e-15


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fdtype", [torch.float32, torch.float64])
def test_dtypes(impl, xdtype, fdtype, to_device, tol):
    factors, inputs, ones = _case([37, 64], [17, 40], fdtype=fdtype, xdtype=xdtype, seed=3)
    expected = [F.clone() for F in factors]
    ops.factor_update_(expected, inputs, 0.5, [0.1, 2.0], ones, impl="reference")
    factors = to_device(factors)
    ops.factor_update_(factors, to_device(inputs), 0.5, [0.1, 2.0], ones, impl=impl)
    for F, E in zip(factors, expected):
        assert F.dtype == fdtype
        assert _rel(F.cpu(), E) < tol(TOL[fdtype], fdtype)


@native
def test_default_impl_is_native_when_built(to_device):
    factors, inputs, ones = _case([10], [3])
    expected = [F.clone() for F in factors]
    ops.factor_update_(expected, inputs, 1.0, [1.0], ones, impl="reference")
    factors = to_device(factors)
    ops.factor_update_(factors, to_device(inputs), 1.0, [1.0], ones)
    assert _rel(factors[0].cpu(), expected[0]) < 1e-13


@emulated
def test_mixed_dtypes_in_one_call():
    # Layers of different (factor, input) dtypes: grouped, one launch per group.
    f1, x1, o1 = _case([20], [9], fdtype=torch.float32, xdtype=torch.float16, seed=5)
    f2, x2, o2 = _case([30], [12], fdtype=torch.float64, xdtype=torch.float64, seed=6)
    f3, x3, o3 = _case([10], [7], fdtype=torch.float32, xdtype=torch.float16, seed=7)
    factors, inputs, ones = f1 + f2 + f3, x1 + x2 + x3, o1 + o2 + o3
    expected = [F.clone() for F in factors]
    ops.factor_update_(expected, inputs, 0.7, [1.0, 0.5, 2.0], ones, impl="reference")
    with ng.emulation.count() as c:
        ops.factor_update_(factors, inputs, 0.7, [1.0, 0.5, 2.0], ones, impl="emulated")
    assert c.launches == 2
    for F, E in zip(factors, expected):
        assert _rel(F, E) < TOL[F.dtype]


@emulated
@pytest.mark.parametrize("layers", [1, 4, 64])
def test_one_launch_per_call_on_the_cuda_path(layers):
    factors, inputs, ones = _case([16] * layers, [(7 * i) % 40 + 1 for i in range(layers)], fdtype=torch.float32,
                                  xdtype=torch.float32)
    with ng.emulation.count() as c:
        ops.factor_update_(factors, inputs, 0.95, [1.0] * layers, ones, impl="emulated")
    assert (c.launches, c.library_calls) == (1, 0)


@native
# the device fixtures (conftest.py) hold no state: the examples may share them
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70), st.booleans()), min_size=1, max_size=5),
    decay=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fuzzed_shapes_all_impls_agree(shapes, decay, seed, kernel_impls, to_device, tol):
    shapes = [(n, d, a) for n, d, a in shapes if d + a > 0] or [(3, 2, True)]
    rows, widths, ones = zip(*shapes)
    factors, inputs, ones = _case(rows, widths, ones=list(ones), seed=seed)
    scales = [0.5 + i for i in range(len(factors))]
    expected = [F.clone() for F in factors]
    ops.factor_update_(expected, inputs, decay, scales, ones, impl="reference")
    for impl in kernel_impls:
        if impl == "emulated" and not ng.emulation.available():
            continue
        got = to_device([F.clone() for F in factors])
        ops.factor_update_(got, to_device(inputs), decay, scales, ones, impl=impl)
        for F, E in zip(got, expected):
            assert _rel(F.cpu(), E) < tol(1e-12), impl


@native
@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_opcheck(ns, to_device):
    factors, inputs, ones = to_device(_case([11, 4], [6, 3], fdtype=torch.float32, xdtype=torch.float32))
    op = getattr(torch.ops, ns).factor_update_.default
    torch.library.opcheck(op, (factors, inputs, 0.95, [0.5, 1.0], ones))


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
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


@pytest.mark.parametrize("impl", ["reference", "native", "emulated"])
def test_decay_zero_does_not_read_the_factor(impl, to_device):
    """As BLAS's beta = 0: an uninitialised (here NaN) factor is overwritten, not propagated."""
    from natgrad_cuda.curvature.rules import conv_patches

    g = torch.Generator().manual_seed(0)
    X = [torch.randn(9, w, generator=g) for w in (3, 70)]
    patches = conv_patches(torch.nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 2, 5, 5, generator=g))
    inputs = X + [patches]
    widths = [4, 71, 19]
    bad = to_device([torch.full((w, w), float("nan")) for w in widths])
    good = [torch.zeros(w, w) for w in widths]
    ops.factor_update_(bad, to_device(inputs), 0.0, [0.5] * 3, [True] * 3, impl=impl)
    ops.factor_update_(good, inputs, 1.0, [0.5] * 3, [True] * 3, impl="reference")
    for a, b in zip(bad, good):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def test_a_cpu_input_with_cuda_factors_is_refused_by_the_kernel_entry(device):
    # The C++ entry point checks devices itself (torch.ops calls skip ops.py's checks): a host
    # pointer in a CUDA kernel would poison the CUDA context.
    if device != "cuda":
        pytest.skip("needs a GPU: on the CPU there is no second device to mix up")
    F = torch.zeros(3, 3, device=device)
    with pytest.raises(RuntimeError, match=r"must be on cuda"):
        torch.ops.natgrad.factor_update_([F], [torch.randn(5, 3)], 1.0, [1.0], [False])
    assert F.eq(0).all()


@pytest.mark.parametrize("fdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["native", "emulated"])
def test_tall_factors_split_the_rows(impl, fdtype, to_device, tol, device):
    """Split-K on the CUDA path: a launch with too few tiles for the GPU cuts tall layers' rows into
    slices and sums the partial tiles in a second launch; short layers of the same call stay whole."""
    if device == "cuda" and impl == "emulated":
        pytest.skip("emulation runs on the CPU")
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(4, 3, 30, 30, generator=gen)
    inputs = [torch.randn(3000, 20, generator=gen), torch.randn(50, 9, generator=gen),
              ops.ConvPatches(image, (3, 3), padding=(1, 1, 1, 1))]
    ones = [True, False, True]
    start = []
    for x, o in zip(inputs, ones):
        d = (x.image.shape[1] * 9 if isinstance(x, ops.ConvPatches) else x.shape[1]) + o
        S = torch.randn(d, d, generator=gen, dtype=fdtype)
        start.append(S + S.T)
    ref = [S.clone() for S in start]
    ops.factor_update_(ref[:2], inputs[:2], 0.9, [0.3, 1.0], ones[:2], impl="reference")
    ops.factor_update_(ref[2:], [inputs[2].unfold()], 0.9, [0.01], ones[2:], impl="reference")
    out = to_device([S.clone() for S in start])
    if impl == "emulated":
        with ng.emulation.count() as c:
            ops.factor_update_(out[:2], inputs[:2], 0.9, [0.3, 1.0], ones[:2], impl=impl)
        assert c.by_name == {f"factor_update_kernel<x_t, {'double' if fdtype == torch.float64 else 'float'}>": 1,
                             f"factor_reduce_kernel<{'double' if fdtype == torch.float64 else 'float'}>": 1}
    else:
        ops.factor_update_(out[:2], to_device(inputs[:2]), 0.9, [0.3, 1.0], ones[:2], impl=impl)
    ops.factor_update_(out[2:], to_device(inputs[2:]), 0.9, [0.01], ones[2:], impl=impl)
    rtol = tol(1e-5 if fdtype == torch.float32 else 1e-12, fdtype)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=rtol * b.abs().max().item())
