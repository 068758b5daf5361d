"""The CUDA emulation layer: each CUDA feature our kernels use, run through csrc/cuda/testing_kernels.cu
compiled for the CPU, and the bugs it must report or expose, each planted in a test kernel: a
divergent barrier, out-of-bounds and misaligned reads, races (a lost update, a missing barrier, two
blocks writing one element), reads of memory nobody wrote, and shared memory beyond the limits."""
import os

import pytest
import torch

import natgrad_cuda as ng
from natgrad_cuda.emulation import checked as emulation_checked

pytestmark = pytest.mark.skipif(not ng.emulation.available(), reason="emulated backend not built")


@pytest.fixture(scope="module")
def T():
    return torch.ops.natgrad_testing_emu


@pytest.mark.parametrize("grid,block", [([1, 1, 1], [1, 1, 1]), ([3, 2, 1], [5, 3, 2]), ([2, 1, 3], [64, 1, 1]),
                                        ([1, 1, 1], [32, 32, 1])])
def test_thread_and_block_indices(T, grid, block):
    out = T.thread_indices(torch.empty(0), grid, block)
    n = torch.tensor(grid).prod().item() * torch.tensor(block).prod().item()
    assert out.shape == (n, 12)
    assert (out[:, 6:9] == torch.tensor(grid, dtype=torch.int32)).all()
    assert (out[:, 9:12] == torch.tensor(block, dtype=torch.int32)).all()
    # every (block, thread) pair exactly once
    pairs = {tuple(r) for r in out[:, :6].tolist()}
    assert len(pairs) == n
    for axis in range(3):
        assert set(out[:, axis].tolist()) == set(range(grid[axis]))
        assert set(out[:, 3 + axis].tolist()) == set(range(block[axis]))


@pytest.mark.parametrize("n", [1, 31, 32, 1000, 4099])
@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_block_sum_static_shared_shuffles_atomics(T, n, threads):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(T.block_sum(x, threads), x.sum().reshape(1), rtol=1e-5, atol=1e-4)


def test_warp_shuffles_and_votes(T):
    x = torch.randn(256, generator=torch.Generator().manual_seed(1))
    x[64:96] = x[64:96].abs() + 0.1  # a warp where every lane votes yes
    x[96:128] = -x[96:128].abs() - 0.1  # and one where none does
    out = T.warp_ops(x)
    w = x.reshape(-1, 32)
    torch.testing.assert_close(out[:, 0].reshape(-1, 32), w.sum(1, keepdim=True).expand(-1, 32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1].reshape(-1, 32), w.cumsum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 2].reshape(-1, 32), w.flip(1))
    down = torch.cat([w[:, 1:], w[:, 31:]], 1)  # lane 31 keeps its own value
    assert torch.equal(out[:, 3].reshape(-1, 32), down)
    pos = w > 0
    assert torch.equal(out[:, 4].reshape(-1, 32), pos.sum(1, keepdim=True).float() + 0.5 * pos.float())
    assert torch.equal(out[:, 5].reshape(-1, 32), pos.any(1, keepdim=True).float().expand(-1, 32))
    assert torch.equal(out[:, 6].reshape(-1, 32), pos.all(1, keepdim=True).float().expand(-1, 32))
    assert out[64:96, 6].eq(1).all() and out[96:128, 5].eq(0).all()


@pytest.mark.parametrize("n,block", [(1, 32), (100, 32), (1000, 128), (77, 1024)])
def test_dynamic_shared_memory(T, n, block):
    x = torch.arange(n, dtype=torch.float32)
    out = T.reverse_blocks(x, block)
    expected = torch.cat([c.flip(0) for c in x.split(block)])
    assert torch.equal(out, expected)


def test_atomics(T):
    idx = torch.randint(3, 17, (5000,), generator=torch.Generator().manual_seed(0))
    out = T.histogram(idx, 20)
    assert torch.equal(out[:20], torch.bincount(idx, minlength=20).int())
    assert out[20].item() == idx.min().item() and out[21].item() == idx.max().item()


