"""Invariance of the iterates under reparameterisations (Martens, "New insights and perspectives on
the natural gradient method", JMLR 2020, section 12; Martens and Grosse 2015, section 10).

Setting: float64 MLPs, full batch, type-2 curvature, 8 steps of each optimizer on a model and on a
reparameterised twin that computes the same function at the start; after every step the two
functions are compared on the training inputs and on held-out inputs (raw outputs for MSE, log
probabilities for cross-entropy).

Every reparameterisation here is a fixed invertible linear map of the parameters, theta' = Q theta,
with f'(Q theta) = f(theta) for every theta (so it holds along any trajectory, not only at the
start):

- "input-affine": the inputs become x' = B x + c (B invertible, condition number 1e3) and the first
  layer W' = W B^-1, b' = b - W B^-1 c; in homogeneous coordinates [W' b'] = [W b] T^-1 with
  T = [[B, c], [0, 1]]. "input-linear": the same with c = 0;
- "hidden-affine" / "hidden-linear": a fixed (buffer-only) map a' = Omega a + c (c = 0) after the
  hidden activation, and the next layer W' = W Omega^-1, b' = b - W Omega^-1 c (centring and
  whitening of a layer's input are of this kind);
- "relu-rescale": in a ReLU network, hidden unit i's incoming weights and bias times d_i > 0 and
  its outgoing weights divided by d_i (relu(d s) = d relu(s)); the d_i spread over 1e3.

What each optimizer keeps (g' = Q^-T g, F' = Q^-T F Q^-1 for the exact GGN F):

- exact NGD: (F' + lambda I)^-1 g' = Q (F + lambda Q^T Q)^-1 g (test_damped_ngd_is_ngd_with_damping_qtq
  checks this formula), so with F invertible the step is Q times the original one up to the
  damping: invariant to every Q. The difference is linear in lambda (test_damping_breaks_invariance).
  F must be invertible, and P < N C is not enough: a ReLU network's rescaling symmetry makes its
  orbits null directions of J, so F is singular, and as lambda -> 0 the direction tends to the
  (Q^T Q)-weighted minimum-norm solution, not Q times the plain one. The two steps then differ by a
  null-space component: the functions agree to first order in lr only
  (test_full_ngd_and_relu_rescaling_agree_to_first_order).
- layer-wise NGD: the same per block, so invariant to every Q that is block-diagonal over the
  modules, which all the above are; each block of the ReLU network is invertible (the rescaling
  direction couples two layers), so it is exactly invariant where full NGD is not.
- K-FAC (weight and bias joint): layer l's block is G_l (x) A_l with A_l over the homogeneous input
  [a; 1]. An affine map of a layer's input, [a'; 1] = T [a; 1], makes A' = T A T^T, the gradient
  M T^T and the step G^-1 M T^T T^-T A^-1 T^-1 = (G^-1 M A^-1) T^-1: exactly how [W b] transforms.
  A linear map Phi of a layer's pre-activations that the function absorbs (for ReLU a positive
  diagonal Phi) makes G' = Phi^-T G Phi^-1 and the step Phi times the original. So K-FAC is
  invariant to all the reparameterisations above, and it needs only each A and G invertible, not
  the GGN: it stays exact with P > N C (test_kfac_invariant_when_overparameterised), where exact
  NGD is not.
- K-FAC with separate weight and bias ("kfac-separate"): A is over a alone and the bias block is G,
  so a linear map of a layer's input (c = 0) keeps the invariance but a shift, which mixes W into b,
  breaks it.
- SGD: the step is -lr Q^-T g instead of -lr Q g: not invariant unless Q is orthogonal.

Exact NGD with P > N C (the GGN singular; test_overparameterised_ngd_agrees_on_the_data_to_first_order):
as lambda -> 0 the direction tends to the minimum-norm solution, whose predicted change of the
training outputs, J d, is the same in both parameterisations (U d = U U^+ w with U of full row
rank); the parameter steps differ by a component in the null space of J, which moves the held-out
outputs at first order in lr and the training outputs at second order. So the functions on the
training data agree only to first order in lr, not exactly, and on held-out inputs not at all.

Cross-entropy (test_cross_entropy): K-FAC and layer-wise NGD as for MSE. Exact NGD is left out: its
GGN here has 9 exact null directions (the logits' common shift; the gradient is orthogonal to them
and Q leaves them alone, so they would not break the invariance) and nonzero eigenvalues down to
1e-6, and the nearly undamped step is so long in parameter space that it leaves the region where
the quadratic model holds: at lr 0.1 the loss goes 1.08 -> 9.9 in one step and to 2e3 ... 2e15 in
three (damping 1e-6 ... 1e-16), and two runs of a diverging iteration part whatever the
parameterisation. (At damping 1e-4 the run is stable, but the damping is then what decides.)
"""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import natgrad_cuda as ng

