"""The CUDA ops' library path (ops.set_library_gemms): products of at least min_macs multiply-adds
go to cuBLAS (emulated here, cuBLAS itself on a GPU), the grouped kernel then only applying the
epilogue to the library's product; the rest stay in the grouped kernels. Both paths against the
reference, the number of library calls and launches, the rounding of TF32 and BF16 operands, and
the setting itself."""
from __future__ import annotations

import zlib

import pytest
import torch

import natgrad_cuda as ng
from natgrad_cuda import emulation

ALL, NONE = 0, 2 ** 62  # min_macs sending every product to the library, or none


@pytest.fixture(autouse=True)
def _restore_setting():
    before = ng.ops.library_gemms()
    yield
    ng.ops.set_library_gemms(**before)


@pytest.fixture
def cuda_impl(device):
    """The CUDA kernels for the test's device: emulated on the CPU, native on a GPU."""
    if device == "cpu" and not emulation.available():
        pytest.skip("emulated backend not built")
    return "emulated" if device == "cpu" else "native"


def _spd(n, gen):
    X = torch.randn(n, n + 3, dtype=torch.float64, generator=gen)
    return X @ X.T / (n + 3)


def _eig_layers(shapes, gen, dtype, grad_dtype=None, rank=None):
    grads, QA, dA, QG, dG = [], [], [], [], []
    for o, k in shapes:
        eA, VA = torch.linalg.eigh(_spd(k, gen))
        eG, VG = torch.linalg.eigh(_spd(o, gen))
        if rank:
            eA, VA, eG, VG = eA[-rank:], VA[:, -rank:], eG[-rank:], VG[:, -rank:]
        grads.append(torch.randn(o, k, dtype=torch.float64, generator=gen).to(grad_dtype or dtype))
        QA.append(VA.to(dtype))
        dA.append(eA.to(dtype))
        QG.append(VG.to(dtype))
        dG.append(eG.to(dtype))
    return grads, QA, dA, QG, dG


SHAPES = [(12, 20), (20, 9), (1, 5)]


def _case(op, dtype, grad_dtype, device):
    """(run(impl) -> outputs, products per call): the op on fixed inputs (fresh copies per run for the
    in-place factor_update_), and how many GEMMs it computes (one per layer per stage)."""
    gen = torch.Generator().manual_seed(zlib.crc32(op.encode()))
    move = lambda xs: [x.to(device) for x in xs]  # noqa: E731
    if op.startswith("precondition"):
        inverse = "factored" if "factored" in op else "eigen"
        rank = 4 if "lowrank" in op else None
        cols = [move(c) for c in _eig_layers(SHAPES, gen, dtype, grad_dtype, rank)]
        return (lambda impl: ng.ops.precondition(*cols, 1e-2, inverse=inverse, impl=impl)), 4 * len(SHAPES)
    if op == "ekfac_precondition":
        grads, QA, _, QG, _ = _eig_layers(SHAPES, gen, dtype, grad_dtype)
        S = [torch.rand(g.shape, dtype=dtype, generator=gen) for g in grads]
        cols = [move(c) for c in (grads, QA, QG, S)]
        return (lambda impl: ng.ops.ekfac_precondition(*cols, 1e-2, impl=impl)), 4 * len(SHAPES)
    if op == "kron_matmul":
        grads = [torch.randn(o, k, dtype=torch.float64, generator=gen).to(grad_dtype or dtype) for o, k in SHAPES]
        IA = [_spd(k, gen).to(dtype) for _, k in SHAPES]
        IG = [_spd(o, gen).to(dtype) for o, _ in SHAPES]
        cols = [move(c) for c in (grads, IA, IG)]
        return (lambda impl: ng.ops.kron_matmul(*cols, impl=impl)), 2 * len(SHAPES)
    assert op == "factor_update_"
    inputs = move([torch.randn(n, d, dtype=torch.float64, generator=gen).to(grad_dtype or dtype)
                   for n, d in ((40, 7), (9, 16), (700, 3))])
    inputs[1] = inputs[1].T.contiguous().T  # strided: a transposed view
    ones = [True, False, True]
    start = [_spd(x.shape[1] + o, gen).to(dtype) for x, o in zip(inputs, ones)]
    start = move([(F + F.T) / 2 for F in start])  # exactly symmetric, as the optimizer's factors

    def run(impl):
        factors = [f.clone() for f in start]
        ng.ops.factor_update_(factors, inputs, 0.9, [0.5, 1.0, 2.0], ones, impl=impl)
        return factors
    return run, len(inputs)


OPS = ["precondition", "precondition-factored", "precondition-lowrank", "precondition-lowrank-factored",
       "ekfac_precondition", "kron_matmul", "factor_update_"]
DTYPES = [(torch.float64, None), (torch.float32, None), (torch.float32, torch.bfloat16)]


def _close(got, expect, dtype, rtol=None):
    rtol = rtol or (1e-11 if dtype == torch.float64 else 2e-5)
    for g, e in zip(got, expect):
        g, e = g.double().cpu(), e.double().cpu()
        scale = e.abs().max().clamp_min(1e-30)
        assert ((g - e).abs().max() / scale).item() <= rtol, ((g - e).abs().max() / scale).item()