def test_divergent_barrier_is_reported(T):
    with pytest.raises(RuntimeError, match=r"__syncthreads\(\).*not reached by every thread.*16 thread"):
        T.divergent_barrier(torch.zeros(64))


def test_out_of_bounds_global_read_is_reported(T):
    x = torch.arange(40, dtype=torch.float32)
    assert torch.equal(T.read_at(x, 8), x[8:40])  # the last element is fine
    with pytest.raises(RuntimeError, match=r"read_at_kernel.*thread \(31, 0, 0\).*out-of-bounds global"):
        T.read_at(x, 9)
    with pytest.raises(RuntimeError, match="out-of-bounds global"):
        T.read_at(x, -1)
    # A view may not reach past its own elements into the rest of its storage.
    with pytest.raises(RuntimeError, match="out-of-bounds global"):
        T.read_at(x[:32], 1)


def test_out_of_bounds_shared_read_is_reported(T):
    x = torch.arange(32, dtype=torch.float32)
    assert torch.equal(T.shared_read_at(x, 0), x)
    with pytest.raises(RuntimeError, match=r"shared_read_at_kernel.*thread \(31, 0, 0\).*out-of-bounds shared memory"):
        T.shared_read_at(x, 1)


def test_launch_counters(T):
    x = torch.randn(100)
    with ng.emulation.count() as c:
        T.block_sum(x, 64)
        T.reverse_blocks(x, 32)
        T.reverse_blocks(x, 32)
    assert c.launches == 3 and c.library_calls == 0
    assert c.by_name == {"block_sum_kernel": 1, "reverse_blocks_kernel": 2}


def test_a_failed_launch_leaves_the_emulator_usable(T):
    with pytest.raises(RuntimeError):
        T.divergent_barrier(torch.zeros(64))
    x = torch.randn(300)
    torch.testing.assert_close(T.block_sum(x, 128), x.sum().reshape(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 3, 7), (17, 31, 2), (64, 65, 33)])
def test_emulated_cublas_gemm_is_column_major(T, dtype, m, k, n):
    # fp32 goes through cublasSgemm with the operands swapped (OP_N), fp64 through cublasDgemm with
    # OP_T on both: a mix-up of either convention gives a wrong product or a rejected call.
    g = torch.Generator().manual_seed(m * k * n)
    a, b = torch.randn(m, k, generator=g, dtype=dtype), torch.randn(k, n, generator=g, dtype=dtype)
    with ng.emulation.count() as c:
        out = T.gemm(a, b, False)
    torch.testing.assert_close(out, a @ b)
    assert (c.launches, c.library_calls) == (0, 1)
    assert c.by_name == {"cublasSgemm" if dtype == torch.float32 else "cublasDgemm": 1}


def test_emulated_cublas_rejects_a_wrong_leading_dimension(T):
    a, b = torch.randn(9, 4), torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="cuBLAS status 7"):
        T.gemm(a, b, True)


# ---- planted bugs: races, unwritten memory, limits ----------------------------------------------

def _race(kind, message):
    return pytest.raises(RuntimeError, match=f"{kind}.*data race on {message}")


def test_lost_update_is_reported_and_shows_under_preemption(T):
    with emulation_checked("forward", races=True), _race("lost_update_kernel", r"shared memory: thread \(1, 0, 0\).*"
                                                          r"reads an element that thread \(0, 0, 0\).*wrote "
                                                          r"with no __syncthreads\(\) between.*testing_kernels.cu:"):
        T.lost_update(torch.empty(0), 64)
    # Without the detector the bug is invisible in index order and loses updates when threads are
    # switched at memory accesses.
    with emulation_checked("forward", races=False):
        assert T.lost_update(torch.empty(0), 64).item() == 64
    with emulation_checked("preempt", seed=1, races=False):
        assert T.lost_update(torch.empty(0), 64).item() < 64


