"""Data-parallel K-FAC on torch.distributed (gloo, real processes, world sizes 1 to 3): the same
parameters as one process on the global batch, bitwise equal across processes, MC factors of the
union of the processes' samples, resume across world sizes, and set-up mistakes as errors."""
import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

import natgrad_cuda as ng

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("dist_worker", os.path.join(HERE, "dist_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def spawn(scenario, world, tmp_path, arg="", timeout=240):
    """Run ``scenario`` in ``world`` processes; their results, by rank."""
    out = tmp_path / f"{scenario}-{world}-{abs(hash(arg)) % 10**6}"
    out.mkdir()
    port = _port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), scenario, str(r), str(world), port,
                               str(out), arg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{scenario} with {world} processes did not finish in {timeout} s (a hang)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def single():
    """Every variant in one process on the global batch, no process group."""
    return {name: worker.run_variant(name, kind, options, wrap, 0, 1)
            for name, kind, options, wrap in worker.VARIANTS}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_same_parameters_as_one_process_on_the_global_batch(world, single, tmp_path):
    results = spawn("variants", world, tmp_path)
    for name, *_ in worker.VARIANTS:
        ranks = [r[name]["params"] for r in results]
        for other in ranks[1:]:  # bitwise equal across processes
            assert all(torch.equal(a, b) for a, b in zip(ranks[0], other)), name
        for a, b in zip(ranks[0], single[name]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_mc_factors_are_those_of_the_union_of_the_samples(tmp_path):
    """Each process draws its own targets; the reduced factors equal those of one process that saw
    every process's batch with that process's samples."""
    world = 2
    results = spawn("mc_factors", world, tmp_path)
    for r in results[1:]:
        for name, st in r["state"].items():
            assert all(torch.equal(st[k], results[0]["state"][name][k]) for k in st)
    model, x, y = worker.model_and_data()
    mc_seed = results[0]["mc_seed"]
    parts = []
    for rank in range(world):
        seed = (mc_seed * 1000003 + 0 * 0x9E3779B1 + (rank + 1) * 0x85EBCA77) % 2**63
        xs, ys = x[0].chunk(world)[rank], y[0].chunk(world)[rank]
        parts.append(ng.curvature.kfac(model, torch.nn.CrossEntropyLoss(), (xs, ys), fisher_type="mc", mc_samples=2,
                                       seed=seed, separate_weight_and_bias=False))
    n = [len(x[0].chunk(world)[r]) for r in range(world)]
    for name in results[0]["state"]:
        A = sum(p.input_covariances[name] * k for p, k in zip(parts, n)) / sum(n)
        G = sum(p.gradient_covariances[name] * k for p, k in zip(parts, n)) / sum(n)  # Z = the data points (CE)
        torch.testing.assert_close(results[0]["state"][name]["A"], A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(results[0]["state"][name]["G"], G, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("saved_in,resumed_in", [(2, 3), (3, 1), (1, 2)])
def test_resume_in_another_world_size(saved_in, resumed_in, tmp_path):
    """Saved from rank 0 after two steps (inverse_sharing="directions": state_dict gathers the
    inverses), resumed for two more in another number of processes: as the uninterrupted run."""
    path = str(tmp_path / "state.pt")
    uninterrupted = spawn("save", saved_in, tmp_path, arg=path)
    resumed = spawn("save", resumed_in, tmp_path, arg="resume:" + path)
    for r in resumed[1:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed[0]["params"], r["params"]))
    for a, b in zip(resumed[0]["params"], uninterrupted[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mistake", ["damping", "model", "sharing"])
def test_set_up_mistakes_raise_on_every_process(mistake, tmp_path):
    results = spawn("mistake", 2, tmp_path, arg=mistake, timeout=120)
    for r in results:
        assert r["error"] is not None and "processes built different optimizers" in r["error"], r
    assert results[0]["error"] == results[1]["error"]


def test_fsdp_is_refused(tmp_path):
    (result,) = spawn("fsdp", 1, tmp_path)
    assert result["error"] is not None and "FullyShardedDataParallel" in result["error"]


def test_hybrid_sharing_mixes_per_layer():
    """inverse_sharing="hybrid" shares each layer's eigenbases or its directions, whichever is fewer
    elements per step (a layer's Q and d over inv_update_freq steps, against its direction)."""
    from natgrad_cuda._distributed import sharing_bytes

    shapes = {"A": (6, 6), "G": (7, 7), "QA": (6, 6), "dA": (6,), "QG": (7, 7), "dG": (7,)}
    assert sharing_bytes(shapes, 3) == ((36 + 6 + 49 + 7) / 3, 42.0)
    assert sharing_bytes(shapes, 2)[0] > 42.0  # inverses every 2 steps: the directions are cheaper
