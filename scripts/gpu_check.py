"""The Python side of scripts/gpu_check.sh: what runs on the GPU once natgrad_cuda is built there.

Subcommands (each writes one JSON fragment into --work; ``report`` merges them):

  env              the machine: Python, torch, the GPU and its compute capability, natgrad_cuda's build
  ops              one small call of every op with impl="native" (the program compute-sanitizer runs)
  optimizer        20 K-FAC steps with backend="native" against backend="reference" on one device, a
                   small MLP and a small CNN in float64: the largest relative parameter difference
  timing           every op at a small and a large shape, native and reference against torch's own
                   equivalents: CUDA events (a CPU timer on the CPU), warm-up, median of the repetitions
  report           the fragments, the stage log and the pytest and compute-sanitizer outputs in one
                   JSON (gpu_check.json), and a printed summary

``--device cpu`` runs the same code on the CPU (with the CPU kernels as "native"): the dry run, and what
tests/test_gpu_check.py calls with tiny shapes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Optional

try:  # the report needs none of these: it still writes its JSON on a machine where they do not import
    import torch
    import torch.nn.functional as F
    from torch import nn

    import natgrad_cuda as ng
    from natgrad_cuda import ops
    _IMPORT_ERROR = None
except ImportError as exc:
    _IMPORT_ERROR = exc

# Shapes per scale: "tiny" for the tests on the CPU, "small" for the sanitizer and the small timing,
# "large" for the large timing (sized for an H100/H200: a few milliseconds per native call).
SHAPES = {
    "tiny": dict(fu_layers=2, fu_rows=16, fu_width=8, conv_batch=2, conv_channels=3, conv_size=6,
                 jacobi=(2, 8), solver=(2, 70), inverse=(2, 8), gemm_layers=2, gemm=(6, 5), rank=2,
                 upd_tensors=3, upd_numel=100),
    "small": dict(fu_layers=4, fu_rows=256, fu_width=64, conv_batch=8, conv_channels=16, conv_size=16,
                  jacobi=(16, 32), solver=(4, 256), inverse=(8, 64), gemm_layers=8, gemm=(64, 64), rank=8,
                  upd_tensors=10, upd_numel=4096),
    "large": dict(fu_layers=8, fu_rows=4096, fu_width=1024, conv_batch=64, conv_channels=64, conv_size=32,
                  jacobi=(256, 64), solver=(4, 1024), inverse=(16, 1024), gemm_layers=8, gemm=(1024, 1024),
                  rank=64, upd_tensors=20, upd_numel=1 << 20),
}
# The sanitizer's call of eigh_batched: widths that take the Jacobi kernel (<= 64), the batched
# cuSOLVER path (a group of equal widths) and the single large decomposition.
EIGH_SANITIZER_WIDTHS = (32, 32, 100, 100, 130)


# ---- inputs ----------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(n: int, gen, dtype, device) -> torch.Tensor:
    # drawn on the CPU (seeded), multiplied where the GPU can do it fast (the large shapes)
    X = torch.randn(n, n + 4, generator=gen, dtype=torch.float64).to(device)
    return (X @ X.T / (n + 4)).to(dtype)


def _eig_layer(o: int, k: int, gen, dtype, device, rank: Optional[int] = None):
    """(M, QA, dA, QG, dG): eigenpairs of random factors (the leading ``rank`` of A when given)."""
    dA, QA = torch.linalg.eigh(_spd(k, gen, torch.float64, device))
    dG, QG = torch.linalg.eigh(_spd(o, gen, torch.float64, device))
    if rank is not None:
        dA, QA = dA[k - rank:], QA[:, k - rank:].contiguous()
    M = torch.randn(o, k, generator=gen, dtype=torch.float64).to(device)
    return [t.to(dtype).contiguous() for t in (M, QA, dA.clamp_min(0), QG, dG.clamp_min(0))]


def _columns(layers) -> List[list]:
    return [list(x) for x in zip(*layers)]


# ---- the op cases ----------------------------------------------------------------------------------


class Case:
    """One op at one shape: ``run(impl)`` calls it; ``baselines`` are torch's own ways to the same result."""

    def __init__(self, name: str, shape: str, run: Callable[[str], object], baselines: Dict[str, Callable[[], object]]):
        self.name, self.shape, self.run, self.baselines = name, shape, run, baselines