def test_missing_barrier_is_reported_and_shows_in_reverse_order(T):
    x = torch.arange(1, 65, dtype=torch.float32)
    expected = torch.cat([torch.zeros(1), x[:-1]])
    with emulation_checked("forward", races=False):
        assert torch.equal(T.missing_barrier(x), expected)  # lower threads happen to run first
    with emulation_checked("reverse", races=False):
        assert T.missing_barrier(x)[1:].isnan().all()  # the poison the producer had not replaced yet
    for schedule in ("forward", "reverse", "shuffle"):
        with emulation_checked(schedule, races=True), _race("missing_barrier_kernel", "shared memory.*"
                                                            r"no __syncthreads\(\) between them \(both after the "
                                                            r"block's start\); accesses at testing_kernels.cu:\d+ and "
                                                            r"testing_kernels.cu:\d+"):
            T.missing_barrier(x)


def test_blocks_writing_one_element_are_reported(T):
    with emulation_checked("forward", races=True), _race("block_race_kernel", r"global memory: thread \(0, 0, 0\) "
                                                          r"of block \(1, 0, 0\) writes an element that thread "
                                                          r"\(0, 0, 0\) of block \(0, 0, 0\) wrote in another block"):
        T.block_race(torch.empty(0), 4)
    with emulation_checked("forward", races=False):
        first = T.block_race(torch.empty(0), 4).item()
    with emulation_checked("reverse", races=False):
        assert (first, T.block_race(torch.empty(0), 4).item()) == (3.0, 0.0)  # the last block to run wins


def test_shared_memory_starts_as_nan(T):
    out = T.uninitialized_shared(torch.empty(0))
    assert torch.equal(out[:32], torch.arange(32, dtype=torch.float32)) and out[32:].isnan().all()


def test_unwritten_output_memory_is_nan(T):
    out = T.unwritten_output(torch.empty(0), 10)
    assert torch.equal(out[:5], torch.ones(5)) and out[5:].isnan().all()


def test_dynamic_shared_memory_beyond_48_kib_needs_the_opt_in(T):
    assert T.dynamic_shared(torch.empty(0), 48 * 1024, False).item() == 12 * 1024
    with pytest.raises(RuntimeError, match=r"49156 bytes of dynamic shared memory need an opt-in.*set_max_dynamic_shared"):
        T.dynamic_shared(torch.empty(0), 48 * 1024 + 4, False)
    assert T.dynamic_shared(torch.empty(0), 100 * 1024, True).item() == 25 * 1024
    with pytest.raises(RuntimeError, match="exceed the 227 KiB"):
        T.dynamic_shared(torch.empty(0), 228 * 1024, True)


def test_static_shared_memory_beyond_48_kib_is_reported(T):
    with pytest.raises(RuntimeError, match=r"static_shared_overflow_kernel.*static __shared__ arrays take 57344 bytes"):
        T.static_shared_overflow(torch.empty(0))


def test_misaligned_access_is_reported(T):
    with pytest.raises(RuntimeError, match=r"misaligned_read_kernel.*misaligned dynamic shared memory access: a 8-byte "
                                           r"element at byte offset 4.*8-byte alignment"):
        T.misaligned_read(torch.empty(0))


@pytest.mark.skipif("NATGRAD_EMU_RACES" in os.environ, reason="the environment sets the race detection")
def test_race_detection_is_on_by_default():
    assert ng.emulation.checks()["races"] is True


def test_barriers_are_counted(T):
    x = torch.arange(64, dtype=torch.float32)
    with ng.emulation.count() as c:
        T.reverse_blocks(x, 32)  # two blocks, one barrier each
        T.block_sum(x, 64)  # one block, block_reduce_sum's two barriers
    assert c.barriers == 4


@pytest.mark.parametrize("count,n,limit,expected", [
    (10, 512, 2 ** 31 - 1, [10]),
    (10000, 512, 2 ** 31 - 1, [8191, 1809]),  # 8192 matrices of 512 pass cuSOLVER's 32-bit batch index
    (7, 3, 20, [2, 2, 2, 1]),
    (3, 100, 50, [1, 1, 1]),  # one matrix over the limit still gets its own call
    (0, 5, 100, []),
])
def test_batched_eigensolver_calls_are_split_at_the_32_bit_limit(T, count, n, limit, expected):
    calls = T.solver_batches(torch.empty(0), count, n, limit)
    assert calls == expected and sum(calls) == count
