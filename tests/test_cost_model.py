"""bench/gpu_cost_model.py's arithmetic: the GPU cost model's estimates follow the kernels' structure
(no timing, no GPU)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


KERNEL = 1 << 62  # min_macs keeping every product in our kernels (the library path has its own tests)

@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("gpu_cost_model", BENCH / "gpu_cost_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_cost_model"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_inner_loop_reaches_half_of_peak(cm):
    # 8 shared loads (four As, four Bs, one wavefront each) per 16 FMAs per warp and slab row, two
    # warps per block; one shared wavefront per clock against 4 warp-FMAs per clock.
    c = cm.slab_pipe_cycles(0)
    assert c["inner_loop"] == 2 * 32 * 8
    assert c["fma"] == 2 * 32 * 16 / 4
    assert cm.inner_loop_peak_fraction() == pytest.approx(0.5)
    assert cm.inner_loop_peak_fraction(acc_bytes=8) == pytest.approx(1.0)  # FP64: its half-width FMA pipe binds


def test_uncoalesced_operands_cost_more(cm):
    p = [cm.slab_pipe_cycles(u)["pipe"] for u in (0, 1, 2)]
    assert p[0] < p[1] < p[2]
    assert p[1] - p[0] == pytest.approx(32 * (cm.UNCOALESCED_WAVEFRONTS - 1))
    with pytest.raises(ValueError, match="uncoalesced"):
        cm.slab_pipe_cycles(3)


def test_gemm_grows_linearly_in_k(cm):
    t = [cm.gemm_launch_seconds([cm.Gemm(1024, 1024, 32 * j)])["seconds"] for j in (8, 16, 24, 32)]
    steps = [b - a for a, b in zip(t, t[1:])]
    assert all(s > 0 for s in steps)
    assert steps[0] == pytest.approx(steps[1], rel=1e-9) and steps[1] == pytest.approx(steps[2], rel=1e-9)


def test_precondition_reads_half_its_operands_uncoalesced(cm):
    for q_row_major in (False, True):
        e = cm.precondition([(256, 257)], q_row_major=q_row_major, loads_along_k=False)
        assert e.detail["uncoalesced_operands_of_8"] == 4
        assert e.launches == 4 and e.library_calls == 0
        along = cm.precondition([(256, 257)], q_row_major=q_row_major, loads_along_k=True)
        assert along.detail["uncoalesced_operands_of_8"] == 0
        assert along.device_s < e.device_s


def test_factor_update_starved_layer_is_one_blocks_row_loop(cm):
    for n, d in ((100_000, 300), (20_000, 95)):
        e = cm.factor_update([(n, d, True)], split_k=False, min_macs=KERNEL)
        T = -(-(d + 1) // 32)
        assert e.detail["blocks"] == T * (T + 1) // 2 < cm.SMS
        assert e.device_s == pytest.approx(e.detail["critical_path_s"], rel=1e-12)
        pipe = cm.slab_pipe_cycles(0)["pipe"]
        expected = (-(-n // 32) * (pipe + cm.SLAB_LATENCY_CYCLES) + cm.BLOCK_FIXED_CYCLES) / cm.CLOCK_HZ
        assert e.detail["critical_path_s"] == pytest.approx(expected, rel=1e-12)


def test_one_block_is_not_faster_than_the_same_work_split(cm):
    rows = 4096
    one = cm.factor_update([(cm.SMS * rows, 31, False)], split_k=False)  # one 32x32 tile: one block over all rows
    split = cm.factor_update([(rows, 31, False)] * cm.SMS, split_k=False)  # 132 blocks of a 132th each
    assert one.detail["blocks"] == 1 and split.detail["blocks"] == cm.SMS
    assert one.device_s >= split.device_s
    for resident in (1, 4, 8):
        assert (cm.grid_cycles(1, cm.SMS * 10, 1000, 600, resident)
                >= cm.grid_cycles(cm.SMS, 10, 1000, 600, resident))


def test_a_wave_more_costs_a_round_more(cm):
    resident = cm.blocks_per_sm(cm.GEMM_THREADS, cm.GEMM_SHARED_BYTES)
    full = cm.SMS * resident
    a = cm.grid_cycles(full, 10, 1000, 600, resident)
    b = cm.grid_cycles(full + 1, 10, 1000, 600, resident)
    assert b > a


def test_blocks_per_sm_limits(cm):
    assert cm.blocks_per_sm(256, cm.GEMM_SHARED_BYTES, registers_per_thread=64) == 4  # registers
    assert cm.blocks_per_sm(256, cm.GEMM_SHARED_BYTES, registers_per_thread=32) == 8  # threads
    assert cm.blocks_per_sm(256, 100 * 1024, registers_per_thread=32) == 2  # shared memory
    with pytest.raises(ValueError, match="shared memory"):
        cm.blocks_per_sm(256, 300 * 1024)
    with pytest.raises(ValueError, match="threads"):
        cm.blocks_per_sm(2048, 0)


def all_estimates(cm):
    out = list(cm.table())
    out += list(cm.step_estimates(12, 256, 128).values()) + list(cm.step_estimates(4, 16, 8).values())
    for n, d in ((1, 1), (7, 3), (128, 1000), (50_000, 64), (10**6, 2048)):
        out.append(cm.factor_update([(n, d, True)]))
        out.append(cm.factor_update([(n, d, True)], split_k=True))
        out.append(cm.factor_update([(n, d, False)], conv=True))
    for o, k in ((1, 1), (3, 700), (1000, 1000), (8192, 2049)):
        out.append(cm.precondition([(o, k)] * 3))
        for precision in ("ieee", "tf32", "bf16"):
            out.append(cm.precondition([(o, k)] * 3, min_macs=0, precision=precision))
            out.append(cm.factor_update([(o, k, True)] * 3, min_macs=0, precision=precision))
    for sizes in ([1], [2, 3, 64], [64] * 2000, [65, 65], [65], [513, 513], [3000]):
        out.append(cm.eigh_batched(sizes))
        out.append(cm.damped_inverse(sizes))
    for numels in ([0], [1], [8192 * 500], [10**9]):
        out.append(cm.kfac_update(numels))
        out.append(cm.kfac_update(numels, momentum=False, kl_clip=False))
    return out


def test_model_is_never_below_the_peak_flop_bound(cm):
    for e in all_estimates(cm):
        assert e.model_s >= e.peak_flop_bound_s, (e.op, e.shape)
        assert e.device_s >= e.flops / e.detail["peak_flops"] and e.device_s >= e.bytes / cm.HBM_BYTES_PER_S
        assert e.detail["peak_flops"] == cm.FP32_PEAK_FLOPS or e.library_calls > 0


def test_launch_counts_follow_the_dispatch(cm):
    # Jacobi for n <= 64 (one launch), syevBatched per size group of >= 2 up to 512, syevd for the rest.
    e = cm.eigh_batched([16, 16, 64, 100, 100, 600, 600, 200])
    assert (e.launches, e.library_calls) == (1, 1 + 2 + 1)
    assert (cm.eigh_batched([257] * 12 + [256] * 12).library_calls) == 2
    assert cm.damped_inverse([8, 9, 10]).library_calls == 6
    assert cm.kfac_update([10]).launches == 2 and cm.kfac_update([10], kl_clip=False).launches == 1
    assert cm.factor_update([(8, 8, True)] * 50).launches == 1


def test_jacobi_time_grows_with_sweeps_and_matrices(cm):
    a, b = cm.eigh_batched([64] * 10, sweeps=4), cm.eigh_batched([64] * 10, sweeps=8)
    assert b.detail["jacobi_s"] > a.detail["jacobi_s"]
    one_wave = cm.eigh_batched([64] * (cm.SMS * 4)).detail["jacobi_s"]
    assert cm.eigh_batched([64] * (cm.SMS * 4 + 1)).detail["jacobi_s"] > one_wave


def test_bad_arguments_are_refused(cm):
    with pytest.raises(ValueError, match="no layers"):
        cm.factor_update([])
    with pytest.raises(ValueError, match="3 values"):
        cm.factor_update([(8, 8)])
    with pytest.raises(ValueError, match="positive"):
        cm.eigh_batched([0])
    with pytest.raises(ValueError, match="sweeps"):
        cm.eigh_batched([8], sweeps=0)
    with pytest.raises(ValueError, match="non-negative"):
        cm.kfac_update([-1])


def test_json_holds_the_table_and_says_estimate(cm, tmp_path):
    out = tmp_path / "model.json"
    cm.main(["--no-emulation", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"note", "constants", "environment", "ops", "step", "emulated_counts"} <= set(data)
    assert "ESTIMATES" in data["note"] and "gpu_check.sh" in data["note"]
    assert data["emulated_counts"] is None
    assert data["constants"]["SMS"] == 132 and "REGISTERS_PER_THREAD" in data["constants"]
    ops = {r["op"] for r in data["ops"]}
    assert ops == {"factor_update_", "precondition", "eigh_batched", "damped_inverse", "kfac_update_"}
    for r in data["ops"]:
        assert {"shape", "model_s", "peak_flop_bound_s", "model_over_peak_flop_bound", "launches", "library_calls",
                "torch_ops", "limiter"} <= set(r)
        assert r["model_over_peak_flop_bound"] >= 1.0
    assert set(data["step"]["ops"]) == {"factor_update_", "eigh_batched", "precondition", "kfac_update_"}
    assert data["step"]["model_s"] == pytest.approx(sum(r["model_s"] for r in data["step"]["ops"].values()))


def test_split_k_follows_row_slices_and_feeds_the_starved_sms(cm):
    assert cm.row_slices(100_000, 55) == 5  # ceil(2 x 132 / 55), rows to spare
    assert cm.row_slices(1000, 55) == 1  # slices no shorter than 512 rows
    assert cm.row_slices(10**6, 2 * cm.SMS) == 1  # enough tiles already
    whole = cm.factor_update([(100_000, 300, True)], split_k=False, min_macs=KERNEL)
    split = cm.factor_update([(100_000, 300, True)], split_k=True, min_macs=KERNEL)
    assert (whole.launches, split.launches) == (1, 2)
    assert split.detail["blocks"] == 5 * whole.detail["blocks"]
    assert split.device_s < whole.device_s
    assert split.model_s >= split.peak_flop_bound_s


def test_library_path_where_the_model_says_it_pays(cm):
    # The default thresholds (min_macs="auto") pick, for an MLP of each width, a path within 15% of
    # the faster one by the model (the library's tile waves make its curve uneven), and the faster
    # one outright at both ends; tensor cores move the crossover down.
    rows = cm.library_crossover()
    for precision in ("ieee", "tf32"):
        assert rows[0][f"default_{precision}_path"] == "grouped" and rows[-1][f"default_{precision}_path"] == "library"
        for r in rows:
            best = min(r["grouped_s"], r[f"library_{precision}_s"])
            assert r[f"default_{precision}_s"] <= 1.15 * best, (precision, r)
    assert cm.LIBRARY_MIN_MACS["tf32"] < cm.LIBRARY_MIN_MACS["ieee"]
    for r in rows:
        if r["width"] >= 512:
            assert r["library_tf32_s"] < r["library_ieee_s"]


def test_library_launch_counts_follow_the_dispatch(cm):
    # All products in cuBLAS: 4 calls per layer; only stage 2 (the division) keeps a launch.
    e = cm.precondition([(64, 65)] * 5, min_macs=0)
    assert (e.launches, e.library_calls) == (1, 20)
    grouped = cm.precondition([(64, 65)] * 5, min_macs=1 << 62)
    assert (grouped.launches, grouped.library_calls) == (4, 0)
    f = cm.factor_update([(100, 64, True)] * 3 + [(100, 2, True)], min_macs=100 * 65 * 65)
    assert (f.launches, f.library_calls) == (1, 3)
    assert cm.factor_update([(100, 64, True)], conv=True, min_macs=0).library_calls == 0  # conv: the kernel
    with pytest.raises(ValueError, match="precision"):
        cm.library_gemm_seconds(8, 8, 8, "fp8")