# Max abs difference of the two functions (outputs of size ~1 that change by ~1 over a run): the
# observed differences of the invariant methods are 2e-12 ... 1e-6 (exact NGD: ~3e-7, rounding, as
# the reparameterised GGN's condition number is up to ~1e6 times the original's ~1e5); those of
# the non-invariant ones >= 1e-1.
TOL = 1e-5
DIFFERENT = 1e-2  # "not invariant": the functions differ by at least this at some step
COND = 1e3
STEPS = 8
DAMPING = {"ngd-full": 1e-16, "ngd-layer": 1e-16, "kfac-eigen": 1e-16, "kfac-factored": 1e-28,
           "kfac-separate": 1e-16, "sgd": None}  # factored: sqrt(damping) goes on each factor
LR = {"ngd-full": 0.1, "ngd-layer": 0.1, "kfac-eigen": 0.1, "kfac-factored": 0.1, "kfac-separate": 0.1,
      "sgd": 0.02}
WIDTHS = [5, 8, 3]  # P = 75 parameters
N = 100  # N C = 300 > P: the GGN of the tanh network is invertible


# ---- models and reparameterisations ------------------------------------------------------------

def _mlp(widths, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def _affine(d, cond=COND, seed=2, shift=1.0):
    """B = U diag(s) V^T with s log-spaced over [cond^-1/2, cond^1/2] (condition number ``cond``),
    and a shift c ~ N(0, shift^2)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.logspace(math.log10(cond) / 2, -math.log10(cond) / 2, d, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T, shift * torch.randn(d, generator=g, dtype=torch.float64)


class FixedAffine(nn.Module):
    """a -> a Omega^T + c with Omega and c buffers (no parameters)."""

    def __init__(self, omega, c):
        super().__init__()
        self.register_buffer("omega", omega)
        self.register_buffer("c", c)

    def forward(self, a):
        return a @ self.omega.T + self.c


@torch.no_grad()
def _absorb_input_affine(linear, B, c):
    """Makes ``linear`` compute on B x + c what it computed on x."""
    Binv = torch.linalg.inv(B)
    W = linear.weight.clone()
    linear.weight.copy_(W @ Binv)
    linear.bias.sub_(W @ Binv @ c)


def reparam_input_affine(model, shift=1.0):
    """(twin, input map): twin(B x + c) = model(x)."""
    B, c = _affine(model[0].in_features, shift=shift)
    twin = copy.deepcopy(model)
    _absorb_input_affine(twin[0], B, c)
    return twin, lambda x: x @ B.T + c


def reparam_hidden_affine(model, shift=1.0):
    """A fixed affine map after the first hidden activation, absorbed by the next layer."""
    omega, c = _affine(model[2].in_features, seed=3, shift=shift)
    twin = copy.deepcopy(model)
    _absorb_input_affine(twin[2], omega, c)
    layers = list(twin)
    return nn.Sequential(*layers[:2], FixedAffine(omega, c), *layers[2:]), lambda x: x


@torch.no_grad()
def reparam_relu_rescale(model, spread=COND):
    """Hidden unit i of the first layer scaled by d_i > 0, its outgoing weights by 1 / d_i."""
    assert isinstance(model[1], nn.ReLU)
    h = model[0].out_features
    d = torch.logspace(math.log10(spread) / 2, -math.log10(spread) / 2, h, dtype=torch.float64)
    d = d[torch.randperm(h, generator=torch.Generator().manual_seed(4))]
    twin = copy.deepcopy(model)
    twin[0].weight.mul_(d[:, None])
    twin[0].bias.mul_(d)
    twin[2].weight.div_(d[None, :])
    return twin, lambda x: x


REPARAMS = {
    "input-affine": reparam_input_affine,
    "input-linear": functools.partial(reparam_input_affine, shift=0.0),
    "hidden-affine": reparam_hidden_affine,
    "hidden-linear": functools.partial(reparam_hidden_affine, shift=0.0),
    "relu-rescale": reparam_relu_rescale,
}


def parameter_map(reparam, model):
    """The matrix Q with theta' = Q theta (flattened over parameters()), column by column."""
    n = sum(p.numel() for p in model.parameters())
    probe = copy.deepcopy(model)
    cols = []
    for i in range(n):
        vector_to_parameters(torch.eye(n, dtype=torch.float64)[i], probe.parameters())
        cols.append(parameters_to_vector(reparam(probe)[0].parameters()).detach())
    Q = torch.stack(cols, 1)
    theta = parameters_to_vector(model.parameters()).detach()
    assert torch.allclose(Q @ theta, parameters_to_vector(reparam(model)[0].parameters()), rtol=0, atol=1e-9)
    return Q


# ---- data, optimizers, runs --------------------------------------------------------------------

def _problem(widths, n, loss, act=nn.Tanh, seed=1):
    """Inputs, targets from a teacher of the same shape, held-out inputs. MSE: the teacher's
    outputs plus noise; cross-entropy: its argmax with a third of the labels redrawn at random (not
    separable, so the probabilities and with them the curvature stay away from 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    x_held = torch.randn(64, widths[0], generator=g, dtype=torch.float64)
    with torch.no_grad():
        t = _mlp(widths, act, seed=seed + 100)(x)
    if loss == "mse":
        return x, t + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64), x_held
    labels = t.argmax(1)
    noisy = torch.rand(n, generator=g) < 1 / 3
    labels[noisy] = torch.randint(0, widths[-1], (int(noisy.sum()),), generator=g)
    return x, labels, x_held


def _setup(reparam, loss="mse", widths=WIDTHS, n=N):
    act = nn.ReLU if reparam == "relu-rescale" else nn.Tanh
    x, y, x_held = _problem(widths, n, loss, act)
    return _mlp(widths, act), x, y, x_held


def _loss(loss, out, y):
    return F.mse_loss(out, y) if loss == "mse" else F.cross_entropy(out, y)


def _function(loss, out):
    return out if loss == "mse" else out.log_softmax(1)


def make_optimizer(method, model, loss, lr=None, damping=None):
    lr = LR[method] if lr is None else lr
    damping = DAMPING[method] if damping is None else damping
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if method.startswith("ngd"):
        return ng.NGD(model, lr=lr, damping=damping, loss=loss, fisher_type="type-2", blocks=method[4:])
    return ng.KFAC(model, lr=lr, damping=damping, loss=loss, fisher_type="type-2", momentum=0.0, kl_clip=None,
                   factor_decay=0.0, factor_update_freq=1, inv_update_freq=1,
                   inverse="factored" if method == "kfac-factored" else "eigen",
                   separate_weight_and_bias=method == "kfac-separate")


def trajectory(model, method, x, y, x_held, loss, steps, lr=None, damping=None):
    """(function on x, function on x_held, loss before the step) after each of ``steps`` steps."""
    opt = make_optimizer(method, model, loss, lr, damping)
    record = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        value = _loss(loss, out, y)
        if method == "sgd":
            value.backward()
        else:
            opt.backward(value, out)
        assert opt.step() is not False
        with torch.no_grad():
            record.append((_function(loss, model(x)), _function(loss, model(x_held)), value.item()))
    return record


def compare(model, reparam, method, x, y, x_held, loss="mse", steps=STEPS, **kw):
    """Runs ``method`` on ``model`` and on its twin; per step max |f - f'| on the training and on
    the held-out inputs, and the original run's record."""
    twin, transform = reparam(model)
    with torch.no_grad():
        start = (_function(loss, model(x)) - _function(loss, twin(transform(x)))).abs().max().item()
    assert start < 1e-11, start  # the same function at the start
    a = trajectory(model, method, x, y, x_held, loss, steps, **kw)
    b = trajectory(twin, method, transform(x), y, transform(x_held), loss, steps, **kw)
    for rec in (a, b):
        assert all(bool(torch.isfinite(r[0]).all() and torch.isfinite(r[1]).all()) for r in rec)
    train = [(p[0] - q[0]).abs().max().item() for p, q in zip(a, b)]
    held = [(p[1] - q[1]).abs().max().item() for p, q in zip(a, b)]
    return train, held, a


# ---- the table: which optimizer keeps which reparameterisation ----------------------------------

_ALL = set(REPARAMS)
INVARIANT = {
    "ngd-full": _ALL - {"relu-rescale"},  # the ReLU network's GGN is singular: first order only
    "ngd-layer": _ALL,
    "kfac-eigen": _ALL,
    "kfac-factored": _ALL,
    "kfac-separate": {"input-linear", "hidden-linear", "relu-rescale"},  # a shift mixes W into b
    "sgd": set(),
}


@pytest.mark.parametrize("reparam", list(REPARAMS))
@pytest.mark.parametrize("method", list(INVARIANT))
def test_invariance_table(method, reparam):
    model, x, y, x_held = _setup(reparam)
    train, held, rec = compare(model, REPARAMS[reparam], method, x, y, x_held)
    with torch.no_grad():
        moved = (rec[-1][0] - _mlp(WIDTHS, type(model[1]))(x)).abs().max().item()
    assert rec[-1][2] < rec[0][2]  # the run trained
    if reparam in INVARIANT[method]:
        assert moved > 0.2, moved  # the function changed by far more than TOL
        assert max(train) < TOL and max(held) < TOL, (train, held)
    else:
        assert max(train) > DIFFERENT and max(held) > DIFFERENT, (train, held)


@pytest.mark.parametrize("reparam", ["input-affine", "hidden-affine"])
@pytest.mark.parametrize("method", ["kfac-eigen", "kfac-factored", "ngd-layer", "sgd"])
def test_cross_entropy(method, reparam):
    """Four steps (the nearly undamped layer-wise NGD's run on cross-entropy turns erratic later,
    and then its two runs part, as any two nearby runs of an unstable iteration do)."""
    model, x, y, x_held = _setup(reparam, "cross_entropy")
    train, held, rec = compare(model, REPARAMS[reparam], method, x, y, x_held, "cross_entropy", steps=4)
    assert rec[-1][2] < rec[0][2]
    if method == "sgd":
        assert max(train) > DIFFERENT and max(held) > DIFFERENT, (train, held)
    else:
        assert max(train) < TOL and max(held) < TOL, (train, held)


# ---- what the damping does -----------------------------------------------------------------------

def _flat_step(model, method, x, y, lr, damping):
    before = parameters_to_vector(model.parameters()).detach().clone()
    trajectory(model, method, x, y, x[:1], "mse", 1, lr=lr, damping=damping)
    return (before - parameters_to_vector(model.parameters()).detach()) / lr


@pytest.mark.parametrize("reparam", ["input-affine", "hidden-affine", "relu-rescale"])
def test_damped_ngd_is_ngd_with_damping_qtq(reparam):
    """The twin's damped NGD direction is Q (F + lambda Q^T Q)^-1 g: the original's with the
    damping measured in the twin's coordinates, not Q (F + lambda I)^-1 g."""
    damping = 1e-3
    model, x, y, _ = _setup(reparam)
    Q = parameter_map(REPARAMS[reparam], model)
    twin, transform = REPARAMS[reparam](model)
    Fm = ng.curvature.ggn(model, nn.MSELoss(), (x, y))
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = Q @ torch.linalg.solve(Fm + damping * Q.T @ Q, g)
    plain = Q @ torch.linalg.solve(Fm + damping * torch.eye(len(g), dtype=Fm.dtype), g)
    d = _flat_step(twin, "ngd-full", transform(x), y, lr=1.0, damping=damping)
    assert (d - expected).norm() < 1e-8 * expected.norm()
    assert (d - plain).norm() > 1e-2 * plain.norm()


@pytest.mark.parametrize("method", ["ngd-full", "kfac-eigen"])
def test_damping_breaks_invariance(method):
    """The difference after 3 steps grows linearly with the damping while the damping is small
    next to the curvature (x100 per x100), and at a large damping the relative difference is of
    the order of SGD's (both runs tend to gradient descent with step lr / damping)."""
    dampings = [1e-12, 1e-10, 1e-8]
    diffs = []
    for damping in dampings:
        model, x, y, x_held = _setup("input-affine")
        train, held, _ = compare(model, REPARAMS["input-affine"], method, x, y, x_held, steps=3, damping=damping)
        diffs.append(max(train))
    ratios = [b / a for a, b in zip(diffs, diffs[1:])]
    assert all(30 < r < 300 for r in ratios), (diffs, ratios)
    assert diffs[-1] > DIFFERENT / 10
    model, x, y, x_held = _setup("input-affine")
    train, _, rec = compare(model, REPARAMS["input-affine"], method, x, y, x_held, steps=3, damping=1e2, lr=1e2)
    with torch.no_grad():
        moved = (rec[-1][0] - _mlp(WIDTHS)(x)).abs().max().item()
    assert max(train) > 0.1 * moved, (max(train), moved)


# ---- singular GGNs: agreement to first order only --------------------------------------------------

def _one_step(model, x, y, lr, method="ngd-full", damping=None):
    """Take one step; return the linearised change of the outputs on x per unit lr, J d."""
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    trajectory(model, method, x, y, x[:1], "mse", 1, lr=lr, damping=damping)
    d = {k: (v.detach() - start[k]) / lr for k, v in model.named_parameters()}
    return jvp(lambda p: functional_call(model, p, (x,)), (start,), (d,))[1]


def test_full_ngd_and_relu_rescaling_agree_to_first_order():
    """ReLU network, P < N C but a singular GGN (the rescaling orbits): after one step of full NGD
    the functions differ by O(lr^2) (halving lr quarters it), while layer-wise NGD and K-FAC are
    exact (test_invariance_table)."""
    diffs = []
    for lr in [0.1, 0.05, 0.025]:
        model, x, y, x_held = _setup("relu-rescale")
        train, held, _ = compare(model, REPARAMS["relu-rescale"], "ngd-full", x, y, x_held, steps=1, lr=lr)
        diffs.append((train[0], held[0]))
    for (a, c), (b, d) in zip(diffs, diffs[1:]):
        assert 3.5 < a / b < 4.5 and 3.5 < c / d < 4.5, diffs
    assert diffs[-1][0] > 10 * TOL  # not the damping: 1e-16 would give ~1e-9


def test_overparameterised_ngd_agrees_on_the_data_to_first_order():
    """P = 75 > N C = 30 (tanh, MSE): the predicted change of the training outputs J d agrees (to
    what the damping explains); after the step the training outputs differ at second order in lr,
    the held-out outputs at first order."""
    x, y, x_held = _problem(WIDTHS, 10, "mse")
    damping = 1e-8  # smaller loses digits in the Woodbury form's (g - U^T y) / damping
    results = []
    for lr in [0.1, 0.05, 0.025]:
        model = _mlp(WIDTHS)
        twin, transform = REPARAMS["input-affine"](model)
        lin = _one_step(model, x, y, lr, damping=damping)
        lin_twin = _one_step(twin, transform(x), y, lr, damping=damping)
        with torch.no_grad():
            train = (model(x) - twin(transform(x))).abs().max().item()
            held = (model(x_held) - twin(transform(x_held))).abs().max().item()
            moved = (model(x) - _mlp(WIDTHS)(x)).abs().max().item()
        assert (lin - lin_twin).abs().max() < 1e-4 * lin.abs().max()
        results.append((train, held, moved))
    for (a, c, _), (b, d, _) in zip(results, results[1:]):
        assert 3 < a / b < 5, results  # second order
        assert 1.5 < c / d < 3, results  # first order
    train, held, moved = results[-1]
    assert held > 0.5 * moved and train < 0.3 * moved, results


@pytest.mark.parametrize("reparam", ["input-affine", "hidden-affine"])
@pytest.mark.parametrize("method", ["kfac-eigen", "kfac-factored"])
def test_kfac_invariant_when_overparameterised(method, reparam):
    """P = 75 > N C = 30, where exact NGD is only first-order invariant: K-FAC needs only its
    factors invertible (A: 6 x 6 and 9 x 9 from 10 inputs, G: 8 x 8 and 3 x 3 from 30 rows)."""
    x, y, x_held = _problem(WIDTHS, 10, "mse")
    train, held, rec = compare(_mlp(WIDTHS), REPARAMS[reparam], method, x, y, x_held)
    assert rec[-1][2] < rec[0][2]
    assert max(train) < TOL and max(held) < TOL, (train, held)
