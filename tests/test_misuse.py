"""Misuse and faults: every case either gives the right result (equal to the correct computation) or
a clear error naming the problem, with nothing changed in the model or the optimizer by a refused call.

Each test is named for what the user did. float64 unless the case is about dtypes.
"""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad_cuda as ng
from natgrad_cuda import emulation

DT = torch.float64
IMPLS = ["reference"] + (["native"] if "cpu" in ng.build_info()["backends"] else []) + (
    ["emulated"] if emulation.available() else [])


def mlp(seed=0, out=3, dtype=DT):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, out)).to(dtype)


def batch(n=12, seed=1, out=3, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, dtype=dtype, generator=g), torch.randint(0, out, (n,), generator=g)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def snapshot(model, opt):
    """Everything a refused call must leave alone: parameters, gradients, the optimizer's state."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    sd = opt.state_dict()
    return params, grads, pickle.dumps(_tensors_to_lists(sd))


def _tensors_to_lists(obj):
    if isinstance(obj, torch.Tensor):
        return (str(obj.dtype), obj.tolist())
    if isinstance(obj, dict):
        return {k: _tensors_to_lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tensors_to_lists(v) for v in obj]
    return obj


def assert_unchanged(before, model, opt):
    params, grads, sd = snapshot(model, opt)
    for a, b in zip(before[0], params):
        assert torch.equal(a, b)
    for a, b in zip(before[1], grads):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before[2] == sd


def train(model, opt, batches, extra=None):
    """Plain steps; ``extra(model)`` runs between opt.backward and step."""
    for x, y in batches:
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        if extra is not None:
            extra(model)
        opt.step()
    return flat(model.parameters())


def kfac(model, **kw):
    kw = {"loss": "cross_entropy", "fisher_type": "type-2", "factor_update_freq": 1, "inv_update_freq": 1,
          "seed": 0, **kw}
    return ng.KFAC(model, **kw)


BATCHES = [batch(seed=s) for s in range(4)]


# ---- 1. curvature fed by the wrong forward ----------------------------------------------------------


def test_passing_a_slice_of_the_outputs_is_refused_and_changes_nothing():
    model = mlp()
    opt = kfac(model)
    x, y = batch()
    out = model(x)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="computed from the model's output"):
        opt.backward(F.cross_entropy(out[:4], y[:4]), out[:4])
    assert_unchanged(before, model, opt)
    opt.backward(F.cross_entropy(out, y), out)  # the right call still works afterwards
    assert opt.step()


@pytest.mark.parametrize("when", ["before", "between", "after_backward"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
def test_monitoring_forward_outside_no_grad_does_not_change_the_step(when, fisher_type):
    clean, noisy = mlp(), mlp()
    opt_a, opt_b = kfac(clean, fisher_type=fisher_type), kfac(noisy, fisher_type=fisher_type)
    xm, _ = batch(n=30, seed=99)
    for x, y in BATCHES:
        for model, opt, monitor in ((clean, opt_a, False), (noisy, opt_b, True)):
            opt.zero_grad()
            if monitor and when == "before":
                model(xm).sum()  # a forward with gradients enabled whose outputs never reach a backward
            out = model(x)
            if monitor and when == "between":
                model(xm)
            opt.backward(F.cross_entropy(out, y), out)
            if monitor and when == "after_backward":
                model(xm)
            opt.step()
    assert torch.equal(flat(clean.parameters()), flat(noisy.parameters()))


def test_outputs_the_loss_was_not_computed_from_are_refused():
    model = mlp()
    opt = kfac(model)
    x, y = batch()
    out1, out2 = model(x), model(x * 2)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="loss was not computed from outputs"):
        opt.backward(F.cross_entropy(out1, y), out2)
    assert_unchanged(before, model, opt)


@pytest.mark.parametrize("detached,match", [("outputs", "outputs does not require grad"),
                                             ("loss", "loss does not require grad")])
def test_detached_outputs_or_loss_are_refused(detached, match):
    model = mlp()
    opt = kfac(model)
    x, y = batch()
    out = model(x)
    loss = F.cross_entropy(out, y)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.backward(loss.detach() if detached == "loss" else loss, out.detach() if detached == "outputs" else out)
    assert_unchanged(before, model, opt)


def test_outputs_of_another_model_or_of_a_forward_before_the_optimizer_are_refused():
    model, other = mlp(), mlp(seed=3)
    x, y = batch()
    early = model(x)
    opt = kfac(model)
    with pytest.raises(ValueError, match="not the output of a forward of this optimizer's model"):
        opt.backward(F.cross_entropy(early, y), early)
    out = other(x)
    with pytest.raises(ValueError, match="not the output of a forward of this optimizer's model"):
        opt.backward(F.cross_entropy(out, y), out)


def test_calling_opt_backward_twice_on_one_forward_is_refused():
    model = mlp()
    opt = kfac(model)
    x, y = batch()
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.backward(loss, out)
    with pytest.raises(ValueError, match="already called"):
        opt.backward(F.cross_entropy(out, y), out)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
@pytest.mark.parametrize("cls", ["KFAC", "KFACPreconditioner"])
def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch(fisher_type, cls):
    """Micro-batches of 5 and 7, each loss weighted by its share of the batch, then one step: the
    same factors and step as one batch of 12 (three steps, momentum on, float64). MC included: the
    categorical draws of the micro-batches are those of the whole batch, one per row in order."""
    def make(model):
        if cls == "KFAC":
            return kfac(model, fisher_type=fisher_type, momentum=0.5), None
        pre = ng.KFACPreconditioner(model, loss="cross_entropy", fisher_type=fisher_type, factor_update_freq=1,
                                    inv_update_freq=1, lr=0.1, seed=0)
        return pre, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)

    whole, parts = mlp(), mlp()
    (opt_w, sgd_w), (opt_p, sgd_p) = make(whole), make(parts)
    for x, y in BATCHES[:3]:
        for model, opt, sgd, splits in ((whole, opt_w, sgd_w, [12]), (parts, opt_p, sgd_p, [5, 7])):
            model.zero_grad()
            for xs, ys in zip(x.split(splits), y.split(splits)):
                out = model(xs)
                opt.backward(F.cross_entropy(out, ys) * (len(ys) / 12), out)
            opt.step()
            if sgd is not None:
                sgd.step()
    torch.testing.assert_close(flat(parts.parameters()), flat(whole.parameters()), rtol=1e-10, atol=1e-12)
    def layers(opt):
        sd = opt.state_dict()
        return sd["kfac"]["layers"] if cls == "KFAC" else sd["layers"]

    for name, st in layers(opt_w).items():
        for key in ("A", "G"):
            torch.testing.assert_close(layers(opt_p)[name][key], st[key], rtol=1e-12, atol=1e-14)


# ---- 2. loss.backward() in place of opt.backward() ----------------------------------------------------


@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_plain_loss_backward_with_a_curvature_fisher_warns_naming_opt_backward(fisher_type):
    model = mlp()
    opt = kfac(model, fisher_type=fisher_type)
    x, y = batch()
    out = model(x)
    F.cross_entropy(out, y).backward()
    with pytest.warns(RuntimeWarning, match=r"opt\.backward\(loss, outputs\)"):
        opt.step()


def test_step_without_any_gradient_does_nothing_and_does_not_count():
    model = mlp()
    opt = kfac(model)
    model(batch()[0])  # a forward, but no backward
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="no parameter has a gradient"):
        assert opt.step() is False
    assert opt.steps == 0 and opt.skipped_steps == 0
    assert_unchanged(before, model, opt)


# ---- 3. non-finite directions and updates ---------------------------------------------------------------


def half_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).half()


def fp16_backward(model, opt, x_scale, loss_scale):
    """One forward of a float16 batch (inputs scaled by x_scale) and opt.backward of the float32
    cross-entropy times loss_scale; returns the parameters before the step."""
    x, y = torch.randn(16, 5).half() * x_scale, torch.randint(0, 3, (16,))
    out = model(x)
    opt.backward(F.cross_entropy(out.float(), y) * loss_scale, out)
    return flat(model.parameters()).clone()


@pytest.mark.parametrize("backend", IMPLS)
def test_fp16_model_whose_direction_overflows_skips_the_step(backend):
    """Small inputs make A's smallest eigenvalues tiny, so at damping 1e-9 the direction is many times
    the gradient, past float16's range (finite gradients of at most 31): the step must be skipped,
    not written."""
    model = half_model()
    opt = kfac(model, damping=1e-9, kl_clip=None, lr=1e-3, backend=backend)
    params = fp16_backward(model, opt, 1e-2, 100)
    with pytest.warns(RuntimeWarning, match="a preconditioned direction is not finite"):
        assert opt.step() is False
    assert torch.equal(flat(model.parameters()), params)
    assert opt.steps == 0 and opt.skipped_steps == 1
    assert all(not st for st in opt.state_dict()["kfac"]["layers"].values())  # no factors committed
    assert torch.isfinite(flat(model.parameters())).all()


@pytest.mark.parametrize("backend", IMPLS)
def test_fp16_update_that_would_overflow_the_parameters_skips_the_step(backend):
    model = half_model()
    opt = kfac(model, damping=1.0, kl_clip=None, lr=3e4, momentum=0.0, backend=backend)
    params = fp16_backward(model, opt, 1.0, 100)
    with pytest.warns(RuntimeWarning, match="the update would overflow the parameters"):
        assert opt.step() is False
    assert torch.equal(flat(model.parameters()), params)


def test_fp16_preconditioner_with_an_overflowing_direction_leaves_the_gradients():
    model = half_model()
    pre = ng.KFACPreconditioner(model, loss="cross_entropy", fisher_type="type-2", damping=1e-9, kl_clip=None,
                                factor_update_freq=1, inv_update_freq=1)
    fp16_backward(model, pre, 1e-2, 100)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="direction is not finite"):
        assert pre.step() is False
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert pre.steps == 0 and pre.skipped_steps == 1


def test_large_but_finite_fp16_update_is_taken():
    """The bound that guards the update is only a shortcut: an update near float16's limit that
    stays finite is taken (checked exactly on copies)."""
    model = half_model()
    with torch.no_grad():
        model[0].weight.fill_(2e4)
    opt = kfac(model, damping=1.0, kl_clip=None, lr=1e-3, momentum=0.9)
    params = fp16_backward(model, opt, 1e-3, 1)
    assert opt.step() is True
    assert not torch.equal(flat(model.parameters()), params) and torch.isfinite(flat(model.parameters())).all()


# ---- 4. state dicts -------------------------------------------------------------------------------


def trained(**kw):
    model = mlp()
    opt = kfac(model, **kw)
    train(model, opt, BATCHES[:2])
    return model, opt


def corrupt(sd, path, value):
    sd = copy.deepcopy(sd)
    target = sd
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
    return sd


def _nan(t):
    t = t.clone(memory_format=torch.contiguous_format)
    t.view(-1)[0] = float("nan")
    return t


BAD_STATES = [
    (("kfac", "layers", "0", "A"), _nan, "'A' is not finite"),
    (("kfac", "layers", "0", "QA"), _nan, "'QA' is not finite"),
    (("kfac", "layers", "2", "dG"), _nan, "'dG' is not finite"),
    (("kfac", "layers", "2", "dG"), lambda t: -t - 1, "eigenvalues must be >= 0"),
    (("kfac", "layers", "0", "QG"), lambda t: t * 2, "orthonormal"),
    (("kfac", "layers", "0", "G"), lambda t: t[:2, :2], "shape"),
    (("kfac", "layers", "0", "A"), lambda t: t.long(), "floating-point"),
    (("kfac", "layers", "0", "dA"), KeyError, "incomplete"),
    (("kfac", "layers", "0"), lambda st: {**st, "H": st["A"]}, "unknown"),
    (("kfac", "steps"), 2.0, "'steps' must be an int"),
    (("kfac", "steps"), True, "'steps' must be an int"),
    (("kfac", "steps"), -1, "'steps' must be an int"),
    (("kfac", "steps"), KeyError, "missing steps"),
    (("kfac", "generator"), lambda g: g[:10], "generator"),
    (("kfac", "last_rho"), "high", "last_rho"),
    (("param_groups", 0, "lr"), -1.0, "lr"),
    (("param_groups", 0, "momentum"), 5.0, "momentum"),
    (("param_groups", 0, "damping"), "0.01", "damping"),
    (("state",), KeyError, "'state'"),
    (("state", 0, "momentum_buffer"), _nan, "not finite"),
    (("state", 0, "momentum_buffer"), lambda t: t[:1], "shape"),
]


@pytest.mark.parametrize("path,value,match", BAD_STATES, ids=[f"{'.'.join(map(str, p))}-{i}"
                                                             for i, (p, _, _) in enumerate(BAD_STATES)])
def test_loading_a_bad_state_dict_raises_naming_the_entry_and_changes_nothing(path, value, match):
    _, source = trained()
    sd = corrupt(source.state_dict(), path, value)
    model, opt = trained()
    train(model, opt, BATCHES[2:3])
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(before, model, opt)
    opt.load_state_dict(source.state_dict())  # a good state still loads


def test_loading_a_bad_preconditioner_state_changes_nothing():
    model = mlp()
    pre = ng.KFACPreconditioner(model, loss="cross_entropy", fisher_type="type-2", damping=0.1)
    x, y = batch()
    out = model(x)
    pre.backward(F.cross_entropy(out, y), out)
    pre.step()
    sd = pre.state_dict()
    bad = corrupt(sd, ("hyper", "damping"), -1.0)
    worse = corrupt(sd, ("layers", "0", "A"), _nan)
    for state, match in ((bad, "damping"), (worse, "'A' is not finite")):
        pre.damping = 0.3
        before = pickle.dumps(_tensors_to_lists(pre.state_dict()))
        with pytest.raises(ValueError, match=match):
            pre.load_state_dict(state)
        assert pre.damping == 0.3 and pickle.dumps(_tensors_to_lists(pre.state_dict())) == before


# ---- 5. runs that skip every step -------------------------------------------------------------------


def test_a_run_that_skips_every_step_counts_warns_at_powers_of_two_and_escalates():
    model = mlp()
    opt = kfac(model, max_consecutive_skips=9)
    x, y = batch()
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # the default filter: identical messages would show once
        for i in range(8):
            opt.zero_grad()
            out = model(x)
            opt.backward(F.cross_entropy(out, y) * float("inf"), out)
            assert opt.step() is False
        messages = [str(w.message) for w in caught if "NaN or Inf" in str(w.message)]
    # skips 1, 2, 4 and 8 say so: a diverged run does not print a warning per step
    assert len(messages) == 4 and len(set(messages)) == 4
    assert "8 in a row, 8 skipped in all; the next note at 16 in a row" in messages[-1]
    assert opt.skipped_steps == 8 and opt.steps == 0
    opt.zero_grad()
    out = model(x)
    opt.backward(F.cross_entropy(out, y) * float("inf"), out)
    with pytest.raises(RuntimeError, match="last 9 steps were all skipped"):
        opt.step()
    # a good step resets the run of skips
    opt.zero_grad()
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out)
    assert opt.step() and opt.steps == 1 and opt.skipped_steps == 9


def test_skip_counters_survive_a_checkpoint():
    model = mlp()
    opt = kfac(model)
    x, y = batch()
    out = model(x)
    opt.backward(F.cross_entropy(out, y) * float("nan"), out)
    with pytest.warns(RuntimeWarning):
        opt.step()
    other = kfac(mlp())
    other.load_state_dict(opt.state_dict())
    assert other.skipped_steps == 1


# ---- 6. copies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["KFAC", "KFACPreconditioner"])
def test_copying_or_pickling_the_optimizer_is_refused_clearly(cls):
    model = mlp()
    opt = kfac(model) if cls == "KFAC" else ng.KFACPreconditioner(model, loss="cross_entropy")
    for attempt in (lambda: copy.deepcopy(opt), lambda: copy.copy(opt), lambda: pickle.dumps(opt),
                    lambda: torch.save(opt, io.BytesIO())):
        with pytest.raises(TypeError, match="cannot be copied or pickled.*state_dict"):
            attempt()


def test_copying_or_saving_the_model_after_building_the_optimizer_works_and_the_copy_is_not_recorded():
    model, reference = mlp(), mlp()
    opt, opt_ref = kfac(model), kfac(reference)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole model, hooks and all
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for x, y in BATCHES:
        for m in (twin, loaded):  # forwards of the copies, with gradients, must not reach the optimizer
            F.cross_entropy(m(x), y).backward()
        train(model, opt, [(x, y)])
        train(reference, opt_ref, [(x, y)])
    assert torch.equal(flat(model.parameters()), flat(reference.parameters()))
    # and a copy can get an optimizer of its own
    train(twin, kfac(twin), BATCHES[:2])


# ---- 7. the model's dtype or device changed ---------------------------------------------------------------


def test_model_double_after_building_the_optimizer_follows_the_new_dtype():
    built_f32, built_f64 = mlp(dtype=torch.float32), mlp()
    opt_a = kfac(built_f32)
    opt_b = kfac(built_f64)
    built_f32.double()
    train(built_f32, opt_a, BATCHES)
    train(built_f64, opt_b, BATCHES)
    assert opt_a.state_dict()["kfac"]["layers"]["0"]["A"].dtype == torch.float64
    torch.testing.assert_close(flat(built_f32.parameters()), flat(built_f64.parameters()), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_model_half_after_some_steps_keeps_training(momentum):
    model = mlp(dtype=torch.float32)
    opt = kfac(model, momentum=momentum, damping=0.1)
    batches = [(x.float(), y) for x, y in BATCHES]
    train(model, opt, batches[:2])
    model.half()
    train(model, opt, [(x.half(), y) for x, y in batches[2:]])
    assert opt.steps == 4 and torch.isfinite(flat(model.parameters())).all()
    layers = opt.state_dict()["kfac"]["layers"]
    assert layers["0"]["A"].dtype == torch.float32  # half models accumulate in float32
    if momentum:
        assert all(s["momentum_buffer"].dtype == torch.float16 for s in opt.state.values())


# ---- 8. the ops -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("view", ["strided", "stride0"])
def test_precondition_with_strided_or_expanded_eigenvalue_vectors(impl, view):
    g = torch.Generator().manual_seed(0)
    o, k = 5, 7
    M = torch.randn(o, k, dtype=DT, generator=g)
    QA = torch.linalg.qr(torch.randn(k, k, dtype=DT, generator=g))[0]
    QG = torch.linalg.qr(torch.randn(o, o, dtype=DT, generator=g))[0]
    if view == "strided":
        dA, dG = torch.rand(2 * k, dtype=DT, generator=g)[::2], torch.rand(3 * o, dtype=DT, generator=g)[::3]
    else:
        dA, dG = torch.tensor(0.7, dtype=DT).expand(k), torch.tensor(1.3, dtype=DT).expand(o)
    expect = ng.reference.precondition([M], [QA], [dA.contiguous()], [QG], [dG.contiguous()], 0.01)[0]
    got = ng.ops.precondition([M], [QA], [dA], [QG], [dG], 0.01, impl=impl)[0]
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ones", [False, True])
def test_factor_update_of_a_factor_with_itself_as_input(impl, ones):
    """F <- 0.5 F + 2 F~^T F~ with the input aliasing the factor (or a view of it)."""
    g = torch.Generator().manual_seed(0)
    F0 = torch.randn(6, 6, dtype=DT, generator=g)
    F0 = F0 @ F0.T
    dim = 6
    expect = F0.clone() if not ones else torch.zeros(dim + 1, dim + 1, dtype=DT)
    X = F0.clone() if not ones else F0.clone()
    if not ones:
        ng.reference.factor_update_([expect], [X], 0.5, [2.0], [False])
        F = F0.clone()
        ng.ops.factor_update_([F], [F], 0.5, [2.0], [False], impl=impl)
    else:  # the factor is 7 x 7 and its input a 7 x 6 view of it
        big = torch.randn(7, 7, dtype=DT, generator=g)
        big = big @ big.T
        expect = big.clone()
        ng.reference.factor_update_([expect], [big[:, :6].clone()], 0.5, [2.0], [True])
        F = big.clone()
        ng.ops.factor_update_([F], [F[:, :6]], 0.5, [2.0], [True], impl=impl)
    torch.testing.assert_close(F, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
def test_factor_update_with_two_factors_sharing_memory_is_refused(impl):
    F = torch.zeros(8, 4, dtype=DT)
    X = torch.randn(3, 4, dtype=DT)
    with pytest.raises(RuntimeError, match="share memory"):
        ng.ops.factor_update_([F[:4], F[:4]], [X, X], 0.0, [1.0, 1.0], [False, False], impl=impl)


def op_calls(requires_grad_arg):
    """One call of each op with the named argument requiring grad."""
    g = torch.Generator().manual_seed(0)
    F_ = torch.eye(4, dtype=DT)
    X = torch.randn(3, 4, dtype=DT, generator=g)
    M = torch.randn(2, 4, dtype=DT, generator=g)
    e4, e2 = torch.eye(4, dtype=DT), torch.eye(2, dtype=DT)
    d4, d2 = torch.ones(4, dtype=DT), torch.ones(2, dtype=DT)
    p, buf = torch.randn(2, 4, dtype=DT, generator=g), torch.zeros(2, 4, dtype=DT)

    def rg(name, t):
        return t.clone().requires_grad_() if name == requires_grad_arg else t

    return {
        "factor_update_": lambda impl: ng.ops.factor_update_([rg("factors", F_)], [rg("inputs", X)], 0.5, [1.0],
                                                             [False], impl=impl),
        "eigh_batched": lambda impl: ng.ops.eigh_batched([rg("mats", F_)], impl=impl),
        "precondition": lambda impl: ng.ops.precondition([rg("grads", M)], [rg("QA", e4)], [d4], [e2], [d2], 0.1,
                                                         impl=impl),
        "kfac_update_": lambda impl: ng.ops.kfac_update_([rg("params", p)], [M], [M], [buf], [True], 0.1, 0.5,
                                                         0.0, 0.0, impl=impl),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op,arg", [("factor_update_", "factors"), ("factor_update_", "inputs"),
                                    ("eigh_batched", "mats"), ("precondition", "grads"), ("precondition", "QA"),
                                    ("kfac_update_", "params")])
def test_op_on_tensors_that_require_grad_is_refused(impl, op, arg):
    call = op_calls(arg)[op]
    with pytest.raises(ValueError, match=f"{arg}\\[0\\] requires grad.*no derivative"):
        call(impl)
    with torch.no_grad():  # what the optimizer does: fine
        call(impl)


@pytest.mark.parametrize("ns", ["natgrad", "natgrad_emu"])
def test_calling_the_registered_op_directly_on_tensors_that_require_grad_is_refused(ns):
    """torch.ops.natgrad.* bypass the Python checks: the dispatcher's Autograd entry refuses instead of
    torch's fallback, which differentiated the kernel's internals into a wrong gradient."""
    if not ng._ext.loaded():
        pytest.skip("no compiled extension")
    M = torch.randn(2, 3, dtype=DT, requires_grad=True)
    args = ([torch.eye(3, dtype=DT)], [torch.ones(3, dtype=DT)], [torch.eye(2, dtype=DT)], [torch.ones(2, dtype=DT)])
    op = getattr(torch.ops, ns)
    with pytest.raises(RuntimeError, match="argument 'grads' requires grad.*no derivative"):
        op.precondition([M], *args, 0.5, False)
    F_ = torch.eye(3, dtype=DT, requires_grad=True)
    with pytest.raises(RuntimeError, match="argument 'factors' requires grad"):
        op.factor_update_([F_], [torch.randn(2, 3, dtype=DT)], 0.5, [1.0], [False])
    assert torch.equal(F_, torch.eye(3, dtype=DT))
    with torch.no_grad():
        out = op.precondition([M], *args, 0.5, False)[0]
    torch.testing.assert_close(out, M.detach() / 1.5)


@pytest.mark.parametrize("call,name,error", [
    (lambda: ng.ops.factor_update_([torch.eye(2)], [torch.ones(1, 2)], -0.5, [1.0], [False]), "decay", ValueError),
    (lambda: ng.ops.factor_update_([torch.eye(2)], [torch.ones(1, 2)], 1.5, [1.0], [False]), "decay", ValueError),
    (lambda: ng.ops.factor_update_([torch.eye(2)], [torch.ones(1, 2)], 0.5, [-1.0], [False]), "scales", ValueError),
    (lambda: ng.ops.factor_update_([torch.eye(2)], [torch.ones(1, 2)], "0.5", [1.0], [False]), "decay", TypeError),
    (lambda: ng.ops.factor_update_([torch.eye(2)], [torch.ones(1, 2)], 0.5, [1.0], ["no"]), "append_ones",
     TypeError),
    (lambda: ng.ops.precondition([torch.ones(1, 1)], [torch.eye(1)], [torch.ones(1)], [torch.eye(1)],
                                 [torch.ones(1)], "0.01"), "damping", TypeError),
    (lambda: ng.ops.precondition([torch.ones(1, 1)], [torch.eye(1)], [torch.ones(1)], [torch.eye(1)],
                                 [torch.ones(1)], float("nan")), "damping", ValueError),
    (lambda: ng.ops.kfac_update_([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [True], 0.1,
                                 5.0, 0.0, 0.0), "momentum", ValueError),
    (lambda: ng.ops.kfac_update_([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [True], -0.1,
                                 0.5, 0.0, 0.0), "lr", ValueError),
    (lambda: ng.ops.kfac_update_([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [True], 0.1,
                                 0.5, -1.0, 0.0), "weight_decay", ValueError),
    (lambda: ng.ops.kfac_update_([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [True], 0.1,
                                 0.5, 0.0, -1.0), "kl_clip", ValueError),
])
def test_op_scalars_out_of_range_or_of_the_wrong_kind_are_refused(call, name, error):
    with pytest.raises(error, match=name):
        call()


def test_op_scalars_may_be_numpy_or_0d_tensors():
    F1, F2 = torch.eye(3), torch.eye(3)
    X = torch.randn(4, 3)
    ng.ops.factor_update_([F1], [X], 0.5, [0.25], [False])
    ng.ops.factor_update_([F2], [X], np.float32(0.5), [torch.tensor(0.25)], [np.bool_(False).item()])
    torch.testing.assert_close(F1, F2)


# ---- 9. clearer errors, and what torch.optim accepts ------------------------------------------------------


def test_freezing_a_layer_after_building_the_optimizer_is_refused_clearly():
    model = mlp()
    opt = kfac(model)
    model[0].weight.requires_grad_(False)
    x, y = batch()
    out = model(x)
    with pytest.raises(ValueError, match="layer '0' was frozen after the optimizer was built"):
        opt.backward(F.cross_entropy(out, y), out)


def test_curvature_kfac_of_data_with_nan_is_refused():
    model = mlp()
    x, y = batch()
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        ng.curvature.kfac(model, nn.CrossEntropyLoss(), (x, y), fisher_type="type-2")


def test_conv_patches_take_int_kernels_like_torch():
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    a, b = ng.ops.ConvPatches(x, 3, stride=2, padding=1), ng.ops.ConvPatches(x, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
    assert a == b or (a.kernel, a.stride, a.dilation, a.padding) == (b.kernel, b.stride, b.dilation, b.padding)
    torch.testing.assert_close(a.unfold(), b.unfold())
    with pytest.raises(TypeError, match="kernel"):
        ng.ops.ConvPatches(x, "3")
    with pytest.raises(ValueError, match="kernel"):
        ng.ops.ConvPatches(x, (3, 0))


@pytest.mark.parametrize("lr", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25)])
def test_numpy_and_0d_tensor_hyperparameters_are_accepted(lr):
    a, b = mlp(), mlp()
    train(a, kfac(a, lr=lr, damping=np.float32(0.125)), BATCHES[:2])
    train(b, kfac(b, lr=0.25, damping=0.125), BATCHES[:2])
    assert torch.equal(flat(a.parameters()), flat(b.parameters()))


@pytest.mark.parametrize("loss,fn", [("mse", F.mse_loss), ("bce", F.binary_cross_entropy_with_logits)])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_one_dimensional_outputs_for_mse_and_bce_equal_a_column(loss, fn, fisher_type):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 5, dtype=DT, generator=g)
    y = torch.rand(12, dtype=DT, generator=g).round() if loss == "bce" else torch.randn(12, dtype=DT, generator=g)
    # a model whose forward itself returns (B,)
    squeezed = nn.Sequential(mlp(out=1), nn.Flatten(0))
    opt_s = kfac(squeezed, loss=loss, fisher_type=fisher_type)
    ref = mlp(out=1)
    opt_r = kfac(ref, loss=loss, fisher_type=fisher_type)
    for _ in range(3):
        opt_s.zero_grad()
        out = squeezed(x)
        assert out.shape == (12,)
        opt_s.backward(fn(out, y), out)
        opt_s.step()
        opt_r.zero_grad()
        out = ref(x)
        opt_r.backward(fn(out, y[:, None]), out)
        opt_r.step()
    torch.testing.assert_close(flat(squeezed.parameters()), flat(ref.parameters()), rtol=1e-10, atol=1e-12)
    K1 = ng.curvature.kfac(squeezed, {"mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss](), (x, y),
                           fisher_type="type-2").dense()
    K2 = ng.curvature.kfac(ref, {"mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss](), (x, y[:, None]),
                           fisher_type="type-2").dense()
    torch.testing.assert_close(K1, K2, rtol=1e-12, atol=1e-14)
    loss_fn = {"mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss]()
    torch.testing.assert_close(ng.curvature.ggn(squeezed, loss_fn, (x, y)), ng.curvature.ggn(ref, loss_fn, (x, y[:, None])),
                               rtol=1e-12, atol=1e-14)


# ---- more of the same kind --------------------------------------------------------------------------------


def test_calling_a_layer_outside_the_models_forward_warns():
    model = mlp()
    opt = kfac(model, fisher_type="empirical")
    x, y = batch()
    opt.zero_grad()
    h = model[1](model[0](x))  # the model's layers, called one by one: the optimizer never sees a forward
    F.cross_entropy(model[2](h), y).backward()
    with pytest.warns(RuntimeWarning, match="outside a forward of the model"):
        opt.step()


def test_adaptive_step_with_a_monitoring_forward_equals_the_clean_run():
    clean, noisy = mlp(), mlp()
    opt_a, opt_b = kfac(clean, adaptive_step=True), kfac(noisy, adaptive_step=True)
    train(clean, opt_a, BATCHES)
    train(noisy, opt_b, BATCHES, extra=lambda m: m(torch.randn(40, 5, dtype=DT)))
    assert torch.equal(flat(clean.parameters()), flat(noisy.parameters()))


def test_model_returning_a_tuple_trains_like_the_plain_model():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            out = self.net(x)
            return out, out.pow(2).mean()

    wrapped, plain = WithAux(), mlp()
    opt_w, opt_p = kfac(wrapped), kfac(plain)
    for x, y in BATCHES:
        opt_w.zero_grad()
        logits, aux = wrapped(x)
        opt_w.backward(F.cross_entropy(logits, y), logits)
        opt_w.step()
    train(plain, opt_p, BATCHES)
    assert torch.equal(flat(wrapped.parameters()), flat(plain.parameters()))


def test_a_dropped_optimizer_stops_recording():
    """A model whose first optimizer was replaced (rebinding ``opt`` in a notebook) trains like a
    fresh model under the second: the first one's hooks go inert once it is collected."""
    import gc

    model, reference = mlp(), mlp()
    first = kfac(model)
    del first
    gc.collect()
    opt, opt_ref = kfac(model), kfac(reference)
    train(model, opt, BATCHES)
    train(reference, opt_ref, BATCHES)
    assert torch.equal(flat(model.parameters()), flat(reference.parameters()))


