"""curvature.kfac(structure=...): unit-wise blocks against the exact GGN / empirical Fisher, and the
block tri-diagonal chain's defining properties, in float64, with oracles built independently."""
import copy

import pytest
import torch
from torch import nn

import natgrad_cuda as ng


def _offsets(model):
    out, i = {}, 0
    for p in model.parameters():
        out[id(p)] = i
        i += p.numel()
    return out, i


def _unit_mask(model):
    """True on (i, j) when parameters i and j belong to the same output unit of one layer: a
    Linear's or Conv's weight row with its bias entry, a ConvTranspose's weight column, a norm's
    weight entry with its bias entry. Built from the parameters' shapes, not from the package."""
    offsets, P = _offsets(model)
    mask = torch.zeros(P, P, dtype=torch.bool)
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        w = torch.arange(m.weight.numel()).reshape(m.weight.shape) + offsets[id(m.weight)]
        if isinstance(m, nn.ConvTranspose2d):
            units = [w[:, o].reshape(-1) for o in range(w.shape[1])]
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            units = [w.reshape(-1)[e:e + 1] for e in range(w.numel())]
        else:
            units = [w[o].reshape(-1) for o in range(w.shape[0])]
        for o, idx in enumerate(units):
            if m.bias is not None:
                idx = torch.cat([idx, torch.tensor([offsets[id(m.bias)] + o])])
            mask[idx[:, None], idx[None, :]] = True
    return mask


def _data(model, shape, loss, n_classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    if isinstance(loss, nn.CrossEntropyLoss):
        y = torch.randint(0, n_classes, (out.shape[0], *out.shape[2:]), generator=gen)
    else:
        y = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return x, y


class _MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _bn_eval(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn.eval()


UNIT_MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.Tanh(),
                                  nn.Linear(3, 3)), (6, 4), nn.CrossEntropyLoss()),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)), (3, 2, 4, 4),
            nn.MSELoss()),
    # BatchNorm in eval mode: in training mode its batch statistics couple the data points, and no
    # per-example decomposition (unit-wise or K-FAC) is exact
    "convtranspose-bn": (lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 2, stride=2), _bn_eval(3), nn.Tanh(),
                                               nn.Flatten(), nn.Linear(48, 3)), (4, 2, 2, 2), nn.CrossEntropyLoss()),
    # positions inside a data point, one loss term per data point (the unit-wise blocks are exact
    # then; with several terms per data point they keep the products between its terms)
    "sequence-layernorm": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), _MeanOverPositions(),
                                                 nn.Linear(4, 2)), (2, 3, 3), nn.MSELoss()),
}


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("name", list(UNIT_MODELS))
def test_unit_wise_equals_exact_unit_blocks(name, fisher_type):
    build, shape, loss = UNIT_MODELS[name]
    torch.manual_seed(1)
    model = build().double()
    x, y = _data(model, shape, loss, 3)
    exact = (ng.curvature.ggn if fisher_type == "type-2" else ng.curvature.empirical_fisher)(model, loss, (x, y))
    got = ng.curvature.kfac(model, loss, (x, y), fisher_type=fisher_type, structure="unit-wise")
    assert got.structure == "unit-wise" and got.unit_blocks and not got.input_covariances
    mask = _unit_mask(model)
    torch.testing.assert_close(got.dense(), exact * mask, rtol=1e-10, atol=1e-12)
    # the same whatever separate_weight_and_bias and kfac_approx say, and over split batches
    again = ng.curvature.kfac(model, loss, [(x[:1], y[:1]), (x[1:], y[1:])], fisher_type=fisher_type,
                              structure="unit-wise", separate_weight_and_bias=False, kfac_approx="reduce")
    torch.testing.assert_close(again.dense(), got.dense(), rtol=1e-10, atol=1e-12)


