"""NGD: exact (and layer-wise exact) natural-gradient steps against the dense float64 oracle
(the GGN or empirical Fisher of curvature.ggn / empirical_fisher, solved densely)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad_cuda as ng
from natgrad_cuda import ngd as ngd_module

LOSSES = {"mse": nn.MSELoss, "cross_entropy": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}


def _loss(name, out, y, reduction="mean"):
    return LOSSES[name](reduction=reduction)(out, y)


def _targets(name, out_shape, gen):
    if name == "cross_entropy":
        return torch.randint(0, out_shape[1], (out_shape[0], *out_shape[2:]), generator=gen)
    if name == "bce":
        return torch.rand(out_shape, generator=gen, dtype=torch.float64).round()
    return torch.randn(out_shape, generator=gen, dtype=torch.float64)


def _mlp(widths, seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def _oracle(model, loss_name, x, y, damping, kind="ggn", blocks="full", reduction="mean"):
    """(F + damping I)^-1 g densely, flattened over model.parameters()."""
    loss_fn = LOSSES[loss_name](reduction=reduction)
    Fm = (ng.curvature.ggn if kind == "ggn" else ng.curvature.empirical_fisher)(model, loss_fn, (x, y))
    if blocks == "layer":
        mask = torch.zeros_like(Fm, dtype=torch.bool)
        i = 0
        for block in ngd_module.layer_blocks(model, list(model.parameters())):
            n = sum(p.numel() for p in block)
            mask[i:i + n, i:i + n] = True
            i += n
        Fm = Fm * mask
    model.zero_grad()
    loss_fn(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    return torch.linalg.solve(Fm + damping * torch.eye(len(g), dtype=Fm.dtype), g)


def _ngd_step(model, loss_name, x, y, damping, lr=1.0, reduction="mean", **kw):
    opt = ng.NGD(model, lr=lr, damping=damping, loss=loss_name, reduction=reduction, **kw)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt.zero_grad()
    out = model(x)
    opt.backward(_loss(loss_name, out, y, reduction), out)
    assert opt.step() is True
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return (before - after) / lr


CASES = [
    # (name, model builder, input shape, loss): m < P and m >= P both appear
    ("mlp-mse", lambda: _mlp([5, 7, 3]), (6, 5), "mse"),
    ("mlp-ce", lambda: _mlp([4, 9, 4]), (5, 4), "cross_entropy"),
    ("mlp-bce", lambda: _mlp([3, 6, 2], act=nn.ReLU), (7, 3), "bce"),
    ("tall-mse", lambda: _mlp([2, 3, 2]), (40, 2), "mse"),  # m = 80 >= P = 17
    ("cnn-ce", lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).double(),
     (4, 2, 4, 4), "cross_entropy"),
]


@pytest.mark.parametrize("blocks", ["full", "layer"])
@pytest.mark.parametrize("kind", ["type-2", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_direction_matches_dense_oracle(case, kind, blocks):
    _, build, shape, loss_name = case
    gen = torch.Generator().manual_seed(1)
    model = build()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = _targets(loss_name, model(x).shape, gen)
    damping = 1e-2
    expected = _oracle(model, loss_name, x, y, damping, "ggn" if kind == "type-2" else "ef", blocks)
    got = _ngd_step(model, loss_name, x, y, damping, fisher_type=kind, blocks=blocks)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_reductions(reduction):
    gen = torch.Generator().manual_seed(2)
    model = _mlp([4, 6, 3])
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    Fm = ng.curvature.ggn(model, nn.MSELoss(reduction="sum"), (x, y))
    if reduction == "batchmean":
        Fm = Fm / 5
    out = model(x)
    loss = ((out - y) ** 2).sum() if reduction == "sum" else ((out - y) ** 2).sum(1).mean()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    expected = torch.linalg.solve(Fm + 1e-3 * torch.eye(len(g), dtype=Fm.dtype), g)
    opt = ng.NGD(model, lr=1.0, damping=1e-3, loss="mse", reduction=reduction)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    out = model(x)
    loss = ((out - y) ** 2).sum() if reduction == "sum" else ((out - y) ** 2).sum(1).mean()
    opt.backward(loss, out)
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(before - after, expected, rtol=1e-9, atol=1e-11)


def test_small_chunks_change_nothing(monkeypatch):
    """The Gram matrix built a row at a time equals the one built at once."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    ref = _ngd_step(_mlp([5, 8, 4]), "cross_entropy", x, y, 1e-2)
    monkeypatch.setattr(ngd_module, "_CHUNK_ELEMENTS", 1)
    small = _ngd_step(_mlp([5, 8, 4]), "cross_entropy", x, y, 1e-2)
    torch.testing.assert_close(small, ref, rtol=1e-11, atol=1e-13)