def test_sparse_embedding_gradients_are_refused_clearly():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 5, sparse=True), nn.Linear(5, 3)

        def forward(self, i):
            return self.fc(self.emb(i))

    model = Tagger().to(DT)
    with pytest.warns(UserWarning, match="does not cover emb"):
        opt = kfac(model)
    i, y = torch.randint(0, 10, (8,)), torch.randint(0, 3, (8,))
    out = model(i)
    opt.backward(F.cross_entropy(out, y), out)
    params = flat(model.parameters()).clone()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()
    assert torch.equal(flat(model.parameters()), params) and opt.steps == 0


def test_a_non_contiguous_parameter_trains_like_a_contiguous_one():
    strided, plain = mlp(), mlp()
    with torch.no_grad():  # the same values, stored transposed
        strided[2].weight = nn.Parameter(plain[2].weight.detach().t().contiguous().t())
    assert not strided[2].weight.is_contiguous()
    for adaptive in (False, True):
        a, b = copy.deepcopy(strided), copy.deepcopy(plain)
        train(a, kfac(a, adaptive_step=adaptive), BATCHES)
        train(b, kfac(b, adaptive_step=adaptive), BATCHES)
        # the transposed layout changes the GEMMs' summation order: rounding, amplified over four steps
        torch.testing.assert_close(flat(a.parameters()), flat(b.parameters()), rtol=1e-8, atol=1e-10)