def op_cases(device, scale: str = "small", dtype=None) -> List[Case]:
    """Every op once: factor_update_ on rows and on convolution patches, eigh_batched (Jacobi widths and
    cuSOLVER widths), damped_inverse, kron_matmul, precondition (eigen, factored, low rank),
    ekfac_precondition and kfac_update_; float32 unless ``dtype`` says otherwise."""
    device, dtype = torch.device(device), dtype or torch.float32
    s = SHAPES[scale]
    gen = _gen(0)
    cases = []

    # factor_update_: equal layers, so that one baddbmm is torch's best way to the same sums
    L, n, d = s["fu_layers"], s["fu_rows"], s["fu_width"]
    X = [torch.randn(n, d, generator=gen).to(dtype).to(device) for _ in range(L)]
    Fs = [torch.zeros(d + 1, d + 1, dtype=dtype, device=device) for _ in range(L)]
    Xa = torch.stack([torch.cat([x, torch.ones(n, 1, dtype=dtype, device=device)], 1) for x in X])
    Fb = torch.zeros(L, d + 1, d + 1, dtype=dtype, device=device)
    cases.append(Case("factor_update_", f"{L} x ({n}, {d}) + ones", lambda impl: ops.factor_update_(
        Fs, X, 0.95, [1.0 / n] * L, [True] * L, impl=impl),
        {"torch.baddbmm": lambda: torch.baddbmm(Fb, Xa.mT, Xa, beta=0.95, alpha=1.0 / n, out=Fb)}))

    # factor_update_ on ConvPatches: a 3x3 convolution's patches, read from the image
    B, C, H = s["conv_batch"], s["conv_channels"], s["conv_size"]
    image = torch.randn(B, C, H, H, generator=gen).to(dtype).to(device)
    patches = ops.ConvPatches(image, 3, padding=1)
    Fc = torch.zeros(C * 9, C * 9, dtype=dtype, device=device)
    rows = patches.shape[0]

    def unfold_addmm():
        cols = F.unfold(image, 3, padding=1).transpose(1, 2).reshape(-1, C * 9)
        return Fc.mul_(0.95).addmm_(cols.T, cols, alpha=1.0 / rows)

    cases.append(Case("factor_update_conv", f"({B}, {C}, {H}, {H}) 3x3", lambda impl: ops.factor_update_(
        [Fc], [patches], 0.95, [1.0 / rows], [False], impl=impl), {"F.unfold + addmm": unfold_addmm}))

    # eigh_batched: widths of the Jacobi kernel, then of cuSOLVER
    for name, (count, width) in (("eigh_batched_jacobi", s["jacobi"]), ("eigh_batched_cusolver", s["solver"])):
        mats = [_spd(width, gen, dtype, device) for _ in range(count)]
        stack = torch.stack(mats)
        cases.append(Case(name, f"{count} x {width}", lambda impl, mats=mats: ops.eigh_batched(mats, impl=impl),
                          {"torch.linalg.eigh loop": lambda mats=mats: [torch.linalg.eigh(M) for M in mats],
                           "torch.linalg.eigh batched": lambda stack=stack: torch.linalg.eigh(stack)}))
    if scale == "small":  # the sanitizer's mixed call: every eigh path in one
        mixed = [_spd(w, gen, dtype, device) for w in EIGH_SANITIZER_WIDTHS]
        cases.append(Case("eigh_batched_mixed", "widths " + ", ".join(map(str, EIGH_SANITIZER_WIDTHS)),
                          lambda impl: ops.eigh_batched(mixed, impl=impl),
                          {"torch.linalg.eigh loop": lambda: [torch.linalg.eigh(M) for M in mixed]}))

    # damped_inverse
    count, width = s["inverse"]
    mats = [_spd(width, gen, dtype, device) for _ in range(count)]
    shifted = torch.stack(mats) + 1e-2 * torch.eye(width, dtype=dtype, device=device)
    cases.append(Case("damped_inverse", f"{count} x {width}", lambda impl: ops.damped_inverse(
        mats, [1e-2] * count, impl=impl),
        {"torch.linalg.cholesky + cholesky_inverse": lambda: torch.cholesky_inverse(torch.linalg.cholesky(shifted))}))

    # the per-layer products: equal layers, so that torch.bmm takes them all at once
    L, (o, k) = s["gemm_layers"], s["gemm"]
    M = [torch.randn(o, k, generator=gen).to(dtype).to(device) for _ in range(L)]
    IA = [_spd(k, gen, dtype, device) for _ in range(L)]
    IG = [_spd(o, gen, dtype, device) for _ in range(L)]
    Ms, IAs, IGs = torch.stack(M), torch.stack(IA), torch.stack(IG)
    cases.append(Case("kron_matmul", f"{L} x ({o}, {k})", lambda impl: ops.kron_matmul(M, IA, IG, impl=impl),
                      {"torch.bmm": lambda: torch.bmm(torch.bmm(IGs, Ms), IAs)}))

    layers = [_eig_layer(o, k, gen, dtype, device) for _ in range(L)]
    Mx, QA, dA, QG, dG = (torch.stack(col) for col in _columns(layers))
    lam = 1e-2

    def eigen_bmm():
        V = torch.bmm(torch.bmm(QG.mT, Mx), QA)
        return torch.bmm(torch.bmm(QG, V / (dG[:, :, None] * dA[:, None, :] + lam)), QA.mT)

    def factored_bmm():
        pi = (dA.mean(1) / dG.mean(1)).sqrt()[:, None]
        D = (dG + math.sqrt(lam) / pi)[:, :, None] * (dA + pi * math.sqrt(lam))[:, None, :]
        return torch.bmm(torch.bmm(QG, torch.bmm(torch.bmm(QG.mT, Mx), QA) / D), QA.mT)

    for inverse, baseline in (("eigen", eigen_bmm), ("factored", factored_bmm)):
        cases.append(Case(f"precondition_{inverse}", f"{L} x ({o}, {k})",
                          lambda impl, inverse=inverse: ops.precondition(*_columns(layers), lam, inverse=inverse,
                                                                          impl=impl), {"torch.bmm": baseline}))
    r = s["rank"]
    low = [_eig_layer(o, k, gen, dtype, device, rank=r) for _ in range(L)]
    cases.append(Case("precondition_low_rank", f"{L} x ({o}, {k}), A of rank {r}", lambda impl: ops.precondition(
        *_columns(low), lam, inverse="eigen", impl=impl), {}))  # its torch twin is impl="reference"

    S = [torch.rand(o, k, generator=gen).to(dtype).to(device) for _ in range(L)]
    Ss = torch.stack(S)
    QAl, QGl = list(QA.unbind()), list(QG.unbind())
    Ml = list(Mx.unbind())

    def ekfac_bmm():
        V = torch.bmm(torch.bmm(QG.mT, Mx), QA)
        return torch.bmm(torch.bmm(QG, V / (Ss + lam)), QA.mT)

    cases.append(Case("ekfac_precondition", f"{L} x ({o}, {k})", lambda impl: ops.ekfac_precondition(
        Ml, QAl, QGl, S, lam, impl=impl), {"torch.bmm": ekfac_bmm}))

    # kfac_update_: KL clip, weight decay, momentum over every parameter
    T, numel = s["upd_tensors"], s["upd_numel"]
    params, dirs, grads, bufs = ([torch.randn(numel, generator=gen).to(dtype).to(device) for _ in range(T)]
                                 for _ in range(4))
    clipped = [True] * T
    lr, mom, wd, kl = 1e-3, 0.9, 1e-4, 1e-3

    def foreach_update():
        vg = torch.stack([torch.dot(d, g) for d, g in zip(dirs, grads)]).sum()
        nu = torch.clamp(torch.sqrt(kl / (lr * lr * vg.abs().clamp_min(1e-30))), max=1.0)
        step = torch._foreach_mul(dirs, nu)
        torch._foreach_add_(step, params, alpha=wd)
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, step)
        torch._foreach_add_(params, bufs, alpha=-lr)

    cases.append(Case("kfac_update_", f"{T} x {numel}", lambda impl: ops.kfac_update_(
        params, dirs, grads, bufs, clipped, lr, mom, wd, kl, impl=impl), {"torch._foreach": foreach_update}))
    return cases