def test_unit_wise_mc_is_unbiased():
    """MC unit blocks average to the type-2 ones over many samples."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = _data(model, (4, 3), nn.CrossEntropyLoss(), 3)
    exact = ng.curvature.kfac(model, nn.CrossEntropyLoss(), (x, y), fisher_type="type-2", structure="unit-wise")
    mc = ng.curvature.kfac(model, nn.CrossEntropyLoss(), (x, y), fisher_type="mc", mc_samples=4000, seed=0,
                           structure="unit-wise")
    err = (mc.dense() - exact.dense()).norm() / exact.dense().norm()
    assert err < 0.05


def test_unit_wise_refusals():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    x = torch.randint(0, 5, (4, 2))
    y = torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="one-hot"):
        ng.curvature.kfac(model, nn.CrossEntropyLoss(), (x, y), structure="unit-wise")
    mlp = nn.Sequential(nn.Linear(3, 2)).double()
    xs, ys = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="forward-only"):
        ng.curvature.kfac(mlp, nn.MSELoss(), (xs, ys), fisher_type="forward-only", structure="unit-wise")
    with pytest.raises(ValueError, match="structure must be one of"):
        ng.curvature.kfac(mlp, nn.MSELoss(), (xs, ys), structure="diagonal")


# ---- block tri-diagonal ------------------------------------------------------------------------


def _chain_model(widths, bias=True, seed=3):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


def _layer_indices(model):
    """Per Linear layer, its parameters' indices in [W | b] row-major order (the augmented Kronecker
    order) and which of them are weights."""
    offsets, P = _offsets(model)
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w = torch.arange(m.weight.numel()).reshape(m.weight.shape) + offsets[id(m.weight)]
            if m.bias is not None:
                w = torch.cat([w, (torch.arange(m.out_features) + offsets[id(m.bias)]).unsqueeze(1)], 1)
            out.append(w.reshape(-1))
    return out, P


def _kronecker_fisher(model, x, loss_fn):
    """F~ of a Linear chain for MSE type-2, from hooks and autograd (no package code): blocks
    kron(G_ij, A_ij) with A_ij = mean of xa_i xa_j^T (inputs with a 1 for the bias) and G_ij = sum over
    data points and the C backward passes of g_i g_j^T / Z, Z = N C."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs, outputs = [], []
    def keep(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    hooks = [m.register_forward_hook(keep) for m in linears]
    out = model(x)
    for h in hooks:
        h.remove()
    n, c = out.shape
    xa = [torch.cat([i.detach(), torch.ones(n, 1, dtype=i.dtype)], 1) if m.bias is not None else i.detach()
          for i, m in zip(inputs, linears)]
    gs = [[] for _ in linears]
    for k in range(c):  # MSE: S = sqrt(2) I, phi_k = sqrt(2) sum_n out[n, k]
        grads = torch.autograd.grad(2 ** 0.5 * out[:, k].sum(), outputs, retain_graph=True)
        for i, g in enumerate(grads):
            gs[i].append(g)
    gs = [torch.cat(g) for g in gs]  # rows paired across layers: (class, data point)
    idx, P = _layer_indices(model)
    full = torch.zeros(P, P, dtype=torch.float64)
    blocks = {}
    for i in range(len(linears)):
        for j in range(len(linears)):
            A = xa[i].T @ xa[j] / n
            G = gs[i].T @ gs[j] / (n * c)
            blocks[i, j] = torch.kron(G, A)
            full[idx[i][:, None], idx[j][None, :]] = blocks[i, j]
    return full, idx, blocks


@pytest.mark.parametrize("bias", [True, False])
def test_tridiagonal_agrees_with_kronecker_fisher_and_has_tridiagonal_inverse(bias):
    model = _chain_model([3, 4, 3, 2, 2], bias=bias)
    x, y = _data(model, (40, 3), nn.MSELoss(), 2, seed=4)
    Ftilde, idx, blocks = _kronecker_fisher(model, x, nn.MSELoss())
    curv = ng.curvature.kfac(model, nn.MSELoss(), (x, y), fisher_type="type-2", structure="block-tridiagonal",
                             separate_weight_and_bias=False)
    Fhat = curv.dense()
    L = len(idx)
    for i in range(L):
        for j in range(L):
            if abs(i - j) <= 1:
                torch.testing.assert_close(Fhat[idx[i][:, None], idx[j][None, :]], blocks[i, j], rtol=1e-9,
                                           atol=1e-12)
    # the diagonal blocks are block-diagonal K-FAC's
    kfac = ng.curvature.kfac(model, nn.MSELoss(), (x, y), fisher_type="type-2", separate_weight_and_bias=False)
    blockdiag = torch.zeros_like(Fhat)
    for i in range(L):
        blockdiag[idx[i][:, None], idx[i][None, :]] = 1
    torch.testing.assert_close(Fhat * blockdiag, kfac.dense(), rtol=1e-9, atol=1e-12)
    # F^ is symmetric positive definite here (full-rank factors) and its inverse is block tri-diagonal
    torch.testing.assert_close(Fhat, Fhat.T, rtol=0, atol=1e-13)
    assert float(torch.linalg.eigvalsh(Fhat).min()) > 0
    inv = torch.linalg.inv(Fhat)
    scale = inv.abs().max()
    for i in range(L):
        for j in range(L):
            block = inv[idx[i][:, None], idx[j][None, :]]
            if abs(i - j) >= 2:
                assert float(block.abs().max()) < 1e-9 * float(scale), (i, j)
            elif abs(i - j) == 1:
                assert float(block.abs().max()) > 1e-6 * float(scale)  # a real coupling, not zero
    # and F^ is not F~ (the far blocks differ): the approximation is not trivial
    assert float((Fhat - Ftilde).abs().max()) > 1e-6


def test_tridiagonal_separate_bias_is_two_chains():
    """Weight and bias separate: F~'s weight-bias blocks are zero, so weights and biases form two
    chains; the weight chain's blocks agree with F~'s weight parts."""
    model = _chain_model([3, 4, 3, 2])
    x, y = _data(model, (30, 3), nn.MSELoss(), 2, seed=5)
    _, idx, blocks = _kronecker_fisher(model, x, nn.MSELoss())
    curv = ng.curvature.kfac(model, nn.MSELoss(), (x, y), fisher_type="type-2", structure="block-tridiagonal")
    Fhat = curv.dense()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    offsets, _ = _offsets(model)

    def parts(i):
        m = linears[i]
        d = m.in_features
        is_w = (torch.arange(m.out_features * (d + 1)) % (d + 1)) < d
        return is_w

    for i in range(3):
        for j in range(3):
            wi, wj = parts(i), parts(j)
            got = Fhat[idx[i][:, None], idx[j][None, :]]
            if abs(i - j) <= 1:
                want = blocks[i, j] * ((wi[:, None] & wj[None, :]) | (~wi[:, None] & ~wj[None, :]))
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
            assert float(got[wi][:, ~wj].abs().max()) == 0.0  # no weight-bias coupling anywhere
    inv = torch.linalg.inv(Fhat)
    far = inv[idx[0][:, None], idx[2][None, :]]
    assert float(far.abs().max()) < 1e-9 * float(inv.abs().max())


def test_tridiagonal_with_one_data_point_equals_the_ggn_near_the_diagonal():
    """One data point, type-2, joint: F~'s blocks are the exact GGN's, so F^ agrees with the GGN on
    the diagonal and first off-diagonal blocks (singular factors: pseudo-inverses)."""
    model = _chain_model([3, 4, 2, 3])
    x, y = _data(model, (1, 3), nn.CrossEntropyLoss(), 3, seed=6)
    exact = ng.curvature.ggn(model, nn.CrossEntropyLoss(), (x, y))
    Fhat = ng.curvature.kfac(model, nn.CrossEntropyLoss(), (x, y), fisher_type="type-2",
                             structure="block-tridiagonal", separate_weight_and_bias=False).dense()
    idx, _ = _layer_indices(model)
    for i in range(3):
        for j in range(3):
            if abs(i - j) <= 1:
                torch.testing.assert_close(Fhat[idx[i][:, None], idx[j][None, :]],
                                           exact[idx[i][:, None], idx[j][None, :]], rtol=1e-9, atol=1e-12)


def test_tridiagonal_refusals():
    cnn = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 2)).double()
    x, y = torch.randn(3, 1, 3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="chains of nn.Linear"):
        ng.curvature.kfac(cnn, nn.MSELoss(), (x, y), structure="block-tridiagonal")
    seq = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    xs, ys = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(B, in\) inputs"):
        ng.curvature.kfac(seq, nn.MSELoss(), (xs, ys), structure="block-tridiagonal")
    lin = nn.Linear(3, 3).double()
    shared = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match="twice"):
        ng.curvature.kfac(shared, nn.MSELoss(), (torch.randn(4, 3, dtype=torch.float64),
                                                 torch.randn(4, 3, dtype=torch.float64)),
                          structure="block-tridiagonal")