# ---- sequence outputs: the layout the loss reads ---------------------------------------------------------


class TinyLM(nn.Module):
    """(B, T, 5) -> (B, T, 4) logits; ``layout`` says how the forward returns them."""

    def __init__(self, layout="btv"):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.layout = nn.Linear(5, 7), nn.Linear(7, 4), layout

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return {"btv": out, "bvt": out.transpose(1, 2), "flat": out.reshape(-1, out.shape[-1])}[self.layout]


def seq_batches(n=3, B=4, T=6):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(B, T, 5, dtype=DT, generator=g), torch.randint(0, 4, (B, T), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("layout", ["btv", "bvt"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_sequence_logits_train_like_the_flattened_batch(layout, fisher_type):
    """(B, T, V) logits with the loss on their (B*T, V) view, or torch's (B, V, T) layout: the
    factors and steps of the flattened batch of B*T tokens (a cross-entropy layout that used to be
    misread, G off by several times)."""
    seq = TinyLM(layout).to(DT)
    flat_model = nn.Sequential(copy.deepcopy(seq.fc1), nn.Tanh(), copy.deepcopy(seq.fc2))
    opt_s, opt_f = kfac(seq, fisher_type=fisher_type), kfac(flat_model, fisher_type=fisher_type)
    for x, y in seq_batches():
        opt_s.zero_grad()
        out = seq(x)
        loss = F.cross_entropy(out.reshape(-1, 4), y.reshape(-1)) if layout == "btv" else F.cross_entropy(out, y)
        opt_s.backward(loss, out)
        opt_s.step()
        train(flat_model, opt_f, [(x.reshape(-1, 5), y.reshape(-1))])
    s_layers, f_layers = opt_s.state_dict()["kfac"]["layers"], opt_f.state_dict()["kfac"]["layers"]
    for a, b in (("fc1", "0"), ("fc2", "2")):
        for key in ("A", "G"):
            torch.testing.assert_close(s_layers[a][key], f_layers[b][key], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(flat(seq.parameters()), flat(flat_model.parameters()), rtol=1e-9, atol=1e-12)


def test_model_returning_the_flattened_view_of_sequence_logits_is_refused():
    model = TinyLM("flat").to(DT)
    opt = kfac(model)
    x, y = seq_batches(1)[0]
    out = model(x)
    with pytest.raises(ValueError, match="folded into the batch"):
        opt.backward(F.cross_entropy(out, y.reshape(-1)), out)


def test_cross_entropy_layout_that_cannot_be_told_is_refused():
    model = TinyLM("btv").to(DT)
    opt = kfac(model)
    x, _ = seq_batches(1)[0]
    out = model(x)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="cannot tell which dimension holds the classes"):
        opt.backward(out.square().mean(), out)  # declared cross_entropy, but not one
    assert_unchanged(before, model, opt)


# ---- layers K-FAC lists but never sees ---------------------------------------------------------------------


def test_multihead_attention_out_proj_gets_factors_not_silently_none():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attn().to(DT)
    x, y = torch.randn(4, 5, 8, dtype=DT), torch.randint(0, 3, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the attention's projections are covered and recorded
        opt = kfac(model)
        train(model, opt, [(x, y)])
    assert [layer.name for layer in opt._engine.layers] == ["attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                            "attn.out_proj", "head"]
    assert all("QG" in opt._engine.state[layer.name] for layer in opt._engine.layers)
    # an attention K-FAC cannot cover is named, with its out_proj, at construction
    model.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True).to(DT)
    with pytest.warns(UserWarning, match=r"attn\.out_proj .*applied functionally by the nn\.MultiheadAttention"):
        kfac(model)


def test_a_layer_whose_weight_is_used_functionally_warns_that_it_gets_no_factors():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.skip = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x) + F.linear(x, self.skip.weight, self.skip.bias)  # self.skip never runs as a module

    model = Functional().to(DT)
    opt = kfac(model)
    with pytest.warns(RuntimeWarning, match="layer 'skip' has a gradient but did not run as a module"):
        train(model, opt, BATCHES[:1])


@pytest.mark.parametrize("order", ["compile_then_build", "build_then_compile"])
def test_a_compiled_model_is_refused_clearly_instead_of_getting_no_curvature(order):
    model = mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="does not support torch.compile'd models"):
        if order == "compile_then_build":
            kfac(torch.compile(model))
        else:
            opt = kfac(model)
            compiled = torch.compile(model)
            out = compiled(x)
            opt.backward(F.cross_entropy(out, y), out)


def test_a_skipped_first_step_leaves_the_optimizer_state_as_it_was():
    model = half_model()
    opt = kfac(model, damping=1e-9, kl_clip=None, lr=1e-3, momentum=0.9)
    before = snapshot(model, opt)
    fp16_backward(model, opt, 1e-2, 100)
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert opt.step() is False
    params, _, sd = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], params))
    state = opt.state_dict()
    assert state["state"] == {} and all(not st for st in state["kfac"]["layers"].values())  # no momentum buffers made