OP_NAMES = ["factor_update_", "factor_update_conv", "eigh_batched_jacobi", "eigh_batched_cusolver", "damped_inverse",
            "kron_matmul", "precondition_eigen", "precondition_factored", "precondition_low_rank",
            "ekfac_precondition", "kfac_update_"]


# The ops with products that ops.set_library_gemms can send to cuBLAS, and the paths timed for them.
LIBRARY_OPS = {"factor_update_", "kron_matmul", "precondition_eigen", "precondition_factored", "precondition_low_rank",
               "ekfac_precondition"}
PATHS = {"grouped kernels": dict(min_macs=2 ** 62), "cuBLAS IEEE": dict(min_macs=0, precision="ieee"),
         "cuBLAS TF32": dict(min_macs=0, precision="tf32")}


def run_ops(device, scale="small", impl="native") -> dict:
    """Every case once (the program the sanitizer watches), and the library ops again with every
    product in cuBLAS ("<op>[library]": the grouped launches then only apply epilogues):
    {name: "ok" or the error}."""
    out = {}
    cases = op_cases(device, scale)
    runs = [(c.name, c, {}) for c in cases] + [(c.name + "[library]", c, PATHS["cuBLAS IEEE"])
                                                for c in cases if c.name in LIBRARY_OPS]
    for name, case, setting in runs:
        try:
            with ops.using_library_gemms(**setting):
                case.run(impl)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, and the other ops still run
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


