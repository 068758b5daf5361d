"""natgrad_cuda.curvature against curvlinops 3.0.1 (the oracle; docs/curvature.md) and against itself.

float64 throughout; "relative error" is ||ours - theirs||_F / ||theirs||_F.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch
from curvlinops import EFLinearOperator, GGNLinearOperator, KFACLinearOperator
from torch import nn

import natgrad_cuda.ops
from natgrad_cuda import _ext, curvature
from natgrad_cuda.curvature import LossSpec
from natgrad_cuda.curvature._layers import input_rows

DT = torch.float64
TOL = 1e-10
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
ARCHS = ("mlp", "seq", "cnn", "conv1d", "convhead")
BATCHINGS = ((1,), (3,), (4,), (5,), (2, 3), (1, 4, 2))


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    scale = theirs.norm()
    if scale == 0:  # e.g. a G behind ReLUs that are all off for a single data point
        return ours.norm().item()
    return ((ours - theirs).norm() / scale).item()


class Transpose(nn.Module):
    """(B, T, C) -> (B, C, T), so that CrossEntropy reads a sequence model's classes."""

    def forward(self, x):
        return x.transpose(1, 2)


# ---- generated models and data ----------------------------------------------------------------------


def build_model(arch: str, rng: random.Random, loss: str) -> Tuple[nn.Module, Tuple[int, ...]]:
    """A small random float64 model of kind ``arch`` and its input shape without the batch dim."""
    act = lambda: rng.choice([nn.Tanh(), nn.ReLU()])  # noqa: E731
    classes = rng.randint(2, 4)
    if arch == "mlp":
        dims = [rng.randint(3, 6) for _ in range(rng.randint(1, 3))] + [classes]
        layers = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers += [nn.Linear(a, b, bias=rng.random() < 0.7)] + ([act()] if i < len(dims) - 2 else [])
        model, in_shape = nn.Sequential(*layers), (dims[0],)
    elif arch == "seq":  # Linear with weight sharing over 1 or 2 middle dims
        d, h = rng.randint(2, 5), rng.randint(2, 5)
        shared = tuple(rng.randint(2, 3) for _ in range(rng.randint(1, 2)))
        layers = [nn.Linear(d, h, bias=rng.random() < 0.7), act(), nn.Linear(h, classes)]
        if loss == "ce":
            shared = shared[:1]
            layers.append(Transpose())
        model, in_shape = nn.Sequential(*layers), (*shared, d)
    elif arch in ("cnn", "conv1d"):
        groups = rng.choice([1, 1, 2, "depthwise"])
        if groups == "depthwise":  # one group per input channel, 1 or 2 filters each
            groups = rng.randint(2, 3)
            c_in, c_out = groups, groups * rng.randint(1, 2)
        else:
            c_in, c_out = 2 * groups, 2 * groups + (groups if rng.random() < 0.5 else 0)
        size = rng.randint(5, 7)
        dims = 2 if arch == "cnn" else 1
        kernel = tuple(rng.randint(1, 3) for _ in range(dims))
        stride = tuple(rng.randint(1, 2) for _ in range(dims))
        dilation = tuple(rng.randint(1, 2) for _ in range(dims))
        padding = rng.choice([0, 1, tuple(rng.randint(0, 1) for _ in range(dims)), "same", "valid"])
        if padding == "same":  # torch needs stride 1; odd kernels pad symmetrically as curvlinops needs
            stride, kernel = (1,) * dims, tuple(k | 1 for k in kernel)
        conv = (nn.Conv2d if dims == 2 else nn.Conv1d)(
            c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=rng.random() < 0.7,
        )
        in_shape = (c_in,) + (size,) * dims
        flat = conv(torch.zeros(1, *in_shape)).numel()
        model = nn.Sequential(conv, act(), nn.Flatten(), nn.Linear(flat, classes))
    elif arch == "convhead":  # (B, C, H, W) outputs: CE over channels, MSE / BCE over W
        h = rng.randint(2, 3)
        k = rng.choice([1, 3])
        model = nn.Sequential(
            nn.Conv2d(2, h, 3, padding=1, bias=rng.random() < 0.7), act(),
            nn.Conv2d(h, classes, k, padding=k // 2),
        )
        in_shape = (2, rng.randint(3, 4), rng.randint(3, 4))
    else:
        raise AssertionError(arch)
    return model.to(DT), in_shape


def make_targets(loss: str, out: torch.Tensor) -> torch.Tensor:
    if loss == "ce":
        return torch.randint(0, out.shape[1], out.shape[:1] + out.shape[2:])
    if loss == "mse":
        return torch.randn_like(out)
    return torch.rand_like(out).round()  # curvlinops' type-2 BCE wants binary targets


def make_data(model: nn.Module, in_shape, loss: str, batch_sizes):
    batches = []
    for b in batch_sizes:
        x = torch.randn(b, *in_shape, dtype=DT)
        with torch.no_grad():
            batches.append((x, make_targets(loss, model(x))))
    return batches


def conv2d_twin(model: nn.Module) -> nn.Module:
    """The same network with every Conv1d as a Conv2d of kernel height 1 (inputs get H = 1)."""
    twin = nn.Sequential()
    for name, m in model.named_children():
        if isinstance(m, nn.Conv1d):
            c = nn.Conv2d(m.in_channels, m.out_channels, (1, *m.kernel_size), stride=(1, *m.stride),
                          padding=m.padding if isinstance(m.padding, str) else (0, *m.padding),
                          dilation=(1, *m.dilation), groups=m.groups, bias=m.bias is not None).to(DT)
            with torch.no_grad():
                c.weight.copy_(m.weight.unsqueeze(2))
                if m.bias is not None:
                    c.bias.copy_(m.bias)
            m = c
        twin.add_module(name, m)
    return twin


def curvlinops_kfac(model, loss_fn, data, params=None, **kwargs) -> Tuple[dict, dict, torch.Tensor]:
    """curvlinops' A, G and dense matrix (over ``params``, default all)."""
    params = list(model.parameters()) if params is None else params
    op = KFACLinearOperator(model, loss_fn, params, data, check_deterministic=False, **kwargs)
    dense = op @ torch.eye(sum(p.numel() for p in params), dtype=DT)
    state = op.state_dict()
    return state["input_covariances"], state["gradient_covariances"], dense


def parameter_indices(model: nn.Module, params) -> torch.Tensor:
    """Positions of ``params``' entries in the flattened model.parameters()."""
    chosen, start = [], 0
    for p in model.parameters():
        if any(p is q for q in params):
            chosen.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    return torch.cat(chosen)


def layer_block_mask(model: nn.Module) -> torch.Tensor:
    """True on every Linear layer's (weight and bias) x (weight and bias) block."""
    size = sum(p.numel() for p in model.parameters())
    mask = torch.zeros(size, size, dtype=torch.bool)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            index = parameter_indices(model, list(m.parameters()))
            mask[index.unsqueeze(1), index] = True
    return mask


def dense_of(op_cls, model, loss_fn, data) -> torch.Tensor:
    params = list(model.parameters())
    op = op_cls(model, loss_fn, params, data, check_deterministic=False)
    return op @ torch.eye(sum(p.numel() for p in params), dtype=DT)


# ---- 1. K-FAC against curvlinops over generated cases -------------------------------------------------


@dataclass(frozen=True)
class Case:
    arch: str
    loss: str
    fisher_type: str
    reduction: str
    kfac_approx: str
    separate: bool
    batch_sizes: Tuple[int, ...]
    seed: int

    def __str__(self):
        sizes = "+".join(map(str, self.batch_sizes))
        return (f"{self.arch}-{self.loss}-{self.reduction}-{self.fisher_type}-{self.kfac_approx}-"
                f"{'sep' if self.separate else 'joint'}-B{sizes}-s{self.seed}")


def generate_cases():
    """4 variants of every (architecture, loss, fisher type); the variants cycle through both
    reductions and both approximations, the rest is drawn with a fixed seed."""
    rng = random.Random(1234)
    cases = []
    for arch, loss, fisher_type in itertools.product(ARCHS, LOSSES, curvature.FISHER_TYPES):
        for i in range(4):
            cases.append(Case(arch, loss, fisher_type, ("mean", "sum")[i % 2], ("expand", "reduce")[i // 2],
                              rng.random() < 0.5, rng.choice(BATCHINGS), rng.randrange(10**6)))
    return cases


CASES = generate_cases()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kfac_matches_curvlinops(case: Case):
    torch.manual_seed(case.seed)
    model, in_shape = build_model(case.arch, random.Random(case.seed), case.loss)
    data = make_data(model, in_shape, case.loss, case.batch_sizes)
    loss_fn = LOSSES[case.loss](reduction=case.reduction)
    options = dict(fisher_type=case.fisher_type, kfac_approx=case.kfac_approx,
                   separate_weight_and_bias=case.separate)
    mc_samples = 2 if case.fisher_type == "mc" else 1
    ours = curvature.kfac(model, loss_fn, data, mc_samples=mc_samples, seed=case.seed, **options)

    oracle_model, oracle_data = model, data
    if case.arch == "conv1d":  # curvlinops has no Conv1d: compare with the equivalent Conv2d network
        oracle_model = conv2d_twin(model)
        oracle_data = [(x.unsqueeze(2), y) for x, y in data]
    A, G, dense = curvlinops_kfac(oracle_model, loss_fn, oracle_data, mc_samples=mc_samples, seed=case.seed,
                                  **options)

    assert set(ours.modules) == set(A) == set(G)
    for name in ours.modules:
        assert rel_err(ours.input_covariances[name], A[name]) < TOL, name
        assert rel_err(ours.gradient_covariances[name], G[name]) < TOL, name
    assert rel_err(ours.dense(), dense) < TOL
    assert ours.num_data == sum(case.batch_sizes)
    assert ours.dtype == DT


def test_cases_cover_the_grid():
    """The generated list has every value of every option, batch sizes 1 and odd included."""
    assert len(CASES) >= 200
    for field, values in [("arch", ARCHS), ("loss", LOSSES), ("fisher_type", curvature.FISHER_TYPES),
                          ("reduction", ("mean", "sum")), ("kfac_approx", curvature.KFAC_APPROXES),
                          ("separate", (True, False)), ("batch_sizes", BATCHINGS)]:
        assert {getattr(c, field) for c in CASES} == set(values), field


# ---- special models against curvlinops ----------------------------------------------------------------


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_shared_layer_and_inplace_activation(fisher_type, separate):
    """A Linear used twice in one forward, with in-place ReLUs right after Linear layers."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 3)
            self.shared = nn.Linear(3, 3)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            h = torch.relu_(self.inp(x))
            h = torch.tanh(self.shared(h))
            h = nn.functional.relu(self.shared(h), inplace=True)
            return self.out(h)

    torch.manual_seed(0)
    model = Net().to(DT)
    data = make_data(model, (4,), "ce", (3, 2))
    loss_fn = nn.CrossEntropyLoss()
    options = dict(fisher_type=fisher_type, separate_weight_and_bias=separate, seed=7)
    ours = curvature.kfac(model, loss_fn, data, **options)
    A, G, dense = curvlinops_kfac(model, loss_fn, data, **options)
    for name in ours.modules:
        assert rel_err(ours.input_covariances[name], A[name]) < TOL
        assert rel_err(ours.gradient_covariances[name], G[name]) < TOL
    assert rel_err(ours.dense(), dense) < TOL


@pytest.mark.parametrize("kfac_approx", curvature.KFAC_APPROXES)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_depthwise_conv_matches_curvlinops(fisher_type, kfac_approx):
    """One group per input channel (a MobileNet block's depthwise conv), two filters each."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.Tanh(), nn.Conv2d(6, 2, 1), nn.Flatten(),
                          nn.Linear(2 * 5 * 5, 3)).to(DT)
    data = make_data(model, (3, 5, 5), "ce", (4,))
    options = dict(fisher_type=fisher_type, kfac_approx=kfac_approx, separate_weight_and_bias=False, seed=0)
    ours = curvature.kfac(model, nn.CrossEntropyLoss(), data, **options)
    A, G, dense = curvlinops_kfac(model, nn.CrossEntropyLoss(), data, **options)
    assert ours.input_covariances["0"].shape == (3 * 3 + 1, 3 * 3 + 1)  # A over one group's patch, plus the bias
    for name in ours.modules:
        assert rel_err(ours.input_covariances[name], A[name]) < TOL
        assert rel_err(ours.gradient_covariances[name], G[name]) < TOL
    assert rel_err(ours.dense(), dense) < TOL


def test_unsupported_and_frozen_layers_get_zero_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(),
                          nn.Linear(4, 3)).to(DT)
    model[0].requires_grad_(False)
    data = make_data(model, (4,), "mse", (5,))
    loss_fn = nn.MSELoss()
    with pytest.warns(UserWarning, match=r"1 \(PReLU\)") as record:
        ours = curvature.kfac(model, loss_fn, data, fisher_type="type-2")
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1
    assert ours.modules == ["3", "5"]

    covered = [p for m in (model[3], model[5]) for p in m.parameters()]
    _, _, dense = curvlinops_kfac(model, loss_fn, data, params=covered, fisher_type="type-2")
    index = parameter_indices(model, covered)
    full = ours.dense()
    assert full.shape == (ours.num_params,) * 2 == (sum(p.numel() for p in model.parameters()),) * 2
    assert rel_err(full[index][:, index], dense) < TOL
    rest = torch.ones(full.shape[0], dtype=torch.bool)
    rest[index] = False
    assert full[rest].abs().max() == 0 and full[:, rest].abs().max() == 0


# ---- unfold order -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv, padding", [
    (nn.Conv2d, 0), (nn.Conv2d, (1, 2)), (nn.Conv2d, "same"), (nn.Conv2d, "valid"),
    (nn.Conv1d, 2), (nn.Conv1d, "same"),
])
def test_conv_rows_times_weight_give_the_conv_output(conv, padding):
    """Expand rows are the patches in weight.flatten(1) order, zero padding included, also for the
    asymmetric "same" padding of even kernels (which curvlinops cannot do)."""
    torch.manual_seed(0)
    dims = 2 if conv is nn.Conv2d else 1
    for kernel, dilation in [((2,) * dims, 1), ((3, 2)[:dims], 2), ((4,) * dims, 1)]:
        stride = 1 if padding == "same" else 2
        layer = conv(3, 4, kernel, stride=stride, padding=padding, dilation=dilation, bias=False).to(DT)
        x = torch.randn(2, 3, *(7,) * dims, dtype=DT)
        out = layer(x)
        rows, scale = input_rows("conv", layer, x, "expand")
        if isinstance(rows, natgrad_cuda.ops.ConvPatches):  # more taps than stride area: described, not unfolded
            rows = rows.unfold()
        positions = out[0, 0].numel()
        assert scale == 1 / positions
        recon = (rows @ layer.weight.flatten(1).T).reshape(2, positions, 4)
        torch.testing.assert_close(recon, out.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)