# ---- the optimizer -------------------------------------------------------------------------------

BACKENDS = ["reference", "native", "emulated"]


def _one_step(model, x, y, loss_fn, backend, structure, damping=1e-2, opt_cls=None):
    opt_cls = opt_cls or ng.KFAC
    kw = dict(lr=1.0, momentum=0.0) if opt_cls is ng.KFAC else dict(lr=1.0)
    opt = opt_cls(model, damping=damping, kl_clip=None, factor_decay=0.0, factor_update_freq=1,
                  inv_update_freq=1, fisher_type="type-2", loss="mse" if isinstance(loss_fn, nn.MSELoss) else
                  "cross_entropy", backend=backend, structure=structure, **kw)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    out = model(x)
    loss = loss_fn(out, y)
    opt.backward(loss, out)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    if opt_cls is ng.KFAC:
        return before - torch.nn.utils.parameters_to_vector(model.parameters()).detach(), g
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "convtranspose-bn"])
def test_unit_wise_optimizer_step_is_the_exact_unit_blocks_solve(name, backend):
    build, shape, loss = UNIT_MODELS[name]
    torch.manual_seed(7)
    model = build().double()
    x, y = _data(model, shape, loss, 3, seed=7)
    Fu = ng.curvature.kfac(model, loss, (x, y), fisher_type="type-2", structure="unit-wise").dense()
    d, g = _one_step(model, x, y, loss, backend, "unit-wise")
    want = torch.linalg.solve(Fu + 1e-2 * torch.eye(len(g), dtype=Fu.dtype), g)
    torch.testing.assert_close(d, want, rtol=1e-8, atol=1e-10)