@pytest.mark.parametrize("dtype,grad_dtype", DTYPES, ids=["f64", "f32", "f32-bf16in"])
@pytest.mark.parametrize("op", OPS)
def test_library_and_grouped_paths_match_the_reference(op, dtype, grad_dtype, device, cuda_impl):
    run, _ = _case(op, dtype, grad_dtype, device)
    expect = run("reference")
    for min_macs in (ALL, NONE, 1500):  # every product, none, and a mix within one call
        with ng.ops.using_library_gemms(min_macs=min_macs, precision="ieee"):
            _close(run(cuda_impl), expect, dtype)


@pytest.mark.skipif(not emulation.available(), reason="emulated backend not built")
@pytest.mark.parametrize("op", OPS)
def test_library_calls_and_launches(op):
    run, products = _case(op, torch.float32, None, "cpu")
    with ng.ops.using_library_gemms(min_macs=NONE), emulation.count() as grouped:
        run("emulated")
    assert grouped.library_calls == 0
    with ng.ops.using_library_gemms(min_macs=ALL, precision="ieee"), emulation.count() as library:
        run("emulated")
    # factor_update_'s X~^T X~ is one SYRK in IEEE arithmetic (half a GEMM's products)
    name = "cublasSsyrk" if op == "factor_update_" else "cublasGemmEx"
    assert library.by_name.get(name, 0) == products == library.library_calls
    # Products whose result is stored as it is need no launch of ours; those with an epilogue (and
    # factor_update_'s decay and mirror) keep theirs, one per stage: never more launches than before.
    assert library.launches <= grouped.launches
    if op in ("kron_matmul",):
        assert library.launches == 0


@pytest.mark.skipif(not emulation.available(), reason="emulated backend not built")
def test_only_products_of_min_macs_go_to_the_library():
    gen = torch.Generator().manual_seed(3)
    shapes = [(30, 30), (4, 5)]  # 27000 and 100 / 80 multiply-adds per product
    grads = [torch.randn(o, k, generator=gen) for o, k in shapes]
    IA = [_spd(k, gen).float() for _, k in shapes]
    IG = [_spd(o, gen).float() for o, _ in shapes]
    with ng.ops.using_library_gemms(min_macs=27000), emulation.count() as c:
        got = ng.ops.kron_matmul(grads, IA, IG, impl="emulated")
    assert c.by_name.get("cublasGemmEx", 0) == 2 and c.launches == 2  # the small layer's two launches
    _close(got, ng.ops.kron_matmul(grads, IA, IG, impl="reference"), torch.float32)
    with ng.ops.using_library_gemms(min_macs=27001), emulation.count() as c:
        ng.ops.kron_matmul(grads, IA, IG, impl="emulated")
    assert c.library_calls == 0


def _one_by_one(value, precision, impl, device):
    M = torch.tensor([[value]], dtype=torch.float32, device=device)
    one = torch.ones(1, 1, dtype=torch.float32, device=device)
    with ng.ops.using_library_gemms(min_macs=ALL, precision=precision):
        return ng.ops.kron_matmul([M], [one], [one], impl=impl)[0].item()


@pytest.mark.parametrize("precision,value,expect", [
    ("ieee", 1 + 2 ** -12, 1 + 2 ** -12),
    ("tf32", 1 + 2 ** -12, 1.0),               # below half an ulp of 10 bits: rounded down
    ("tf32", 1 + 3 * 2 ** -11, 1 + 2 ** -9),   # a tie: to even
    ("tf32", 1 + 2 ** -11, 1.0),               # a tie: to even
    ("tf32", 1 + 2 ** -9, 1 + 2 ** -9),        # representable: kept
    ("bf16", 1 + 2 ** -9, 1.0),
    ("bf16", 1 + 3 * 2 ** -8, 1 + 2 ** -6),    # a tie: to even
])
def test_tensor_core_operands_are_rounded_to_nearest_even(precision, value, expect, device, cuda_impl):
    assert _one_by_one(value, precision, cuda_impl, device) == expect