# ---- 2. several batches == one big batch --------------------------------------------------------------


def batch_forms(batches):
    """The same batches as a list, a generator and a DataLoader."""
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(batches[0][0]))
    return [batches, (b for b in batches), loader]


@pytest.mark.parametrize("seed, arch, loss", [(0, "mlp", "ce"), (1, "seq", "mse"), (2, "cnn", "bce"),
                                              (3, "conv1d", "ce"), (4, "convhead", "ce"), (5, "convhead", "mse")])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "forward-only"])
def test_batches_equal_one_big_batch(seed, arch, loss, fisher_type):
    torch.manual_seed(seed)
    model, in_shape = build_model(arch, random.Random(seed), loss)
    batches = make_data(model, in_shape, loss, (3, 3, 3, 1))
    big = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    for reduction, approx in itertools.product(("mean", "sum"), curvature.KFAC_APPROXES):
        loss_fn = LOSSES[loss](reduction=reduction)
        options = dict(fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=False)
        whole = curvature.kfac(model, loss_fn, big, **options).dense()
        for data in batch_forms(batches):
            assert rel_err(curvature.kfac(model, loss_fn, data, **options).dense(), whole) < TOL


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("exact", [curvature.ggn, curvature.empirical_fisher])
def test_exact_batches_equal_one_big_batch(exact, reduction):
    torch.manual_seed(0)
    model, in_shape = build_model("seq", random.Random(0), "mse")
    batches = make_data(model, in_shape, "mse", (2, 1, 3))
    big = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    loss_fn = nn.MSELoss(reduction=reduction)
    assert rel_err(exact(model, loss_fn, iter(batches)), exact(model, loss_fn, big)) < TOL