def test_batchnorm_in_training_mode_matches_oracle():
    """The curvature of the batch function (batch statistics included), as the gradient's."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    expected = _oracle(model, "mse", x, y, 1e-2)
    got = _ngd_step(model, "mse", x, y, 1e-2)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_momentum_weight_decay_and_kl_clip_follow_sgd():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    model = _mlp([4, 5, 2])
    ref = _mlp([4, 5, 2])
    lr, mom, wd, kl = 0.3, 0.9, 1e-2, 1e-3
    opt = ng.NGD(model, lr=lr, damping=1e-2, loss="mse", momentum=mom, weight_decay=wd, kl_clip=kl)
    buf = None
    for _ in range(3):
        d = _oracle(ref, "mse", x, y, 1e-2)
        ref.zero_grad()
        F.mse_loss(ref(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
        nu = min(1.0, (kl / (lr ** 2 * float(d @ g))) ** 0.5)
        theta = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        step = nu * d + wd * theta
        buf = step if buf is None else mom * buf + step
        theta = theta - lr * buf
        torch.nn.utils.vector_to_parameters(theta, ref.parameters())
        opt.zero_grad()
        out = model(x)
        opt.backward(F.mse_loss(out, y), out)
        opt.step()
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(model.parameters()), theta, rtol=1e-9,
                               atol=1e-11)


def test_gradient_at_step_time_is_used():
    """A gradient clipped between backward and step is the one preconditioned."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    model = _mlp([3, 4, 2])
    Fm = ng.curvature.ggn(model, nn.MSELoss(), (x, y))
    opt = ng.NGD(model, lr=1.0, damping=1e-2, loss="mse")
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    out = model(x)
    opt.backward(F.mse_loss(out, y), out)
    for p in model.parameters():
        p.grad.mul_(0.5)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    d = torch.linalg.solve(Fm + 1e-2 * torch.eye(len(g), dtype=Fm.dtype), g)
    torch.testing.assert_close(before - torch.nn.utils.parameters_to_vector(model.parameters()), d, rtol=1e-9,
                               atol=1e-11)


def test_frozen_parameters_are_left_alone():
    gen = torch.Generator().manual_seed(7)
    model = _mlp([3, 4, 2])
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    # the oracle over the trainable parameters: the GGN's rows and columns of the others removed
    Fm = ng.curvature.ggn(model, nn.MSELoss(), (x, y))
    keep = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in model.parameters()])
    Fm = Fm[keep][:, keep]
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.mse_loss(model(x), y), trainable)])
    d = torch.linalg.solve(Fm + 1e-2 * torch.eye(len(g), dtype=Fm.dtype), g)
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainable])
    opt = ng.NGD(model, lr=1.0, damping=1e-2, loss="mse")
    out = model(x)
    opt.backward(F.mse_loss(out, y), out)
    opt.step()
    assert torch.equal(model[0].weight, frozen)
    torch.testing.assert_close(before - torch.cat([p.detach().reshape(-1) for p in trainable]), d, rtol=1e-9,
                               atol=1e-11)


def test_non_finite_gradient_skips_the_step():
    model = _mlp([3, 4, 2])
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    opt = ng.NGD(model, lr=1.0, damping=1e-2, loss="mse")
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    opt.backward(F.mse_loss(out, y), out)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert opt.step() is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.skipped_steps == 1