@pytest.mark.parametrize("op", ["precondition", "factor_update_"])
def test_reduced_precision_float32_and_untouched_float64(op, device, cuda_impl):
    """TF32 and BF16 change float32 results by about their rounding (2^-11, 2^-8 relative) and not at
    all in float64; bf16 inputs to factor_update_ are exact in any mode (products of bf16 values)."""
    run64, _ = _case(op, torch.float64, None, device)
    with ng.ops.using_library_gemms(min_macs=ALL, precision="ieee"):
        exact64 = run64(cuda_impl)
    for precision in ("tf32", "bf16"):
        with ng.ops.using_library_gemms(min_macs=ALL, precision=precision):
            assert all(torch.equal(a, b) for a, b in zip(run64(cuda_impl), exact64))
    run32, _ = _case(op, torch.float32, None, device)
    errors = {}
    for precision in ("ieee", "tf32", "bf16"):
        with ng.ops.using_library_gemms(min_macs=ALL, precision=precision):
            got = run32(cuda_impl)
        errors[precision] = max(((g.double() - e).norm() / e.norm()).item() for g, e in zip(got, run64("reference")))
    assert errors["ieee"] < 1e-5
    assert errors["ieee"] < errors["tf32"] < 5e-3, errors
    assert errors["tf32"] < errors["bf16"] < 4e-2, errors
    if op == "factor_update_":
        runb, _ = _case(op, torch.float32, torch.bfloat16, device)
        outs = []
        for precision in ("ieee", "tf32", "bf16"):
            with ng.ops.using_library_gemms(min_macs=ALL, precision=precision):
                outs.append(runb(cuda_impl))
        assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_update_library_gram_is_exactly_symmetric(dtype, device, cuda_impl):
    """SYRK (IEEE) or a whole-square GEMM (TF32): either way the factor comes out bitwise symmetric,
    the decay and scale applied by the kernel, as on the kernel's own path."""
    run, _ = _case("factor_update_", dtype, None, device)
    expect = run("reference")
    for precision in ("ieee", "tf32"):
        with ng.ops.using_library_gemms(min_macs=ALL, precision=precision):
            got = run(cuda_impl)
        for F in got:
            assert torch.equal(F, F.T)
        if precision == "ieee" or dtype == torch.float64:
            _close(got, expect, dtype)


def test_torch_precision_follows_torch_tf32_flag(device, cuda_impl):
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow, same_as in ((True, "tf32"), (False, "ieee")):
            torch.backends.cuda.matmul.allow_tf32 = allow
            assert _one_by_one(1 + 2 ** -12, "torch", cuda_impl, device) == \
                _one_by_one(1 + 2 ** -12, same_as, cuda_impl, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_setting_defaults_validation_and_restore():
    assert ng.ops.library_gemms() == {"min_macs": "auto", "precision": "torch"}
    before = ng.ops.library_gemms()
    for bad in (dict(min_macs=-1), dict(min_macs=1.5), dict(min_macs=True), dict(min_macs=2 ** 63),
                dict(precision="fp16"), dict(precision=None, min_macs="7"), dict(min_macs="Auto")):
        with pytest.raises(ValueError):
            ng.ops.set_library_gemms(**bad)
        assert ng.ops.library_gemms() == before  # a refused call changes nothing
    with pytest.raises(RuntimeError, match="boom"):
        with ng.ops.using_library_gemms(min_macs=5, precision="bf16"):
            assert ng.ops.library_gemms() == {"min_macs": 5, "precision": "bf16"}
            raise RuntimeError("boom")
    assert ng.ops.library_gemms() == before
    ng.ops.set_library_gemms(precision="tf32")
    assert ng.ops.library_gemms() == {"min_macs": "auto", "precision": "tf32"}
    ng.ops.set_library_gemms(min_macs=12)
    ng.ops.set_library_gemms(min_macs="auto")
    assert ng.ops.library_gemms()["min_macs"] == "auto"


@pytest.mark.skipif(not emulation.available(), reason="emulated backend not built")
@pytest.mark.parametrize("factor,operand,precision,threshold", [
    (torch.float32, torch.float32, "ieee", "ieee"), (torch.float64, torch.float64, "tf32", "ieee"),
    (torch.float32, torch.float32, "tf32", "tensor cores"), (torch.float32, torch.float32, "bf16", "tensor cores"),
    (torch.float32, torch.bfloat16, "ieee", "tensor cores"), (torch.float64, torch.bfloat16, "ieee", "ieee")])
def test_auto_threshold_follows_the_arithmetic(factor, operand, precision, threshold):
    """min_macs="auto": the threshold of the arithmetic the product gets (float64 never reduced;
    bf16 operands into float32 run on tensor cores whatever the precision); an explicit min_macs
    overrides it. The decision itself, through the CUDA host code's own function."""
    choice = torch.ops.natgrad_testing_emu.library_choice
    f, x = torch.empty(0, dtype=factor), torch.empty(0, dtype=operand)
    limit = ng.ops.AUTO_MIN_MACS[threshold]
    with ng.ops.using_library_gemms(min_macs="auto", precision=precision):
        assert choice(f, x, limit, 1, 1) and choice(f, x, 1, 2, limit // 2)
        assert not choice(f, x, limit - 1, 1, 1) and not choice(f, x, 0, limit, 2)
    with ng.ops.using_library_gemms(min_macs=5, precision=precision):
        assert choice(f, x, 5, 1, 1) and not choice(f, x, 2, 2, 1)


def test_cpu_kernels_and_reference_ignore_the_setting():
    run, _ = _case("precondition", torch.float32, None, "cpu")
    impls = ("reference",) + (("native",) if ng._ext.loaded() else ())
    base = {impl: run(impl) for impl in impls}
    with ng.ops.using_library_gemms(min_macs=ALL, precision="bf16"):
        for impl in impls:
            assert all(torch.equal(a, b) for a, b in zip(run(impl), base[impl])), impl