# ---- 3. Monte Carlo -----------------------------------------------------------------------------------


def test_mc_is_reproducible_with_a_seed_and_uses_the_global_rng_without():
    torch.manual_seed(0)
    model, in_shape = build_model("cnn", random.Random(3), "ce")
    batches = make_data(model, in_shape, "ce", (4, 3))
    loss_fn = nn.CrossEntropyLoss()

    def run(seed, data=batches):
        return curvature.kfac(model, loss_fn, data, fisher_type="mc", mc_samples=3, seed=seed).dense()

    first = run(11)
    assert torch.equal(first, run(11))
    assert torch.equal(first, run(11, data=iter(batches)))
    assert not torch.allclose(first, run(12))
    torch.manual_seed(5)
    unseeded = run(None)
    torch.manual_seed(5)
    assert torch.equal(unseeded, run(None))
    assert not torch.allclose(unseeded, run(None))  # the global RNG moved on


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_mc_converges_to_type2(loss):
    """With one loss term per data point, E[G_mc] = G_type-2; the error falls like 1/sqrt(M)."""
    torch.manual_seed(0)
    model, in_shape = build_model("cnn", random.Random(5), loss)
    data = make_data(model, in_shape, loss, (6,))
    loss_fn = LOSSES[loss]()
    exact = curvature.kfac(model, loss_fn, data, fisher_type="type-2").dense()
    samples = torch.tensor([1.0, 16, 256, 4096], dtype=DT)
    errors = torch.tensor([rel_err(curvature.kfac(model, loss_fn, data, fisher_type="mc", mc_samples=int(m),
                                                  seed=1).dense(), exact) for m in samples], dtype=DT)
    # least-squares slope of log(error) over log(M): -1/2 in theory
    logm, loge = samples.log() - samples.log().mean(), errors.log() - errors.log().mean()
    slope = (logm * loge).sum() / logm.square().sum()
    assert -0.7 < slope < -0.3, errors
    assert errors[-1] < 0.03 and errors[-1] < errors[0] / 10, errors


