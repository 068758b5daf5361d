"""factor_update_ on ops.ConvPatches: the covariance of a convolution's unfolded input without the
unfold in memory (conv_factor_update_: CUDA reads patches straight from the image, the CPU unfolds
a bounded slice of the batch at a time), against the reference on the materialised unfold, on the
CPU and on the GPU when present."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import natgrad_cuda as ng
from natgrad_cuda import emulation
from natgrad_cuda.curvature._layers import input_rows
from natgrad_cuda.curvature.rules import conv_patches


def random_conv(rng: random.Random):
    dims = rng.choice([1, 2])
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    groups = rng.choice([1, 2])
    c_in = groups * rng.randint(1, 3)
    kernel = tuple(rng.randint(1, 4) for _ in range(dims))
    dilation = tuple(rng.randint(1, 2) for _ in range(dims))
    if rng.random() < 0.3:
        padding, stride = "same", 1
    else:
        padding = tuple(rng.randint(0, 2) for _ in range(dims))
        stride = tuple(rng.randint(1, 3) for _ in range(dims))
    layer = conv(c_in, 2 * groups, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    size = tuple(rng.randint(5, 11) for _ in range(dims))
    x = torch.randn(rng.randint(1, 5), c_in, *size)
    return layer, x


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("seed", range(12))
def test_matches_the_unfold(impl, seed, to_device, tol):
    rng = random.Random(seed)
    layers = [random_conv(rng) for _ in range(3)]
    patches = [conv_patches(layer, x) for layer, x in layers]
    ones = [rng.random() < 0.5 for _ in patches]
    dims = [p.shape[1] + int(o) for p, o in zip(patches, ones)]
    start = [torch.randn(d, d, dtype=torch.float64) for d in dims]
    start = [S + S.T for S in start]
    scales = [rng.uniform(0.1, 2.0) for _ in patches]
    ref = [S.clone() for S in start]
    ng.ops.factor_update_(ref, [p.unfold() for p in patches], 0.9, scales, ones, impl="reference")
    out = to_device([S.clone() for S in start])
    ng.ops.factor_update_(out, to_device(patches), 0.9, scales, ones, impl=impl)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=tol(1e-5, torch.float32), atol=tol(1e-5, torch.float32))


@pytest.mark.parametrize("impl", ["native", "emulated"])
def test_half_inputs_and_float64_factors(impl, to_device, tol):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 9)
    layer = nn.Conv2d(4, 5, 3, padding=1)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        p = conv_patches(layer, x.to(dtype))
        ref = torch.zeros(37, 37, dtype=torch.float64)
        out = to_device(ref.clone())
        ng.ops.factor_update_([ref], [p.unfold()], 1.0, [1.0], [True], impl="reference")
        ng.ops.factor_update_([out], [to_device(p)], 1.0, [1.0], [True], impl=impl)
        torch.testing.assert_close(out.cpu(), ref, rtol=tol(1e-6, torch.float32), atol=tol(1e-6, torch.float32))


def test_large_batch_goes_slice_by_slice_on_the_cpu():
    """4096 images of 16 x 16 with a 3x3 kernel: 590 MB of fp32 patches if unfolded at once; the CPU
    kernel works through slices of at most 16 MB and must still match the reference."""
    torch.manual_seed(1)
    x = torch.randn(4096, 16, 16, 16)
    p = conv_patches(nn.Conv2d(16, 8, 3, padding=1), x)
    assert p.shape[0] * p.shape[1] * 4 > 500e6
    out = torch.zeros(145, 145)
    ng.ops.factor_update_([out], [p], 0.0, [1.0 / p.shape[0]], [True], impl="native")
    sub = conv_patches(nn.Conv2d(16, 8, 3, padding=1), x[:512])  # the reference on a part, to keep it cheap
    ref = torch.zeros(145, 145)
    ng.ops.factor_update_([ref], [sub.unfold()], 0.0, [1.0 / sub.shape[0]], [True], impl="reference")
    part = torch.zeros(145, 145)
    ng.ops.factor_update_([part], [sub], 0.0, [1.0 / sub.shape[0]], [True], impl="native")
    torch.testing.assert_close(part, ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all() and out[-1, -1] == pytest.approx(1.0)


def test_rows_and_patches_in_one_call_are_two_launches():
    rng = random.Random(3)
    (layer, x), = [random_conv(rng)]
    p = conv_patches(layer, x)
    rows = torch.randn(10, 6)
    factors = [torch.zeros(p.shape[1], p.shape[1]), torch.zeros(6, 6), torch.zeros(p.shape[1], p.shape[1])]
    with emulation.count() as c:
        ng.ops.factor_update_(factors, [p, rows, p], 1.0, [1.0] * 3, [False] * 3, impl="emulated")
    assert c.launches == 2


def test_expand_rows_of_wide_kernels_stay_virtual():
    x = torch.randn(2, 3, 8, 8)
    rows, _ = input_rows("c", nn.Conv2d(3, 4, 3, padding=1), x, "expand")
    assert isinstance(rows, ng.ops.ConvPatches)
    rows, _ = input_rows("c", nn.Conv2d(3, 4, 2, stride=2), x, "expand")  # unfold no larger than the input
    assert isinstance(rows, torch.Tensor)
    rows, _ = input_rows("c", nn.Conv2d(3, 4, 3, padding=1), x, "reduce")
    assert isinstance(rows, torch.Tensor) and rows.shape == (2, 27)


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_opcheck(ns, to_device):
    p = conv_patches(nn.Conv2d(2, 3, 3, padding=1, stride=2), torch.randn(2, 2, 7, 7, dtype=torch.float64))
    p, F = to_device((p, torch.zeros(19, 19, dtype=torch.float64)))
    torch.library.opcheck(getattr(torch.ops, ns).conv_factor_update_.default,
                          ([F], [p.image], p.geometry(), 0.5, [1.0], [True]))


def test_bad_input():
    p = conv_patches(nn.Conv2d(2, 3, 3), torch.randn(2, 2, 7, 7))
    with pytest.raises(ValueError, match="must have shape"):
        ng.ops.factor_update_([torch.zeros(5, 5)], [p], 1.0, [1.0], [False])
    with pytest.raises(ValueError, match="ConvPatches"):
        ng.ops.factor_update_([torch.zeros(18, 18)], [ng.ops.ConvPatches(torch.randn(2, 2, 7), (3, 3))], 1.0, [1.0],
                              [False])
    for op in (torch.ops.natgrad.conv_factor_update_, torch.ops.natgrad_emu.conv_factor_update_):
        with pytest.raises(RuntimeError, match="geometry"):
            op([torch.zeros(18, 18)], [p.image], p.geometry()[:-1], 1.0, [1.0], [False])
        with pytest.raises(RuntimeError, match="positive"):
            op([torch.zeros(18, 18)], [p.image], [0] + p.geometry()[1:], 1.0, [1.0], [False])