# ---- the reduction the loss really uses ------------------------------------------------------------------


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_a_sum_over_features_with_a_mean_over_the_batch_is_expressible(fisher_type):
    """((out - y) ** 2).sum(1).mean(), neither torch's "mean" nor "sum": reduction="batchmean" gives
    the K-FAC of the summed loss divided by the batch size, and the exact GGN likewise."""
    model = mlp()
    g_ = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 5, dtype=DT, generator=g_), torch.randn(12, 3, dtype=DT, generator=g_)
    K = ng.curvature.kfac(model, nn.MSELoss(reduction="sum"), (x, y), fisher_type=fisher_type,
                          separate_weight_and_bias=False).dense()
    Gx = ng.curvature.ggn(model, nn.MSELoss(reduction="sum"), (x, y)) / 12
    K = K / 12  # Z = N: the curvature of the summed loss over the batch size (GGN and empirical Fisher alike)
    opt = kfac(model, loss="mse", reduction="batchmean", fisher_type=fisher_type, lr=0.5, momentum=0.0,
               kl_clip=None, damping=0.1, backend="reference")
    opt._engine.keep_inputs = True  # for the GGN products below, as the adaptive step keeps them
    opt.zero_grad()
    out = model(x)
    opt.backward(((out - y) ** 2).sum(1).mean(), out)
    g = flat(p.grad for p in model.parameters())
    before = flat(model.parameters())
    v = [torch.randn_like(p) for p in model.parameters()]
    gram = opt._engine.ggn_gram(list(model.parameters()), [v])
    opt.step()
    expect = -0.5 * torch.linalg.solve(K + 0.1 * torch.eye(len(g), dtype=DT), g)
    torch.testing.assert_close(flat(model.parameters()) - before, expect, rtol=1e-9, atol=1e-12)
    vf = flat(v)
    torch.testing.assert_close(gram[0, 0], vf @ Gx @ vf, rtol=1e-10, atol=1e-12)