# ---- 4. docs/curvature.md identities and the exact matrices --------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", range(3))
def test_one_datum_kfac_equals_exact_layer_blocks(loss, reduction, seed):
    """Without weight sharing and with one data point, type-2 K-FAC is the GGN's layer blocks and
    empirical K-FAC the empirical Fisher's."""
    torch.manual_seed(seed)
    model, in_shape = build_model("mlp", random.Random(seed), loss)
    data = make_data(model, in_shape, loss, (1,))
    loss_fn = LOSSES[loss](reduction=reduction)
    for fisher_type, exact in [("type-2", curvature.ggn), ("empirical", curvature.empirical_fisher)]:
        dense = curvature.kfac(model, loss_fn, data, fisher_type=fisher_type, separate_weight_and_bias=False).dense()
        assert rel_err(dense, exact(model, loss_fn, data) * layer_block_mask(model)) < TOL


@pytest.mark.parametrize("arch", ["mlp", "seq", "cnn", "convhead"])
@pytest.mark.parametrize("loss", LOSSES)
def test_exact_matches_curvlinops(arch, loss):
    seed = ARCHS.index(arch) * 10 + list(LOSSES).index(loss)
    torch.manual_seed(seed)
    model, in_shape = build_model(arch, random.Random(seed), loss)
    data = make_data(model, in_shape, loss, (3, 2))
    for reduction in ("mean", "sum"):
        loss_fn = LOSSES[loss](reduction=reduction)
        assert rel_err(curvature.ggn(model, loss_fn, data), dense_of(GGNLinearOperator, model, loss_fn, data)) < TOL
        assert rel_err(curvature.empirical_fisher(model, loss_fn, data),
                       dense_of(EFLinearOperator, model, loss_fn, data)) < TOL