def _chain_oracle(curv, model, damping):
    """F^ of the damped chain (factored Tikhonov on the diagonal factors), built densely from the
    definition: F^_ii = F~_ii, F^_ij = Psi_i F^_i+1,j (i < j), Psi_i = F~_i,i+1 F~_i+1,i+1^-1."""
    names = curv.modules
    idx, P = _layer_indices(model)
    A, G = [], []
    for n in names:
        a, g = curv.input_covariances[n], curv.gradient_covariances[n]
        pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
        A.append(a + pi * damping ** 0.5 * torch.eye(a.shape[0], dtype=a.dtype))
        G.append(g + damping ** 0.5 / pi * torch.eye(g.shape[0], dtype=g.dtype))
    L = len(names)
    diag = [torch.kron(G[i], A[i]) for i in range(L)]
    off = [torch.kron(curv.cross_gradient_covariances[(names[i], names[i + 1])],
                      curv.cross_input_covariances[(names[i], names[i + 1])]) for i in range(L - 1)]
    psi = [off[i] @ torch.linalg.inv(diag[i + 1]) for i in range(L - 1)]
    blocks = {}
    for j in range(L):
        blocks[j, j] = diag[j]
        for i in range(j - 1, -1, -1):
            blocks[i, j] = psi[i] @ blocks[i + 1, j]
            blocks[j, i] = blocks[i, j].T
    Fhat = torch.zeros(P, P, dtype=torch.float64)
    for (i, j), b in blocks.items():
        Fhat[idx[i][:, None], idx[j][None, :]] = b
    return Fhat


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_cls", [ng.KFAC, ng.KFACPreconditioner], ids=["KFAC", "preconditioner"])
def test_tridiagonal_optimizer_step_solves_the_damped_chain(backend, opt_cls):
    model = _chain_model([4, 5, 3, 3, 2], seed=8)
    x, y = _data(model, (12, 4), nn.MSELoss(), 2, seed=8)
    curv = ng.curvature.kfac(model, nn.MSELoss(), (x, y), fisher_type="type-2", structure="block-tridiagonal",
                             separate_weight_and_bias=False)
    damping = 3e-2
    Fhat = _chain_oracle(curv, model, damping)
    d, g = _one_step(model, x, y, nn.MSELoss(), backend, "block-tridiagonal", damping=damping, opt_cls=opt_cls)
    torch.testing.assert_close(d, torch.linalg.solve(Fhat, g), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["unit-wise", "block-tridiagonal", "block-diagonal"])