# ---- timing ----------------------------------------------------------------------------------------


def measure(fn: Callable[[], object], device, reps: int, warmup: int, deadline: float) -> dict:
    """Median milliseconds of ``fn`` over up to ``reps`` calls after ``warmup``: CUDA events on a GPU,
    a CPU timer on the CPU; fewer repetitions when the deadline (time.monotonic()) comes first."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.monotonic() > deadline:
            break
    return {"median_ms": statistics.median(times), "reps": len(times)}


def run_timing(device, scales=("small", "large"), reps=20, warmup=3, budget_s=120.0) -> dict:
    """{"deadline_s", "results": [{op, scale, shape, native, reference, baselines: {name: ...}, skipped}]}.
    Entries the deadline did not leave time for say so in "skipped"."""
    deadline = time.monotonic() + budget_s
    results = []
    for scale in scales:
        if time.monotonic() > deadline:
            results += [{"op": name, "scale": scale, "skipped": "deadline"} for name in OP_NAMES]
            continue
        try:
            cases = op_cases(device, scale)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the large shapes
            results += [{"op": name, "scale": scale, "skipped": f"inputs: {type(exc).__name__}: {exc}"}
                        for name in OP_NAMES]
            continue
        for case in cases:
            if case.name not in OP_NAMES:
                continue
            entry = {"op": case.name, "scale": scale, "shape": case.shape, "baselines": {}}
            if time.monotonic() > deadline:
                entry["skipped"] = "deadline"
                results.append(entry)
                continue
            for label, fn in [("native", lambda: case.run("native")), ("reference", lambda: case.run("reference")),
                              *case.baselines.items()]:
                try:
                    timed = measure(fn, device, reps, warmup, deadline)
                except Exception as exc:  # noqa: BLE001 - one failed variant does not stop the others
                    timed = {"error": f"{type(exc).__name__}: {exc}"}
                if label in ("native", "reference"):
                    entry[label] = timed
                else:
                    entry["baselines"][label] = timed
            if case.name in LIBRARY_OPS:  # native again on each path: where cuBLAS starts to pay
                entry["paths"] = {}
                for label, setting in PATHS.items():
                    try:
                        with ops.using_library_gemms(**setting):
                            entry["paths"][label] = measure(lambda: case.run("native"), device, reps, warmup, deadline)
                    except Exception as exc:  # noqa: BLE001
                        entry["paths"][label] = {"error": f"{type(exc).__name__}: {exc}"}
            native = entry.get("native", {}).get("median_ms")
            fastest = [t["median_ms"] for t in entry["baselines"].values() if "median_ms" in t]
            entry["speedup_vs_best_torch"] = (min(fastest) / native) if native and fastest else None
            results.append(entry)
        del cases
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return {"budget_s": budget_s, "reps": reps, "warmup": warmup, "results": results}


# ---- optimizer: native against reference -----------------------------------------------------------


def _models(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def compare_optimizer(device, steps=20, cases=(("mlp", "eigen"), ("mlp", "factored"), ("cnn", "eigen"))) -> dict:
    """K-FAC with backend="native" against backend="reference" from the same start on the same batches,
    float64: per case the largest relative parameter difference (max |p - q| / max |q| over the
    parameter tensors) after ``steps`` steps, and both final losses."""
    device = torch.device(device)
    gen = _gen(1)
    out = {}
    for kind, inverse in cases:
        shape = (32, 20) if kind == "mlp" else (32, 3, 8, 8)
        batches = [(torch.randn(*shape, generator=gen, dtype=torch.float64).to(device),
                    torch.randint(0, 10, (32,), generator=gen).to(device)) for _ in range(steps)]
        models, losses = {}, {}
        try:
            for backend in ("native", "reference"):
                model = _models(kind).to(device=device, dtype=torch.float64)
                opt = ng.KFAC(model, lr=0.1, damping=1e-2, loss="cross_entropy", fisher_type="type-2",
                              inverse=inverse, inv_update_freq=5, seed=0, backend=backend)
                for x, y in batches:
                    opt.zero_grad()
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    opt.backward(loss, logits)
                    opt.step()
                models[backend], losses[backend] = model, float(loss.detach())
            with torch.no_grad():
                rel = max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-300))
                          for p, q in zip(models["native"].parameters(), models["reference"].parameters()))
            out[f"{kind}_{inverse}"] = {"steps": steps, "max_rel_param_diff": rel, "loss_native": losses["native"],
                                        "loss_reference": losses["reference"]}
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            out[f"{kind}_{inverse}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# ---- env -------------------------------------------------------------------------------------------


def environment(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = "%d%d" % torch.cuda.get_device_capability()
    try:
        info["natgrad_cuda"] = {k: v for k, v in ng.build_info().items() if k != "extension_error"}
    except Exception as exc:  # noqa: BLE001
        info["natgrad_cuda"] = {"error": str(exc)}
    return info


# ---- report ----------------------------------------------------------------------------------------


def parse_junit(path: str) -> dict:
    """Counts of a pytest --junitxml file: tests, passed, failed, errors, skipped, and the failed ids."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"tests": counts["tests"], "passed": passed, "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "failed_ids": failed[:50]}


