"""CUDA graphs: the ops that never wait on the host (factor_update_, precondition, kron_matmul,
ekfac_precondition, kfac_update_) can be captured and replayed; their descriptor tables are cached by
content, so a repeated call uploads nothing and a captured one never reads freed memory. The two ops
that wait on the host (eigh_batched, damped_inverse) say so: a clear error under capture, and
torch.Tag.cudagraph_unsafe on their schemas for torch.compile."""
import pytest
import torch

import natgrad_cuda as ng
from natgrad_cuda import emulation

OPS = ["factor_update_", "conv_factor_update_", "eigh_batched", "damped_inverse", "kron_matmul", "precondition",
       "ekfac_precondition", "kfac_update_"]


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_only_the_host_syncing_ops_are_cudagraph_unsafe(ns):
    for op in OPS:
        tags = getattr(torch.ops, ns).__getattr__(op).default.tags
        assert (torch.Tag.cudagraph_unsafe in tags) == (op in ("eigh_batched", "damped_inverse")), op


@pytest.mark.skipif(not emulation.available(), reason="emulated backend not built")
def test_a_repeated_call_uploads_no_descriptor_table():
    gen = torch.Generator().manual_seed(0)
    F = [torch.eye(21, dtype=torch.float64), torch.eye(8)]
    X = [torch.randn(50, 20, generator=gen), torch.randn(9, 8, generator=gen)]
    params = [torch.randn(3000, generator=gen), torch.randn(7, generator=gen)]
    d = [torch.randn_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    image = torch.randn(2, 3, 6, 6, generator=gen)
    conv = [torch.eye(28)]

    def call():
        ng.ops.factor_update_(F, X, 0.9, [1.0, 0.5], [True, False], impl="emulated")
        ng.ops.factor_update_(conv, [ng.ops.ConvPatches(image, (3, 3))], 0.9, [1.0], [True], impl="emulated")
        ng.ops.kfac_update_(params, d, d, bufs, [True, False], 0.1, 0.9, 0.0, 1e-3, impl="emulated")

    with emulation.count() as first:
        call()
    with emulation.count() as again:
        call()
    assert first.uploads == first.launches - 1  # kfac_update_: one table for its two launches
    assert again.uploads == 0 and again.launches == first.launches
    # A different table (another decay is an argument, not table content; another tensor is) uploads.
    with emulation.count() as other:
        ng.ops.factor_update_([F[0].clone()], X[:1], 0.9, [1.0], [True], impl="emulated")
    assert other.uploads == 1


def _step_inputs(device, gen):
    def gram(n):
        X = torch.randn(n, n + 3, generator=gen, dtype=torch.float64)
        return X @ X.T / (n + 3)

    shapes = [(12, 20), (5, 33)]
    A, G = [gram(k) for _, k in shapes], [gram(o) for o, _ in shapes]
    (dA, QA), (dG, QG) = (zip(*[torch.linalg.eigh(S) for S in mats]) for mats in (A, G))
    x = dict(A=A, G=G, QA=QA, dA=[d.clamp_min(0) for d in dA], QG=QG, dG=[d.clamp_min(0) for d in dG],
             grads=[torch.randn(o, k, generator=gen, dtype=torch.float64) for o, k in shapes],
             rows=[torch.randn(40, k, generator=gen, dtype=torch.float64) for _, k in shapes],
             S=[torch.rand(o, k, generator=gen, dtype=torch.float64) for o, k in shapes])
    return {key: [t.to(device) for t in ts] for key, ts in x.items()}


def _run(x, out):
    """One step's worth of the capturable ops, written into the tensors of `out`."""
    ng.ops.factor_update_(out["A"], x["rows"], 0.95, [0.05, 0.05], [False, False])
    P = ng.ops.precondition(x["grads"], x["QA"], x["dA"], x["QG"], x["dG"], 1e-2, inverse="factored")
    K = ng.ops.kron_matmul(P, out["A"], x["G"])
    E = ng.ops.ekfac_precondition(K, x["QA"], x["QG"], x["S"], 1e-2)
    nu = ng.ops.kfac_update_(out["params"], E, x["grads"], out["bufs"], [True, True], 0.1, 0.9, 1e-4, 1e-3)
    for dst, src in zip(out["E"], E):
        dst.copy_(src)
    out["nu"].copy_(nu)


def _fresh_out(x):
    return dict(A=[a.clone() for a in x["A"]], params=[g.clone() for g in x["grads"]],
                bufs=[torch.zeros_like(g) for g in x["grads"]], E=[torch.empty_like(g) for g in x["grads"]],
                nu=torch.empty((), dtype=torch.float64, device=x["grads"][0].device))


def test_the_captured_step_matches_the_reference(device):
    x = _step_inputs(device, torch.Generator().manual_seed(1))
    out = _fresh_out(x)
    _run(x, out)
    ref = {k: [t.cpu() for t in ts] for k, ts in x.items()}
    ref_out = _fresh_out(ref)
    ng.ops.factor_update_(ref_out["A"], ref["rows"], 0.95, [0.05, 0.05], [False, False], impl="reference")
    P = ng.ops.precondition(ref["grads"], ref["QA"], ref["dA"], ref["QG"], ref["dG"], 1e-2, inverse="factored",
                            impl="reference")
    K = ng.ops.kron_matmul(P, ref_out["A"], ref["G"], impl="reference")
    E = ng.ops.ekfac_precondition(K, ref["QA"], ref["QG"], ref["S"], 1e-2, impl="reference")
    nu = ng.ops.kfac_update_(ref_out["params"], E, ref["grads"], ref_out["bufs"], [True, True], 0.1, 0.9, 1e-4,
                             1e-3, impl="reference")
    for key, want in (("A", ref_out["A"]), ("params", ref_out["params"]), ("bufs", ref_out["bufs"]), ("E", E)):
        for a, b in zip(out[key], want):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["nu"].cpu(), nu.reshape(()), rtol=1e-9, atol=0)


def test_a_step_of_ops_is_captured_and_replayed(device):
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    x = _step_inputs(device, torch.Generator().manual_seed(1))
    fresh_out = lambda: _fresh_out(x)  # noqa: E731
    out = fresh_out()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as torch's CUDA graph docs ask
        _run(x, fresh_out())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run(x, out)
    # New values in the captured inputs; the replay must see them.
    new = _step_inputs(device, torch.Generator().manual_seed(2))
    for key in x:
        for dst, src in zip(x[key], new[key]):
            dst.copy_(src)
    start = fresh_out()
    for key in ("A", "params", "bufs"):
        for dst, src in zip(out[key], start[key]):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = fresh_out()
    _run(x, eager)
    for key in ("A", "params", "bufs", "E"):
        for a, b in zip(out[key], eager[key]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["nu"], eager["nu"], rtol=1e-9, atol=0)


def test_host_syncing_ops_refuse_capture(device):
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    M = [torch.eye(5, device=device, dtype=torch.float64)]
    graph = torch.cuda.CUDAGraph()
    for call in (lambda: ng.ops.eigh_batched(M), lambda: ng.ops.damped_inverse(M, [0.1])):
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            with torch.cuda.graph(graph):
                call()