def test_structures_train_and_resume(structure):
    """A few steps reduce the loss; a saved state resumes bit for bit."""
    model = _chain_model([6, 8, 4, 3], seed=9)
    x, y = _data(model, (32, 6), nn.CrossEntropyLoss(), 3, seed=9)
    opt = ng.KFAC(model, lr=0.3, loss="cross_entropy", structure=structure, seed=0, inv_update_freq=2,
                  factor_update_freq=1)

    def run(m, o, steps):
        losses = []
        for _ in range(steps):
            o.zero_grad()
            out = m(x)
            loss = nn.functional.cross_entropy(out, y)
            o.backward(loss, out)
            o.step()
            losses.append(float(loss.detach()))
        return losses

    first = run(model, opt, 5)
    assert first[-1] < first[0]
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})  # later steps update in place
    cont = run(model, opt, 3)
    twin = _chain_model([6, 8, 4, 3], seed=10)
    twin.load_state_dict(saved["model"])
    opt2 = ng.KFAC(twin, lr=0.3, loss="cross_entropy", structure=structure, seed=1, inv_update_freq=2,
                   factor_update_freq=1)
    opt2.load_state_dict(saved["opt"])
    assert run(twin, opt2, 3) == cont
    other = "unit-wise" if structure != "unit-wise" else "block-diagonal"
    opt3 = ng.KFAC(_chain_model([6, 8, 4, 3]), loss="cross_entropy", structure=other)
    with pytest.raises(ValueError, match="structure"):
        opt3.load_state_dict(saved["opt"])


def test_optimizer_structure_refusals():
    cnn = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="chains of nn.Linear"):
        ng.KFAC(cnn, loss="mse", structure="block-tridiagonal")
    with pytest.raises(ValueError, match="separate_weight_and_bias=False"):
        ng.KFAC(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)), loss="mse", structure="block-tridiagonal",
                separate_weight_and_bias=True)
    with pytest.raises(ValueError, match="one-hot"):
        ng.KFAC(nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2)), loss="mse", structure="unit-wise")
    with pytest.raises(ValueError, match="structure must be one of"):
        ng.KFACPreconditioner(nn.Linear(2, 2), loss="mse", structure="full")
    with pytest.raises(ValueError, match="forward-only"):
        ng.KFAC(nn.Linear(2, 2), fisher_type="forward-only", structure="unit-wise")
    seq = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    opt = ng.KFAC(seq, loss="mse", structure="block-tridiagonal")
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    out = seq(x)
    with pytest.raises(ValueError, match=r"\(B, in\) inputs"):
        opt.backward(nn.functional.mse_loss(out, torch.zeros_like(out)), out)


@pytest.mark.parametrize("structure", ["unit-wise", "block-tridiagonal"])
def test_structures_combine_with_adaptive_step_damping_adaptation_and_kl_clip(structure):
    """The options the docs say combine with each structure run and reduce the loss."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(48, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=gen)
    for options in (dict(adaptive_step=True), dict(adapt_damping=True, adapt_damping_interval=1),
                    dict(kl_clip=1e-3, momentum=0.9)):
        model = _chain_model([5, 7, 3], seed=11)
        opt = ng.KFAC(model, lr=0.2, loss="cross_entropy", structure=structure, seed=0, **options)
        losses = []
        for _ in range(6):
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.backward(loss, out)
            assert opt.step(lambda: nn.functional.cross_entropy(model(x), y)) is True
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0], options
        if options.get("adapt_damping"):
            assert opt.last_rho is not None and opt.damping != 1e-3