def parse_sanitizer(path: str) -> dict:
    """compute-sanitizer's log: its error summary (None if it never printed one) and the first errors."""
    text = open(path, errors="replace").read()
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    # racecheck sums up its own way: "RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)"
    races = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    # an error's headline is "========= " and text; its details are indented further
    errors = [line[10:].strip() for line in text.splitlines() if line.startswith("========= ")
              and not line.startswith("=========  ") and "COMPUTE-SANITIZER" not in line and "SUMMARY" not in line]
    out = {"errors": int(summary[-1]) if summary else None, "first": errors[:10],
           "ops_program_ok": "GPU_CHECK_OPS_OK" in text}
    if races:
        out["errors"] = int(races[-1][0])
        out["warnings"] = int(races[-1][1])
    return out


def read_stages(path: str) -> List[dict]:
    """The shell's stage log: one "stage<TAB>status<TAB>seconds<TAB>note" line per stage."""
    out = []
    if os.path.exists(path):
        for line in open(path):
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                out.append({"stage": parts[0], "status": parts[1], "seconds": float(parts[2] or 0),
                            "note": parts[3] if len(parts) > 3 else ""})
    return out


def report(work: str, out_path: str) -> dict:
    def load(name):
        path = os.path.join(work, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    result = {"stages": read_stages(os.path.join(work, "stages.tsv")), "env": load("env.json")}
    for st in result["stages"]:  # what went wrong, in the JSON itself: the end of the stage's log
        path = os.path.join(work, st["stage"] + ".log")
        if st["status"] in ("failed", "timeout") and os.path.exists(path):
            st["log_tail"] = open(path, errors="replace").read().splitlines()[-40:]
    junit = os.path.join(work, "junit.xml")
    result["tests"] = parse_junit(junit) if os.path.exists(junit) else None
    sanitizer = {}
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        path = os.path.join(work, f"sanitizer_{tool}.log")
        if os.path.exists(path):
            sanitizer[tool] = parse_sanitizer(path)
    result["sanitizer"] = sanitizer or None
    result["ops"] = load("ops.json")
    result["optimizer"] = load("optimizer.json")
    result["timing"] = load("timing.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(summary(result))
    return result


def summary(result: dict) -> str:
    lines = ["", "gpu_check summary", "-----------------"]
    env = result.get("env") or {}
    lines.append(f"machine: {env.get('gpu', env.get('device', '?'))} (capability {env.get('capability', '-')}), "
                 f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}")
    for st in result.get("stages", []):
        lines.append(f"  {st['stage']:<10} {st['status']:<8} {st['seconds']:7.1f} s  {st['note']}")
    t = result.get("tests")
    if t:
        lines.append(f"tests (-m cuda): {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped of {t['tests']}")
    for tool, s in (result.get("sanitizer") or {}).items():
        lines.append(f"compute-sanitizer {tool}: {s['errors'] if s['errors'] is not None else 'no summary'} errors")
    for case, o in (result.get("optimizer") or {}).items():
        lines.append(f"optimizer {case}: " + (f"max relative parameter difference {o['max_rel_param_diff']:.2e} after "
                                               f"{o['steps']} steps" if "error" not in o else o["error"]))
    timing = result.get("timing") or {}
    for e in timing.get("results", []):
        if e.get("skipped"):
            lines.append(f"timing {e['op']:<22} {e['scale']:<5} skipped: {e['skipped']}")
            continue
        nat = e.get("native", {}).get("median_ms")
        ref = e.get("reference", {}).get("median_ms")
        base = ", ".join(f"{k} {v['median_ms']:.3f}" for k, v in e["baselines"].items() if "median_ms" in v)
        paths = ", ".join(f"{k} {v['median_ms']:.3f}" for k, v in e.get("paths", {}).items() if "median_ms" in v)
        lines.append(f"timing {e['op']:<22} {e['scale']:<5} native {nat if nat is None else round(nat, 3)} ms, "
                     f"reference {ref if ref is None else round(ref, 3)} ms" + (f", {base} ms" if base else "")
                     + (f"; native by path: {paths} ms" if paths else ""))
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------


def _write(work: str, name: str, payload) -> None:
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, name), "w") as f:
        json.dump(payload, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["env", "ops", "optimizer", "timing", "report"])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the dry run)")
    parser.add_argument("--work", default="gpu_check_work", help="where the fragments go")
    parser.add_argument("--out", default=None, help="report: the JSON ($OUT/gpu_check.json or ./gpu_check.json)")
    parser.add_argument("--budget", type=float, default=120.0, help="timing: seconds before it stops measuring")
    parser.add_argument("--reps", type=int, default=20, help="timing: repetitions per measurement")
    parser.add_argument("--scales", default="small,large", help="timing: comma-separated (tiny, small, large)")
    parser.add_argument("--scale", default="small", help="ops: the shapes of the one call per op")
    parser.add_argument("--steps", type=int, default=20, help="optimizer: steps")
    args = parser.parse_args(argv)
    if args.command != "report" and _IMPORT_ERROR is not None:
        print(f"gpu_check: {args.command} needs torch and natgrad_cuda: {_IMPORT_ERROR}", file=sys.stderr)
        return 2
    if args.command != "report" and args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no GPU (use --device cpu for the dry run)", file=sys.stderr)
        return 2
    if args.command == "env":
        _write(args.work, "env.json", environment(args.device))
    elif args.command == "ops":
        res = run_ops(args.device, args.scale)
        _write(args.work, "ops.json", res)
        bad = {k: v for k, v in res.items() if v != "ok"}
        print("GPU_CHECK_OPS_OK" if not bad else f"GPU_CHECK_OPS_FAILED {bad}")
        return 0 if not bad else 1
    elif args.command == "optimizer":
        _write(args.work, "optimizer.json", compare_optimizer(args.device, args.steps))
    elif args.command == "timing":
        _write(args.work, "timing.json", run_timing(args.device, tuple(args.scales.split(",")), args.reps,
                                                    budget_s=args.budget))
    else:
        out = args.out or os.path.join(os.environ.get("OUT") or ".", "gpu_check.json")
        report(args.work, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
