"""Iterate (Polyak) averaging of a K-FAC run with torch's own ``torch.optim.swa_utils.AveragedModel``
(Martens, "New insights and perspectives on the natural gradient method", recommends it for
stochastic second-order methods).

``AveragedModel(model)`` deep-copies the model, hooks included. The optimizer's hooks are
``recording._HookRef`` objects, whose deep copy is an inert hook: the copy is never recorded, so
evaluating it (with or without gradients, in the middle of a step or between steps) feeds nothing to
the optimizer, and building the averaged model before or after the optimizer is the same. These
tests pin that down on float64 models with seeded data: the averages are the expected averages of
the iterates, the K-FAC run is bitwise the one without any averaged model, nothing warns, and
``update_bn`` recomputes a BatchNorm model's statistics for the averaged weights.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

import natgrad_cuda as ng

DT = torch.float64
STEPS = 8


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7)] + ([nn.BatchNorm1d(7)] if bn else []) + [nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers).to(DT)


def batches(n=STEPS, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, dtype=DT, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def kfac(model, **kw):
    # every step a factor step, so that a forward of the copy during a step meets a capturing record
    options = dict(lr=0.1, damping=1e-3, loss="cross_entropy", seed=0, factor_update_freq=1, inv_update_freq=2)
    options.update(kw)
    return ng.KFAC(model, **options)


def train_step(model, opt, x, y, during=None):
    """One K-FAC step; ``during()`` runs between the model's forward and opt.backward."""
    opt.zero_grad()
    out = model(x)
    if during is not None:
        during()
    loss = F.cross_entropy(out, y)
    opt.backward(loss, out)
    assert opt.step()


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def assert_same_run(model_a, opt_a, model_b, opt_b):
    """Parameters, buffers, momentum buffers and every factor and eigendecomposition: bitwise equal."""
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["kfac"]["steps"] == sb["kfac"]["steps"] == STEPS
    for layer, entries in sa["kfac"]["layers"].items():
        for key, t in entries.items():
            assert torch.equal(t, sb["kfac"]["layers"][layer][key]), (layer, key)
    for i, entries in sa["state"].items():
        for key, t in entries.items():
            assert torch.equal(t, sb["state"][i][key]), (i, key)


# ---- (a) the averages are the averages of the K-FAC iterates ------------------------------------------


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_ema_averaged_model_holds_the_exponential_average_of_the_kfac_iterates(decay):
    model = mlp()
    opt = kfac(model)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    expected = None
    for x, y in batches():
        train_step(model, opt, x, y)
        averaged.update_parameters(model)
        iterate = flat(model.parameters()).to(torch.float64)
        # torch's EMA: the first update copies the model, each later one decay * avg + (1 - decay) * iterate
        expected = iterate.clone() if expected is None else decay * expected + (1 - decay) * iterate
    assert int(averaged.n_averaged) == STEPS
    got = flat(averaged.module.parameters())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)
    assert not torch.allclose(got, flat(model.parameters()), atol=1e-6)  # a real average, not the last iterate


def test_uniform_averaged_model_from_a_start_step_holds_the_mean_of_the_later_kfac_iterates():
    model = mlp()
    opt = kfac(model)
    averaged = AveragedModel(model)  # no avg_fn: the running uniform mean
    start = STEPS // 2
    iterates = []
    for t, (x, y) in enumerate(batches()):
        train_step(model, opt, x, y)
        if t >= start:  # AveragedModel has no start step of its own: begin calling update_parameters there
            averaged.update_parameters(model)
            iterates.append(flat(model.parameters()).to(torch.float64))
    assert int(averaged.n_averaged) == STEPS - start == len(iterates)
    got = flat(averaged.module.parameters())
    torch.testing.assert_close(got, torch.stack(iterates).mean(0), rtol=0, atol=1e-14)
    assert not torch.allclose(got, iterates[-1], atol=1e-6)


# ---- (b), (c) evaluating the averaged model changes nothing in the run, and nothing warns -------------


def _evaluate(averaged, x, y):
    """Every way a user might evaluate the averaged copy: no_grad, with gradients (a backward
    included), train and eval mode."""
    with torch.no_grad():
        averaged(x)
    F.cross_entropy(averaged(x), y).backward()
    averaged.eval()
    averaged(x).sum()
    averaged.train()


@pytest.mark.parametrize("order", ["averaged_model_first", "optimizer_first"])
@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical", "forward-only"])
def test_evaluating_the_averaged_model_leaves_the_kfac_run_bitwise_unchanged(fisher_type, order):
    data = batches()
    reference = mlp()
    opt_ref = kfac(reference, fisher_type=fisher_type)
    for x, y in data:
        train_step(reference, opt_ref, x, y)

    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (c): not a single warning on the way
        if order == "averaged_model_first":
            averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
            opt = kfac(model, fisher_type=fisher_type)
        else:
            opt = kfac(model, fisher_type=fisher_type)
            averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        for x, y in data:
            # the copy runs while the model's forward is waiting for opt.backward, and between steps
            train_step(model, opt, x, y, during=lambda: _evaluate(averaged, x, y))
            averaged.update_parameters(model)
            _evaluate(averaged, x, y)
    assert_same_run(reference, opt_ref, model, opt)
    assert opt.skipped_steps == 0


