"""Every CUDA kernel of the package, run in emulation under every schedule (blocks and threads in
index order, reversed, shuffled, and shuffled with preemption at memory accesses) with the race
detector on: no report, and the same bits as in index order (apart from the float atomics of
kfac_update_'s KL clip, whose sum depends on the order of the blocks)."""
import pytest
import torch

import natgrad_cuda as ng
from natgrad_cuda import emulation

pytestmark = pytest.mark.skipif(not emulation.available(), reason="emulated backend not built")

RUNS = [("reverse", 0), ("shuffle", 1), ("shuffle", 2), ("preempt", 1), ("preempt", 2)]


def _spd(n, gen, dtype):
    X = torch.randn(n, n + 3, dtype=torch.float64, generator=gen)
    return (X @ X.T / (n + 3)).to(dtype)


def _factor_update(dtype):
    gen = torch.Generator().manual_seed(1)
    # The last is tall enough for split-K (row slices summed by a second launch).
    inputs = [torch.randn(37, 5, generator=gen), torch.randn(33, 70, generator=gen).T, torch.randn(3, 4, generator=gen),
              torch.randn(1100, 6, generator=gen)]
    ones = [True, False, True, True]
    factors = [_spd(x.shape[1] + o, gen, dtype) for x, o in zip(inputs, ones)]
    ng.ops.factor_update_(factors, inputs, 0.9, [0.5, 1.0, 2.0, 0.1], ones, impl="emulated")
    image = torch.randn(2, 3, 7, 6, generator=gen)
    patches = ng.ops.ConvPatches(image, (3, 2), stride=(2, 1), padding=(1, 1, 0, 1))
    conv = [_spd(3 * 3 * 2 + 1, gen, dtype)]
    ng.ops.factor_update_(conv, [patches], 0.0, [1.0], [True], impl="emulated")
    return factors + conv


def _eigh(dtype):
    gen = torch.Generator().manual_seed(2)
    # 1, 5, 33: the Jacobi kernel; two of 70: one batched solver call; 81: syevd.
    mats = [_spd(n, gen, dtype) for n in (1, 5, 33, 70, 70, 81)]
    return [t for pair in ng.ops.eigh_batched(mats, impl="emulated") for t in pair]


def _damped_inverse(dtype):
    gen = torch.Generator().manual_seed(3)
    return ng.ops.damped_inverse([_spd(n, gen, dtype) for n in (1, 6, 40)], [0.1, 0.01, 1e-3], impl="emulated")


def _layers(dtype, gen, shapes, rank=None):
    grads, QA, dA, QG, dG = [], [], [], [], []
    for o, k in shapes:
        eA, VA = torch.linalg.eigh(_spd(k, gen, torch.float64))
        eG, VG = torch.linalg.eigh(_spd(o, gen, torch.float64))
        if rank:  # the top eigenpairs only: the low-rank formulas
            eA, VA, eG, VG = eA[-rank:], VA[:, -rank:], eG[-rank:], VG[:, -rank:]
        grads.append(torch.randn(o, k, dtype=dtype, generator=gen))
        QA.append(VA.to(dtype))
        dA.append(eA.clamp_min(0).to(dtype))
        QG.append(VG.to(dtype))
        dG.append(eG.clamp_min(0).to(dtype))
    return grads, QA, dA, QG, dG


def _precondition(dtype):
    gen = torch.Generator().manual_seed(4)
    out = []
    for inverse in ("eigen", "factored"):
        out += ng.ops.precondition(*_layers(dtype, gen, [(3, 40), (33, 7), (1, 1)]), 1e-2, inverse=inverse,
                                   impl="emulated")
        out += ng.ops.precondition(*_layers(dtype, gen, [(40, 36)], rank=5), 1e-2, inverse=inverse,
                                   impl="emulated")
    return out


def _kron_matmul(dtype):
    gen = torch.Generator().manual_seed(5)
    shapes = [(3, 40), (33, 7)]
    grads = [torch.randn(o, k, dtype=dtype, generator=gen) for o, k in shapes]
    IA = [_spd(k, gen, dtype) for _, k in shapes]
    IG = [_spd(o, gen, dtype) for o, _ in shapes]
    return ng.ops.kron_matmul(grads, IA, IG, impl="emulated")


def _ekfac(dtype):
    gen = torch.Generator().manual_seed(6)
    grads, QA, _, QG, _ = _layers(dtype, gen, [(3, 40), (33, 7)])
    S = [torch.rand(g.shape, dtype=dtype, generator=gen) for g in grads]
    return ng.ops.ekfac_precondition(grads, QA, QG, S, 1e-2, impl="emulated")


def _kfac_update(dtype):
    gen = torch.Generator().manual_seed(7)
    sizes = [3000, 17, 1]
    params = [torch.randn(n, dtype=dtype, generator=gen) for n in sizes]
    directions = [torch.randn(n, dtype=dtype, generator=gen) for n in sizes]
    grads = [torch.randn(n, dtype=dtype, generator=gen) for n in sizes]
    bufs = [torch.randn(n, dtype=dtype, generator=gen) for n in sizes]
    nu = ng.ops.kfac_update_(params, directions, grads, bufs, [True, False, True], 0.1, 0.9, 1e-3, 1e-4,
                             impl="emulated")
    return params + bufs + [nu]


def _with_library(call):
    # The same calls with products of >= 1000 multiply-adds given to (emulated) cuBLAS: the layers'
    # grouped entries then start from the library's product (k = 0) beside others that compute theirs.
    def run(dtype):
        with ng.ops.using_library_gemms(min_macs=1000, precision="ieee"):
            return call(dtype)
    return run


CALLS = {"factor_update_": _factor_update, "eigh_batched": _eigh, "damped_inverse": _damped_inverse,
         "precondition": _precondition, "kron_matmul": _kron_matmul, "ekfac_precondition": _ekfac,
         "kfac_update_": _kfac_update}
CALLS.update({f"{op}[library]": _with_library(CALLS[op])
              for op in ("factor_update_", "precondition", "kron_matmul", "ekfac_precondition")})
ATOMICS = {"kfac_update_"}  # float atomics: the sum's rounding follows the order of the blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", sorted(CALLS))
def test_every_schedule_gives_the_same_bits_and_no_race(op, dtype):
    with emulation.checked("forward", races=True), emulation.count() as c:
        expected = CALLS[op](dtype)
    assert c.launches > 0 or op in ("eigh_batched", "damped_inverse")
    for schedule, seed in RUNS:
        with emulation.checked(schedule, seed=seed, races=True):
            got = CALLS[op](dtype)
        for a, b in zip(got, expected):
            if op in ATOMICS:
                torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
            else:
                assert torch.equal(a, b), f"{op} under {schedule} (seed {seed}) differs from index order"


def test_checked_restores_the_settings_and_validates():
    before = emulation.checks()
    with emulation.checked("preempt", seed=5, races=False):
        assert emulation.checks() == {"schedule": "preempt", "seed": 5, "races": False}
    assert emulation.checks() == before
    with pytest.raises(ValueError, match="schedule must be one of"):
        emulation.set_checks("sideways")
    with pytest.raises(ValueError, match="seed"):
        emulation.set_checks(seed=-1)
    with pytest.raises(ValueError, match="races"):
        emulation.set_checks(races=1)
    assert emulation.checks() == before  # a refused call changes nothing