def test_exact_covers_unsupported_layers_and_leaves_buffers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    data = make_data(model, (3,), "ce", (5,))
    loss_fn = nn.CrossEntropyLoss()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    train_mode = curvature.ggn(model, loss_fn, data)  # curvlinops cannot do BatchNorm in training mode
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert train_mode.shape == (34, 34) and torch.isfinite(train_mode).all()
    model.eval()
    assert rel_err(curvature.ggn(model, loss_fn, data), dense_of(GGNLinearOperator, model, loss_fn, data)) < TOL


def test_cross_entropy_probability_targets():
    """One-hot probabilities give what class indices give; soft ones the exact empirical Fisher."""
    torch.manual_seed(0)
    model, in_shape = build_model("convhead", random.Random(0), "ce")
    x, y = make_data(model, in_shape, "ce", (3,))[0]
    onehot = nn.functional.one_hot(y, model(x).shape[1]).movedim(-1, 1).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    for fisher_type in ("empirical", "type-2"):
        by_index = curvature.kfac(model, loss_fn, (x, y), fisher_type=fisher_type).dense()
        assert rel_err(curvature.kfac(model, loss_fn, (x, onehot), fisher_type=fisher_type).dense(), by_index) < TOL
    assert rel_err(curvature.empirical_fisher(model, loss_fn, (x, onehot)),
                   curvature.empirical_fisher(model, loss_fn, (x, y))) < TOL

    mlp, in_shape = build_model("mlp", random.Random(1), "ce")
    x = torch.randn(1, *in_shape, dtype=DT)
    soft = mlp(x).detach().mul(3).softmax(1)
    dense = curvature.kfac(mlp, loss_fn, (x, soft), fisher_type="empirical", separate_weight_and_bias=False).dense()
    assert rel_err(dense, curvature.empirical_fisher(mlp, loss_fn, (x, soft)) * layer_block_mask(mlp)) < TOL