def test_descends_on_a_regression():
    """lr 1 and small damping: exact NGD fits an over-parameterised regression in a few steps."""
    gen = torch.Generator().manual_seed(8)
    model = _mlp([4, 32, 1])
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 1, generator=gen, dtype=torch.float64)
    opt = ng.NGD(model, lr=1.0, damping=1e-6, loss="mse")
    first = None
    for _ in range(5):
        opt.zero_grad()
        out = model(x)
        loss = F.mse_loss(out, y)
        first = float(loss.detach()) if first is None else first
        opt.backward(loss, out)
        opt.step()
    assert float(F.mse_loss(model(x), y).detach()) < 1e-3 * first


def test_errors_and_refused_calls_change_nothing():
    model = _mlp([3, 4, 2])
    with pytest.raises(ValueError, match="loss="):
        ng.NGD(model, lr=1.0)
    with pytest.raises(ValueError, match="fisher_type"):
        ng.NGD(model, loss="mse", fisher_type="mc")
    with pytest.raises(ValueError, match="blocks"):
        ng.NGD(model, loss="mse", blocks="unit")
    with pytest.raises(ValueError, match="damping"):
        ng.NGD(model, loss="mse", damping=0.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        ng.NGD(model, loss="hinge")
    opt = ng.NGD(model, lr=1.0, loss="mse")
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="opt.backward"):
        opt.step()
    out = model(x)
    with pytest.raises(ValueError, match="not the tensor"):
        opt.backward(F.mse_loss(out[:, :1].expand(4, 2), y), out[:, :1].expand(4, 2))
    other = _mlp([3, 4, 2])(x)
    with pytest.raises(ValueError, match="not the tensor"):
        opt.backward(F.mse_loss(other, y), other)
    assert all(p.grad is None for p in model.parameters())
    opt.backward(F.mse_loss(out, y), out)
    out2 = model(x)
    with pytest.raises(ValueError, match="one batch per step"):
        opt.backward(F.mse_loss(out2, y), out2)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: F.mse_loss(model(x), y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.step() is True
    with pytest.raises(TypeError, match="cannot be copied"):
        import copy
        copy.deepcopy(opt)


def test_model_copy_and_dropped_optimizer():
    import copy
    import gc
    import weakref

    model = _mlp([3, 4, 2])
    opt = ng.NGD(model, lr=1.0, loss="mse")
    twin = copy.deepcopy(model)  # its hook does nothing
    twin(torch.randn(2, 3, dtype=torch.float64))
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    model(torch.randn(2, 3, dtype=torch.float64))


def test_sequence_cross_entropy_layouts():
    """(B, C, T) outputs (torch's layout) match the oracle; (B, T, V) logits with the loss on the
    (B*T, V) view give the direction of the same model returning (B, V, T)."""
    torch.manual_seed(9)
    lin = nn.Linear(3, 4).double()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 5), generator=gen)

    class ClassesSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = copy_lin()

        def forward(self, x):
            return self.lin(x).transpose(1, 2)

    class ClassesLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = copy_lin()

        def forward(self, x):
            return self.lin(x)

    def copy_lin():
        new = nn.Linear(3, 4).double()
        new.load_state_dict(lin.state_dict())
        return new

    first = ClassesSecond()
    expected = _oracle(first, "cross_entropy", x, y, 1e-2)
    got = _ngd_step(first, "cross_entropy", x, y, 1e-2)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)

    last = ClassesLast()
    opt = ng.NGD(last, lr=1.0, damping=1e-2, loss="cross_entropy")
    before = torch.nn.utils.parameters_to_vector(last.parameters()).detach().clone()
    out = last(x)
    opt.backward(F.cross_entropy(out.reshape(-1, 4), y.reshape(-1)), out)
    opt.step()
    torch.testing.assert_close(before - torch.nn.utils.parameters_to_vector(last.parameters()), expected,
                               rtol=1e-9, atol=1e-11)
