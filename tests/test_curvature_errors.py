"""Bad input to natgrad_cuda.curvature raises ValueError naming the argument; unsupported layers warn."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from natgrad_cuda import curvature
from natgrad_cuda.curvature import LossSpec

DT = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def ce_data(batch=4):
    return torch.randn(batch, 3, dtype=DT), torch.randint(0, 2, (batch,))


EXACT = [curvature.ggn, curvature.empirical_fisher]
ALL = [curvature.kfac] + EXACT


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("loss_fn, match", [
    (nn.NLLLoss(), "loss_fn must be"),
    (nn.L1Loss(), "loss_fn must be"),
    (nn.CrossEntropyLoss(reduction="none"), "loss_fn.reduction"),
    (nn.MSELoss(reduction="none"), "loss_fn.reduction"),
    (nn.CrossEntropyLoss(weight=torch.ones(2, dtype=DT)), "loss_fn.*weights"),
    (nn.CrossEntropyLoss(label_smoothing=0.1), "loss_fn.*label_smoothing"),
    (nn.CrossEntropyLoss(ignore_index=0), "loss_fn.*ignore_index"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(2, dtype=DT)), "loss_fn.*pos_weight"),
])
def test_unsupported_loss(fn, loss_fn, match):
    with pytest.raises(ValueError, match=match):
        fn(mlp(), loss_fn, ce_data())


@pytest.mark.parametrize("name, reduction, match", [("hinge", "mean", "loss must be"),
                                                    ("mse", "none", "loss reduction")])
def test_loss_spec_from_bad_name(name, reduction, match):
    with pytest.raises(ValueError, match=match):
        LossSpec.from_name(name, reduction)


@pytest.mark.parametrize("kwargs, match", [
    (dict(fisher_type="type-1"), "fisher_type must be one of"),
    (dict(fisher_type=None), "fisher_type must be one of"),
    (dict(kfac_approx="mean"), "kfac_approx must be one of"),
    (dict(mc_samples=0), "mc_samples must be an int >= 1"),
    (dict(mc_samples=-2), "mc_samples must be an int >= 1"),
    (dict(mc_samples=1.5), "mc_samples must be an int >= 1"),
    (dict(mc_samples=True), "mc_samples must be an int >= 1"),
    (dict(mc_samples="2"), "mc_samples must be an int >= 1"),
    (dict(fisher_type="type-2", mc_samples=0), "mc_samples must be an int >= 1"),
    (dict(separate_weight_and_bias="no"), "separate_weight_and_bias must be a bool"),
    (dict(seed=1.0), "seed must be None or an int"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        curvature.kfac(mlp(), nn.CrossEntropyLoss(), ce_data(), **kwargs)


def empty_generator():
    yield from ()


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("data, match", [
    ([], "data is empty"),
    (lambda: empty_generator(), "data is empty"),
    (lambda: (torch.zeros(0, 3, dtype=DT), torch.zeros(0, dtype=torch.long)), "data is empty"),
    (5, "data must be an"),
    ([ce_data(), (torch.zeros(2, 3, dtype=DT),)], "data: every batch must be"),
    ([[1.0, 2.0]], "data: every batch must be"),
])
def test_bad_data(fn, data, match):
    with pytest.raises(ValueError, match=match):
        fn(mlp(), nn.CrossEntropyLoss(), data() if callable(data) else data)


X4 = torch.randn(4, 3, dtype=DT)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("loss_fn, targets", [
    (nn.CrossEntropyLoss(), torch.randint(0, 2, (3,))),  # wrong batch size
    (nn.CrossEntropyLoss(), torch.randint(0, 2, (4, 1))),  # extra dim
    (nn.CrossEntropyLoss(), torch.rand(4, 3, dtype=DT)),  # probabilities of the wrong shape
    (nn.CrossEntropyLoss(), torch.rand(4, dtype=DT)),  # floats in the shape of indices
    (nn.CrossEntropyLoss(), torch.ones(4, dtype=torch.bool)),
    (nn.MSELoss(), torch.randn(4, dtype=DT)),
    (nn.MSELoss(), torch.randn(4, 2, 1, dtype=DT)),
    (nn.MSELoss(), torch.randint(0, 2, (4, 2))),  # integer regression targets
    (nn.BCEWithLogitsLoss(), torch.rand(4, 3, dtype=DT)),
    (nn.BCEWithLogitsLoss(), torch.randint(0, 2, (4,))),
])
def test_targets_that_do_not_fit_the_outputs(fn, loss_fn, targets):
    with pytest.raises(ValueError, match="targets of shape"):
        fn(mlp(), loss_fn, (X4, targets))


@pytest.mark.parametrize("fn", ALL)
def test_targets_are_checked_in_every_batch(fn):
    with pytest.raises(ValueError, match="targets of shape"):
        fn(mlp(), nn.CrossEntropyLoss(), [ce_data(3), (X4, torch.randint(0, 2, (4, 2)))])


@pytest.mark.parametrize("fn", ALL)
def test_unbatched_outputs(fn):
    # (B,) outputs are a column for MSE and BCE (tests/test_misuse.py), but cross-entropy needs classes
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)).to(DT)
    with pytest.raises(ValueError, match="model outputs must be batched"):
        fn(model, nn.CrossEntropyLoss(), (X4, torch.randint(0, 2, (4,))))


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Tanh()),
    nn.Sequential(nn.PReLU(3)),
    nn.Sequential(nn.Linear(3, 2).requires_grad_(False)),
    nn.Sequential(nn.Conv1d(3, 2, 1, padding_mode="circular"), nn.Flatten()),
])
def test_model_without_supported_layer(model):
    x = torch.randn(4, 3, 1, dtype=DT) if isinstance(model[0], nn.Conv1d) else torch.randn(4, 3, dtype=DT)
    model = model.to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            targets = torch.randn_like(model(x))
        with pytest.raises(ValueError, match="model has no layer K-FAC supports"):
            curvature.kfac(model, nn.MSELoss(), (x, targets))


def test_hooks_are_removed_after_an_error():
    model = mlp()
    with pytest.raises(ValueError, match="targets of shape"):
        curvature.kfac(model, nn.CrossEntropyLoss(), (X4, torch.randint(0, 2, (4, 2))))
    assert all(not m._forward_hooks for m in model.modules())


class WithBareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.fc(x) * self.scale


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3, max_norm=1.0)  # a form K-FAC's embedding rule refuses
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(x + self.emb.weight[:1])


@pytest.mark.parametrize("model, names", [
    (nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2)), ["1 (PReLU)"]),
    (WithEmbedding(), ["emb (Embedding: max_norm"]),
    (WithBareParameter(), ["<root> (WithBareParameter)"]),
    (nn.Sequential(nn.Unflatten(1, (3, 1)), nn.Conv1d(3, 2, 1, padding_mode="reflect"), nn.Flatten(),
                   nn.Linear(2, 2), nn.PReLU(2)), ["1 (Conv1d: padding_mode='reflect'", "4 (PReLU)"]),
])
def test_unsupported_layers_warn_once_naming_them(model, names):
    model = model.to(DT)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = curvature.kfac(model, nn.MSELoss(), (X4, torch.randn(4, 2, dtype=DT)), fisher_type="type-2")
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    assert all(name in messages[0] for name in names), messages
    assert result.dense().shape[0] == sum(p.numel() for p in model.parameters())


def test_supported_models_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curvature.kfac(mlp(), nn.CrossEntropyLoss(), ce_data(), fisher_type="empirical")
