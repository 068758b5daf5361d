"""scripts/gpu_check.py and gpu_check.sh on the CPU: the op list, the timing and optimizer stages and
the report with tiny shapes and few repetitions (a CPU timer in place of CUDA events), and the shell
script's dry run end to end. Nothing here asserts on a timing."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import natgrad_cuda as ng

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_every_op_runs_once():
    res = gpu_check.run_ops("cpu", "tiny")
    assert set(res) == set(gpu_check.OP_NAMES) | {op + "[library]" for op in gpu_check.LIBRARY_OPS}
    assert all(v == "ok" for v in res.values()), res


@pytest.mark.skipif(not ng.emulation.available(), reason="emulated backend not built")
def test_the_library_runs_reach_cublas():
    # run_ops' "[library]" pass is what puts the library path under compute-sanitizer: in emulation
    # (the CUDA source on the CPU) its calls must reach the (emulated) cuBLAS.
    with ng.emulation.count() as c:
        gpu_check.run_ops("cpu", "tiny", impl="emulated")
    assert c.library_calls >= len(gpu_check.LIBRARY_OPS)


def test_timing_covers_every_op_at_every_scale():
    out = gpu_check.run_timing("cpu", ("tiny", "tiny"), reps=1, warmup=0, budget_s=120.0)
    assert {"budget_s", "reps", "warmup", "results"} <= set(out)
    entries = out["results"]
    assert [e["op"] for e in entries] == gpu_check.OP_NAMES * 2
    for e in entries:
        assert not e.get("skipped"), e
        assert {"op", "scale", "shape", "native", "reference", "baselines", "speedup_vs_best_torch"} <= set(e)
        assert ("paths" in e) == (e["op"] in gpu_check.LIBRARY_OPS)
        for timed in [e["native"], e["reference"], *e["baselines"].values(), *e.get("paths", {}).values()]:
            assert set(timed) == {"median_ms", "reps"}, (e["op"], timed)
    json.dumps(out)  # JSON as it is
    # every op but the low-rank preconditioning (whose torch twin is the reference) has a torch baseline
    assert all(e["baselines"] for e in entries if e["op"] != "precondition_low_rank")


def test_timing_past_its_deadline_says_so():
    out = gpu_check.run_timing("cpu", ("tiny",), reps=1, warmup=0, budget_s=-1.0)
    assert [e["op"] for e in out["results"]] == gpu_check.OP_NAMES
    assert all(e["skipped"] == "deadline" for e in out["results"])


def test_optimizer_native_matches_reference():
    out = gpu_check.compare_optimizer("cpu", steps=2, cases=(("mlp", "eigen"),))
    assert set(out["mlp_eigen"]) == {"steps", "max_rel_param_diff", "loss_native", "loss_reference"}
    assert out["mlp_eigen"]["max_rel_param_diff"] < 1e-10


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
skipped="2" tests="6"><testcase classname="tests.test_a" name="test_x[cuda]"/>
<testcase classname="tests.test_a" name="test_y[cuda]"><failure message="boom"/></testcase>
<testcase classname="tests.test_b" name="test_z[cuda]"><error message="collection failure"/></testcase>
</testsuite></testsuites>"""

SANITIZER_LOG = """========= COMPUTE-SANITIZER
GPU_CHECK_OPS_OK
========= ERROR SUMMARY: 0 errors
"""

RACECHECK_LOG = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at k(float*)+0x10
=========     and Read access at k(float*)+0x20 [4 hazards]
=========
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""


def test_report_merges_the_fragments(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "stages.tsv").write_text("build\tok\t12\t\ntests\tfailed\t3\texit 1: boom\n")
    (work / "tests.log").write_text("line\n" * 50)
    (work / "junit.xml").write_text(JUNIT)
    (work / "sanitizer_memcheck.log").write_text(SANITIZER_LOG)
    (work / "sanitizer_racecheck.log").write_text(RACECHECK_LOG)
    (work / "env.json").write_text(json.dumps(gpu_check.environment("cpu")))
    (work / "ops.json").write_text(json.dumps(gpu_check.run_ops("cpu", "tiny")))
    (work / "timing.json").write_text(json.dumps(gpu_check.run_timing("cpu", ("tiny",), reps=1, warmup=0)))
    out = tmp_path / "out" / "gpu_check.json"
    gpu_check.report(str(work), str(out))
    result = json.loads(out.read_text())
    assert {"stages", "env", "tests", "sanitizer", "ops", "optimizer", "timing"} <= set(result)
    assert [s["stage"] for s in result["stages"]] == ["build", "tests"]
    assert len(result["stages"][1]["log_tail"]) == 40 and "log_tail" not in result["stages"][0]
    assert result["tests"] == {"tests": 6, "passed": 2, "failed": 1, "errors": 1, "skipped": 2,
                               "failed_ids": ["tests.test_a::test_y[cuda]", "tests.test_b::test_z[cuda]"]}
    assert result["sanitizer"] == {
        "memcheck": {"errors": 0, "first": [], "ops_program_ok": True},
        "racecheck": {"errors": 1, "warnings": 0, "ops_program_ok": False,
                      "first": ["Error: Race reported between Write access at k(float*)+0x10"]}}
    assert result["optimizer"] is None  # a stage that did not run
    printed = capsys.readouterr().out
    assert "gpu_check summary" in printed and "compute-sanitizer memcheck: 0 errors" in printed


@pytest.mark.skipif(sys.platform != "linux", reason="the script is for Linux GPU machines")
def test_dry_run_end_to_end(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    status = {s["stage"]: s["status"] for s in result["stages"]}
    assert status == {"build": "skipped", "tests": "skipped", "sanitizer": "skipped", "env": "ok", "ops": "ok",
                      "optimizer": "ok", "timing": "ok"}, result["stages"]
    assert set(result["ops"]) >= set(gpu_check.OP_NAMES)
    assert [e["op"] for e in result["timing"]["results"]] == gpu_check.OP_NAMES
    assert "gpu_check summary" in res.stdout