# ---- the loss rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cross_entropy", "mse", "bce"])
def test_hessian_sqrt_squares_to_the_loss_hessian(name):
    spec = LossSpec.from_name(name)
    torch.manual_seed(0)
    f = torch.randn(5, 4, dtype=DT)
    y = spec.sample_targets(f, None)
    S = spec.hessian_sqrt(f)
    for r in range(5):
        H = torch.func.hessian(lambda fr: spec.term_losses(fr[None], y[r:r + 1]).sum())(f[r])
        torch.testing.assert_close(S[r] @ S[r].T, H, rtol=1e-12, atol=1e-12)


def test_loss_spec_from_module_and_name():
    assert LossSpec.from_module(nn.CrossEntropyLoss()) == LossSpec.from_name("cross_entropy")
    assert LossSpec.from_module(nn.MSELoss(reduction="sum")) == LossSpec("mse", "sum")
    assert LossSpec.from_module(nn.BCEWithLogitsLoss()) == LossSpec.from_name("bce", "mean")


# ---- mechanics ----------------------------------------------------------------------------------------


def test_leaves_model_hooks_and_grads_alone():
    torch.manual_seed(0)
    model, in_shape = build_model("cnn", random.Random(0), "ce")
    data = make_data(model, in_shape, "ce", (3,))
    model[0].weight.grad = torch.ones_like(model[0].weight)
    curvature.kfac(model, nn.CrossEntropyLoss(), data, fisher_type="type-2")
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert all(not m._forward_hooks for m in model.modules())


def test_every_accumulation_goes_through_factor_update(monkeypatch):
    """With factor_update_ replaced by a recorder that does nothing, every factor stays zero (G of
    forward-only is I by definition); calls batch all layers and pass the backend on."""
    torch.manual_seed(0)
    model, in_shape = build_model("cnn", random.Random(1), "ce")
    data = make_data(model, in_shape, "ce", (3, 2))
    calls = []

    def record(factors, inputs, decay, scales, append_ones, impl=None, _trusted=False):
        calls.append((len(factors), decay, impl, _trusted))

    monkeypatch.setattr(natgrad_cuda.ops, "factor_update_", record)
    for fisher_type in curvature.FISHER_TYPES:
        calls.clear()
        result = curvature.kfac(model, nn.CrossEntropyLoss(), data, fisher_type=fisher_type, backend="reference")
        assert all(a.abs().max() == 0 for a in result.input_covariances.values())
        if fisher_type != "forward-only":
            assert all(g.abs().max() == 0 for g in result.gradient_covariances.values())
        classes = model[-1].out_features
        backwards = {"type-2": classes * 2, "mc": 2, "empirical": 2, "forward-only": 0}[fisher_type]
        assert calls == [(2, 1.0, "reference", False)] * (2 + backwards)  # user-facing: arguments checked


BACKENDS = [None, "reference"] + (["native"] if _ext.native_available("cpu") else []) + (
    ["emulated"] if "emulated" in _ext.backends() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_the_reference(backend):
    """Whichever factor_update_ implementations this build has give the reference's factors."""
    torch.manual_seed(0)
    model, in_shape = build_model("cnn", random.Random(2), "ce")
    data = make_data(model, in_shape, "ce", (3, 2))
    options = dict(fisher_type="type-2", separate_weight_and_bias=False)
    reference = curvature.kfac(model, nn.CrossEntropyLoss(), data, backend="reference", **options)
    ours = curvature.kfac(model, nn.CrossEntropyLoss(), data, backend=backend, **options)
    for name in reference.modules:
        assert rel_err(ours.input_covariances[name], reference.input_covariances[name]) < TOL
        assert rel_err(ours.gradient_covariances[name], reference.gradient_covariances[name]) < TOL