def test_averaged_model_built_before_or_after_the_optimizer_holds_the_same_average():
    averages = []
    for first in ("averaged", "optimizer"):
        model = mlp()
        if first == "averaged":
            averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        opt = kfac(model)
        if first == "optimizer":
            averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        for x, y in batches():
            train_step(model, opt, x, y)
            averaged.update_parameters(model)
        averages.append(flat(averaged.module.parameters()))
    assert torch.equal(averages[0], averages[1])


def test_the_averaged_copy_is_not_recorded_and_its_outputs_are_refused_by_opt_backward():
    model = mlp()
    opt = kfac(model)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    (x, y), *_ = batches()
    recorder = opt._engine.recorder
    out = averaged(x)  # with gradients, on a factor-update step
    assert recorder._records == [] and not recorder._stray  # neither a forward of the model nor a stray one
    with pytest.raises(ValueError, match="not the output of a forward of this optimizer's model"):
        opt.backward(F.cross_entropy(out, y), out)
    assert all(p.grad is None for p in model.parameters())
    train_step(model, opt, x, y)  # and the optimizer goes on as usual
    assert opt.steps == 1


def test_preconditioner_run_is_unchanged_by_evaluating_an_averaged_model():
    data = batches()
    runs = []
    for with_average in (False, True):
        model = mlp()
        pre = ng.KFACPreconditioner(model, lr=0.1, loss="cross_entropy", seed=0, factor_update_freq=1)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        averaged = AveragedModel(model) if with_average else None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for x, y in data:
                sgd.zero_grad()
                out = model(x)
                if averaged is not None:
                    _evaluate(averaged, x, y)
                pre.backward(F.cross_entropy(out, y), out)
                assert pre.step()
                sgd.step()
                if averaged is not None:
                    averaged.update_parameters(model)
                    _evaluate(averaged, x, y)
        runs.append(flat(model.parameters()))
    assert torch.equal(runs[0], runs[1])


def test_a_new_kfac_on_the_averaged_copy_trains_it_and_leaves_the_first_run_alone():
    """Fine-tuning from the average: the copy's inert hooks do not stand in the way of its own optimizer."""
    data = batches()
    reference = mlp()
    opt_ref = kfac(reference)
    model = mlp()
    opt = kfac(model)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in data[:4]:
            train_step(reference, opt_ref, x, y)
            train_step(model, opt, x, y)
            averaged.update_parameters(model)
        start = flat(averaged.module.parameters())
        opt_avg = kfac(averaged.module)
        for x, y in data[4:]:
            train_step(reference, opt_ref, x, y)
            train_step(model, opt, x, y)
            train_step(averaged.module, opt_avg, x, y)
    assert opt_avg.steps == STEPS - 4
    assert not torch.equal(flat(averaged.module.parameters()), start)
    assert set(opt_avg.state_dict()["kfac"]["layers"]) == {"0", "2"}
    assert torch.equal(flat(model.parameters()), flat(reference.parameters()))


# ---- BatchNorm: update_bn -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ema", "uniform"])
def test_update_bn_gives_the_averaged_batchnorm_model_its_own_statistics_and_leaves_the_run_alone(kind):
    data = batches()
    reference = mlp(bn=True)
    opt_ref = kfac(reference)
    for x, y in data:
        train_step(reference, opt_ref, x, y)

    model = mlp(bn=True)
    opt = kfac(model)
    averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if kind == "ema" else
                AveragedModel(model))
    loader = [(x, y) for x, y in data]  # update_bn takes the first entry of each batch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t, (x, y) in enumerate(data):
            train_step(model, opt, x, y)
            averaged.update_parameters(model)
            if t == STEPS // 2:  # recomputing the statistics mid-run: of the copy only, under no_grad
                update_bn(loader, averaged)
        model_buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        update_bn(loader, averaged)
    assert [str(w.message) for w in caught] == []
    assert_same_run(reference, opt_ref, model, opt)
    for k, v in model.state_dict().items():  # the model's own statistics are not touched
        if "running" in k:
            assert torch.equal(v, model_buffers[k]), k

    # update_bn (momentum None) leaves the mean over batches of each batch's mean and unbiased
    # variance of the BatchNorm's input, computed with the averaged weights
    with torch.no_grad():
        hidden = [averaged.module[0](x) for x, _ in data]
    bn = averaged.module[1]
    torch.testing.assert_close(bn.running_mean, torch.stack([h.mean(0) for h in hidden]).mean(0), rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(bn.running_var, torch.stack([h.var(0) for h in hidden]).mean(0), rtol=1e-12,
                               atol=1e-14)
    assert not torch.allclose(bn.running_mean, model.state_dict()["1.running_mean"])


def test_update_bn_on_the_trained_model_itself_is_not_recorded():
    """update_bn runs under no_grad: it may be called on the model K-FAC trains without feeding the factors."""
    data = batches()
    runs = []
    for call in (False, True):
        model = mlp(bn=True)
        opt = kfac(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for x, y in data:
                train_step(model, opt, x, y)
                if call:  # between steps (the forward's graph holds the statistics it read)
                    stats = {k: v.clone() for k, v in model.state_dict().items()}
                    update_bn([x], model)
                    assert not torch.equal(model.state_dict()["1.running_mean"], stats["1.running_mean"])
                    model.load_state_dict(stats)  # the statistics put back: the rest is compared bitwise
        runs.append((model, opt))
    assert_same_run(*runs[0], *runs[1])
