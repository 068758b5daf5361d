"""``KFAC``, a torch.optim.Optimizer, and ``KFACPreconditioner``, which rewrites ``.grad`` for any optimizer.

One K-FAC step (Martens and Grosse 2015; docs/curvature.md for the conventions):

1. factors, every ``factor_update_freq`` steps: A and G of each supported layer from this step's
   forward and a curvature pass (sampled targets for "mc", the loss-Hessian columns for "type-2",
   the true gradients for "empirical"), into exponential moving averages with ``factor_decay``;
2. inverses, every ``inv_update_freq`` steps, per factor by cost (``_directions.decompose``):
   explicit damped inverses by Cholesky (``inverse="factored"``), certified low-rank
   eigendecompositions of wide factors, a settled factor's previous eigenbasis while certified,
   full eigendecompositions (eigenvalues clamped at zero);
3. preconditioning: (G (x) A + damping I)^-1 applied exactly in the eigenbases (``inverse="eigen"``),
   the factored Tikhonov inverse with the pi correction (``inverse="factored"``), or EKFAC's
   QG [(QG^T M QA) / (S + damping)] QA^T with S the per-example gradients' mean squares in the
   eigenbasis (``inverse="ekfac"``);
4. trust region: the K-FAC directions scaled by nu = min(1, sqrt(kl_clip / (lr^2 sum <P, g>)));
5. ``KFAC`` only: weight decay, momentum and the update, like torch.optim.SGD, for every parameter;
   parameters outside supported layers follow the same momentum SGD with their plain gradient; and
   optionally Levenberg-Marquardt adaptation of the damping from the quadratic model's reduction ratio.

A step whose gradients, preconditioned directions or update would hold a NaN or Inf is skipped:
parameters, factors, inverses, momentum and the step counter stay as they were, a warning says so
with the count of skipped steps at the 1st, 2nd, 4th, 8th ... skip in a row (under a GradScaler the
scaler's own skips are silent), and too many skips in a row raise RuntimeError.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import ops, reference
from ._checks import check_bool, check_number, refuse_copy, warn_user
from ._engine import Engine
from ._finite import all_finite, norms_of

__all__ = ["KFAC", "KFACPreconditioner", "lm_damping"]

# Defaults, chosen on the digits CNN and autoencoder of bench/bench_training.py (README, "How the
# defaults were chosen"): they train both well without tuning; lr is the one to tune first.
DEFAULTS = dict(
    lr=0.1,
    momentum=0.5,
    weight_decay=0.0,
    damping=1e-3,
    factor_decay=0.95,
    factor_update_freq=3,
    inv_update_freq=10,
    kl_clip=3e-4,
    adaptive_step=False,
    adapt_damping=False,
    adapt_damping_interval=5,
    min_damping=1e-8,
    max_damping=1e4,
    max_consecutive_skips=100,
)


def _check_hyper(h: dict) -> dict:
    """Validate the hyperparameters (a param group or the preconditioner's own); returns them as
    Python numbers (NumPy scalars and 0-d tensors are accepted, as torch.optim does)."""
    out = dict(h)
    out["lr"] = check_number("lr", h["lr"], low=0.0)
    out["momentum"] = check_number("momentum", h["momentum"], low=0.0, high=1.0, high_open=True)
    out["weight_decay"] = check_number("weight_decay", h["weight_decay"], low=0.0)
    out["damping"] = check_number("damping", h["damping"], low=0.0, low_open=True)
    out["factor_decay"] = check_number("factor_decay", h["factor_decay"], low=0.0, high=1.0, high_open=True)
    out["factor_update_freq"] = check_number("factor_update_freq", h["factor_update_freq"], low=1, integer=True)
    out["inv_update_freq"] = check_number("inv_update_freq", h["inv_update_freq"], low=1, integer=True)
    out["kl_clip"] = check_number("kl_clip", h["kl_clip"], low=0.0, low_open=True, allow_none=True)
    check_bool("adaptive_step", h["adaptive_step"])
    check_bool("adapt_damping", h["adapt_damping"])
    out["adapt_damping_interval"] = check_number("adapt_damping_interval", h["adapt_damping_interval"], low=1,
                                                 integer=True)
    out["min_damping"] = check_number("min_damping", h["min_damping"], low=0.0, low_open=True)
    out["max_damping"] = check_number("max_damping", h["max_damping"], low=0.0, low_open=True)
    if out["min_damping"] > out["max_damping"]:
        raise ValueError(f"min_damping ({h['min_damping']}) must be <= max_damping ({h['max_damping']})")
    return out


def lm_damping(damping: float, rho: float, interval: int, min_damping: float, max_damping: float) -> float:
    """Levenberg-Marquardt rule of Martens and Grosse (2015, section 6.5): with omega = (19/20)^interval,
    damping * omega when rho > 3/4, damping / omega when rho < 1/4 (or not a number), else unchanged;
    clamped to [min_damping, max_damping]."""
    omega = (19.0 / 20.0) ** interval
    if not math.isfinite(rho) or rho < 0.25:
        damping = damping / omega
    elif rho > 0.75:
        damping = damping * omega
    return min(max(damping, min_damping), max_damping)


class KFAC(torch.optim.Optimizer):
    """K-FAC natural-gradient descent for ``model``'s layers with a rule (``curvature.rules``:
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.LayerNorm, nn.RMSNorm,
    nn.GroupNorm, nn.BatchNorm1d/2d/3d, and any registered with ``register_rule``).

    Use::

        opt = KFAC(model, lr=0.1, loss="cross_entropy")
        opt.zero_grad(); out = model(x); loss = F.cross_entropy(out, y)
        opt.backward(loss, out)   # loss.backward() plus, on factor steps, the curvature pass
        opt.step()

    Arguments (all keyword-only; ``loss`` is needed unless fisher_type="forward-only"):
      lr, momentum, weight_decay: as torch.optim.SGD (weight decay is added to the preconditioned
        direction, so it is not preconditioned).
      damping: lambda in (F + lambda I)^-1; the main knob after lr.
      inverse: "eigen" (exact damping in the eigenbasis, default), "factored" (Tikhonov damping
        split between the factors with the pi correction: explicit inverses of the damped factors,
        redone when the damping changes, two products per layer and step) or "ekfac"
        (eigenvalue-corrected K-FAC, George et al. 2018: in K-FAC's eigenbasis, the scaling S of
        nn.Linear layers is re-estimated at every factor step from the per-example gradients, a
        moving average restarted from K-FAC's dG dA^T at each inverse update; other layers keep
        K-FAC's; fisher_type "type-2" or "mc", joint weight and bias, data parallel with
        inverse_sharing="eigenbases").
      factor_decay: the moving average's decay of A and G; factor_update_freq, inv_update_freq:
        steps between factor updates and between eigendecompositions.
      kl_clip: the trust region kappa (None disables it).
      fisher_type: "mc" (sampled targets, ``mc_samples`` of them), "type-2" (exact loss Hessian,
        one backward per output class), "empirical" (the true gradients: a plain loss.backward()
        is enough), "forward-only" (G = I).
      loss, reduction: the model's loss ("cross_entropy", "mse", "bce") and its reduction.
      kfac_approx: "expand" or "reduce" for weight-shared layers; separate_weight_and_bias.
      adaptive_step: Martens and Grosse's step length and momentum from the exact quadratic model
        (section 7; two forward-mode Jacobian-vector products a step); lr, momentum and kl_clip are
        then unused.
      adapt_damping: Levenberg-Marquardt adaptation every ``adapt_damping_interval`` steps, within
        [min_damping, max_damping]; it needs step(closure) (see ``step``).
      max_consecutive_skips: step() raises RuntimeError when this many steps in a row were skipped
        for non-finite values (None: never).
      backend: the kernels of the whole step (ops.factor_update_, eigh_batched, precondition,
        kfac_update_): "auto" (native where compiled), "reference", "native" or "emulated".
      seed: the optimizer's own random generator (MC targets); None seeds it from torch's.
      grad_scaler: the torch.amp.GradScaler, needed only with fisher_type="empirical" (whose G is
        built from the scaled gradients).
      inverse_sharing: data parallel (an initialised torch.distributed process group with 2+
        processes, the model plain or in DistributedDataParallel): the eigendecompositions are split
        over the processes, and "eigenbases" (default) sends them to every process, "directions"
        keeps them on their owner, which preconditions its layers' gradients every step and sends
        the directions (less memory, more bytes per step), "hybrid" chooses per layer whichever
        sends fewer bytes per step. Ignored in a single process.
      structure: "block-diagonal" (K-FAC, default), "unit-wise" (an exact block per output unit,
        its incoming weights and bias, inverted exactly whatever ``inverse`` says; memory
        out * (in + 1)^2 per layer) or "block-tridiagonal" (Martens and Grosse's chain of nn.Linear
        layers; factored damping); docs/curvature.md.

    Gradient accumulation: several forwards, each with its own ``opt.backward(loss_i, out_i)``,
    then one ``step()``: the factors are those of the concatenated batch, and the step equals one
    on it when each loss_i is weighted by its share of the batch (for equal micro-batches, the
    mean loss divided by their number), as for any optimizer.
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale and found_inf; skipped steps reach us

    def __init__(self, model: nn.Module, *, lr: float = DEFAULTS["lr"], momentum: float = DEFAULTS["momentum"],
                 weight_decay: float = DEFAULTS["weight_decay"], damping: float = DEFAULTS["damping"],
                 factor_decay: float = DEFAULTS["factor_decay"],
                 factor_update_freq: int = DEFAULTS["factor_update_freq"],
                 inv_update_freq: int = DEFAULTS["inv_update_freq"], kl_clip: Optional[float] = DEFAULTS["kl_clip"],
                 inverse: str = "eigen", fisher_type: str = "mc", mc_samples: int = 1, loss: Optional[str] = None,
                 reduction: str = "mean", kfac_approx: str = "expand", separate_weight_and_bias: bool = False,
                 adaptive_step: bool = DEFAULTS["adaptive_step"], adapt_damping: bool = DEFAULTS["adapt_damping"],
                 adapt_damping_interval: int = DEFAULTS["adapt_damping_interval"],
                 min_damping: float = DEFAULTS["min_damping"], max_damping: float = DEFAULTS["max_damping"],
                 max_consecutive_skips: Optional[int] = DEFAULTS["max_consecutive_skips"],
                 backend: str = "auto", seed: Optional[int] = None, grad_scaler=None,
                 structure: str = "block-diagonal", inverse_sharing: str = "eigenbases"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        defaults = _check_hyper(dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
                                     factor_decay=factor_decay, factor_update_freq=factor_update_freq,
                                     inv_update_freq=inv_update_freq, kl_clip=kl_clip, adaptive_step=adaptive_step,
                                     adapt_damping=adapt_damping, adapt_damping_interval=adapt_damping_interval,
                                     min_damping=min_damping, max_damping=max_damping))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        super().__init__(params, defaults)
        self._engine = Engine(model, lambda: self.param_groups[0], loss=loss, reduction=reduction,
                              fisher_type=fisher_type, mc_samples=mc_samples, kfac_approx=kfac_approx,
                              separate_weight_and_bias=separate_weight_and_bias, inverse=inverse,
                              backend=backend, seed=seed, grad_scaler=grad_scaler,
                              max_consecutive_skips=max_consecutive_skips, owner="KFAC", structure=structure,
                              inverse_sharing=inverse_sharing)
        if adaptive_step and self._engine.spec is None:
            raise ValueError("adaptive_step=True needs loss= (its quadratic model uses the loss's Hessian)")
        self._engine.keep_inputs = adaptive_step
        if self._engine.unsupported:
            warnings.warn(f"K-FAC does not cover {', '.join(self._engine.unsupported)}; parameters that no covered "
                          "layer holds follow momentum SGD with their plain gradient", UserWarning, stacklevel=2)

    # An optimizer bound to its model by hooks has no meaningful copy: refuse at copy time.
    __deepcopy__ = __copy__ = __reduce_ex__ = __getstate__ = refuse_copy

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "param_groups", None):
            raise ValueError("KFAC holds one parameter group (all of the model's trainable parameters)")
        super().add_param_group(param_group)

    # ---- the loop -----------------------------------------------------------------------------

    def backward(self, loss: Tensor, outputs: Tensor) -> None:
        """``loss.backward()``, preceded on factor-update steps by the curvature pass that gives G.

        ``outputs`` is the tensor the model's forward returned, which ``loss`` was computed from;
        only that forward feeds the factors. Under a GradScaler pass the scaled loss
        (``scaler.scale(loss)``); the curvature pass does not depend on the scale.
        """
        self._engine.backward(loss, outputs)

    @property
    def damping(self) -> float:
        return self.param_groups[0]["damping"]

    @property
    def steps(self) -> int:
        """Steps taken (skipped ones do not count)."""
        return self._engine.steps

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients, directions or updates (GradScaler skips included)."""
        return self._engine.skipped_steps

    @property
    def last_rho(self) -> Optional[float]:
        """The reduction ratio of the last damping adaptation."""
        return self._engine.last_rho

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One K-FAC step. Returns True when it was taken, False when skipped.

        closure: only for adapt_damping; it evaluates the loss on the step's batch (the same data as
        the forward that fed backward()) and returns it; the step calls it without gradients before
        and after the update on adaptation steps. Under a GradScaler, ``scaler.step(opt)``.
        """
        group = _check_hyper(self.param_groups[0])
        engine = self._engine
        params = [p for p in group["params"] if p.grad is not None]
        adapt = group["adapt_damping"] and engine.steps % group["adapt_damping_interval"] == 0
        if adapt and closure is None:
            raise ValueError("adapt_damping=True: step(closure) needs a closure that returns the loss on the "
                             "step's batch")
        if not params:
            engine.discard()
            warn_user("KFAC.step(): no parameter has a gradient (call opt.backward(loss, outputs) first); nothing "
                      "was done and the step does not count")
            return False
        if any(p.grad.is_sparse for p in params):
            raise ValueError("KFAC does not support sparse gradients (nn.Embedding(sparse=True) or "
                             "nn.EmbeddingBag(sparse=True)): build those modules with sparse=False")
        engine.sync_gradients(params)  # data parallel without DistributedDataParallel

        # AMP: GradScaler.step sets these (torch.amp's contract for _step_supports_amp_scaling).
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        if found_inf is not None and float(found_inf) != 0.0:
            engine.skip(None)
            return False
        scale_value = None
        if grad_scale is not None:
            scale_value = float(grad_scale)
            by_device: Dict[torch.device, List[Tensor]] = {}
            for p in params:
                by_device.setdefault(p.grad.device, []).append(p.grad)
            for device, grads in by_device.items():  # one fused division per device
                torch._foreach_div_(grads, grad_scale.to(device))

        engine.prepare(scale_value)
        directions, blocks = engine.preconditioned()
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        dirs = [directions.get(id(p), p.grad) for p in params]
        clipped = [id(p) in directions for p in params]
        kl_clip = float(group["kl_clip"] or 0.0)
        adaptive = group["adaptive_step"]
        # the buffers as they are (None: not yet made): a skipped step must not make or cast them
        held = [None if adaptive or momentum == 0 else self.state.get(p, {}).get("momentum_buffer") for p in params]
        problem = self._step_problem(params, grads, dirs, held, clipped, 0.0 if adaptive else lr, momentum, wd,
                                     kl_clip, blocks)
        if problem is not None:
            engine.skip(f"KFAC: {problem}; the step is skipped (parameters, factors and momentum unchanged)")
            return False
        if adaptive:
            old_loss = self._closure_loss(closure) if adapt else None
            update = self._adaptive_update(group, params, directions)
            if update is None:
                return False
            updates, predicted = update
            engine.accept()
            for p, u in zip(params, updates):
                self.state[p]["prev_update"] = u
            torch._foreach_add_(params, updates)
            if adapt:
                self._adapt_damping(group, old_loss, self._closure_loss(closure), predicted)
            engine.step_done()
            return True

        # Trust region, weight decay, momentum and the update for every parameter in one op call.
        bufs = self._momentum_buffers(params, momentum)
        old_loss = self._closure_loss(closure) if adapt else None
        before = [p.detach().clone() for p in params] if adapt else []
        # The op updates in place, so a parameter stored with gaps or out of order (a transposed
        # view made a Parameter) goes through a contiguous copy.
        dense = [p if p.is_contiguous() else p.contiguous() for p in params]
        ops.kfac_update_(dense, dirs, grads, bufs, clipped, lr, momentum, wd, kl_clip, impl=engine.impl, _trusted=True)
        for p, q in zip(params, dense):
            if q is not p:
                p.copy_(q)
        engine.accept()  # after the update: an error in it leaves the factors as they were

        if adapt:
            new_loss = self._closure_loss(closure)
            deltas = {id(p): p.detach() - b for p, b in zip(params, before)}
            predicted = engine.quadratic_change(deltas, {id(p): g for p, g in zip(params, grads)}, blocks)
            self._adapt_damping(group, old_loss, new_loss, predicted)
        engine.step_done()
        return True

    def _momentum_buffers(self, params, momentum: float) -> List[Tensor]:
        if momentum == 0:
            return []
        bufs = []
        for p in params:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:  # zero: the first step's buffer is then d, as in SGD
                buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif buf.dtype != p.dtype or buf.device != p.device:  # the model moved (model.half(), .to(...))
                buf = state["momentum_buffer"] = buf.to(device=p.device, dtype=p.dtype)
            bufs.append(buf)
        return bufs

    def _step_problem(self, params, grads, dirs, held, clipped, lr, momentum, wd, kl_clip, blocks) -> Optional[str]:
        """What would make this step write a non-finite value (None: nothing), from one pass of
        2-norms over the gradients, directions, parameters and momentum buffers (``held``, None
        where there is none yet: zero) and one host sync in the usual case. The norms bound the
        entries: with momentum * |buf| + |d| + wd |p| and |p| + lr (...) within half the dtype's
        range nothing can overflow (nu <= 1; lr 0 checks the gradients and directions alone). Past
        that bound the update is tried on copies, exactly. A block's direction matrix stands for
        its parameters' directions (its norm bounds theirs; one contiguous tensor, not two views); a
        parameter that several blocks share (an attention's q, k and v rows) gets the root of the sum
        of their squared norms."""
        n = len(params)
        sources, source_of = [], {}
        for block in blocks:
            for q in block[1]:
                source_of.setdefault(id(q), []).append(len(sources))
            sources.append(block[5])
        for i, q in enumerate(params):
            if id(q) not in source_of:  # its direction is its gradient
                source_of[id(q)] = [len(sources)]
                sources.append(dirs[i])
        present = [i for i, buf in enumerate(held) if buf is not None]
        # the one host sync; the arithmetic on a few numbers per parameter is NumPy's
        norms = norms_of(list(grads) + sources + list(params) + [held[i] for i in present])
        norms = norms.cpu().numpy().astype(np.float64)
        k = len(sources)
        p = norms[n + k:2 * n + k]
        dn = norms[n:n + k]
        d = np.array([np.sqrt((dn[source_of[id(q)]] ** 2).sum()) for q in params])
        b = np.zeros(n)
        b[present] = norms[2 * n + k:]
        key = tuple(q.dtype for q in params)
        if getattr(self, "_limits_key", None) != key:
            self._limits = np.array([torch.finfo(dt).max / 2 for dt in key])
            self._limits_key = key
        if np.isfinite(norms).all():  # then the float64 arithmetic below cannot overflow
            step = momentum * b + d + wd * p
            if ((step <= self._limits) & (p + lr * step <= self._limits)).all():
                return None
        if not all_finite(grads):
            return "a gradient holds NaN or Inf"
        if not all_finite(dirs):
            return ("a preconditioned direction is not finite (an overflow: a low-precision model with a small "
                    "damping?)")
        if lr == 0:
            return None
        trial = [q.detach().clone(memory_format=torch.contiguous_format) for q in params]
        trial_bufs = [] if momentum == 0 else [torch.zeros_like(q) if buf is None else buf.to(q.dtype, copy=True)
                                               for q, buf in zip(trial, held)]
        ops.kfac_update_(trial, dirs, grads, trial_bufs, clipped, lr, momentum, wd, kl_clip, impl=self._engine.impl,
                         _trusted=True)
        if all_finite(trial + trial_bufs):
            return None
        return "the update would overflow the parameters or momentum buffers (a low-precision model with a large lr?)"

    def _adapt_damping(self, group: dict, old_loss: float, new_loss: float, predicted: float) -> None:
        """The LM rule on rho = actual / predicted change (not a number unless the model predicted a decrease)."""
        old_loss, new_loss = self._engine.mean_over_processes([old_loss, new_loss])  # data parallel: the global batch's
        rho = (new_loss - old_loss) / predicted if predicted < 0 else float("nan")
        self._engine.last_rho = rho
        self.param_groups[0]["damping"] = lm_damping(group["damping"], rho, group["adapt_damping_interval"],
                                                     group["min_damping"], group["max_damping"])

    def _adaptive_update(self, group: dict, params, directions: Dict[int, Tensor]):
        """Martens and Grosse (2015, section 7): the update alpha * Delta + mu * delta_prev with
        (alpha, mu) minimising the exact-GGN quadratic model
        M(d) = g^T d + 1/2 d^T (GGN + (damping + weight_decay) I) d on this step's batch, Delta the
        K-FAC direction (plain gradient outside K-FAC layers, weight decay included) and delta_prev
        the previous update. Returns the per-parameter updates (new tensors, nothing written yet)
        and the undamped model's predicted change of the loss, or None (the step skipped) when the
        update or the parameters it gives would not be finite."""
        lam, wd = group["damping"], group["weight_decay"]
        # Rows of one float64 workspace kept across steps (fresh vectors over every parameter each step
        # cost more than the products on them: autoencoder step 10.4 -> 8.4 ms): Delta, delta_prev, g,
        # the parameters, the update.
        W, rows = self._workspace(params)
        torch._foreach_copy_(rows[0], [directions.get(id(p), p.grad) for p in params])
        torch._foreach_copy_(rows[2], [p.grad for p in params])
        W[0].neg_()
        if wd:
            torch._foreach_copy_(rows[3], params)
            W[0].add_(W[3], alpha=-wd)
        prev = [self.state.get(p, {}).get("prev_update") for p in params]
        k = 2 if all(v is not None for v in prev) else 1
        if k == 2:
            torch._foreach_copy_(rows[1], prev)
        V = W[:k]

        gram = self._engine.ggn_gram(params, rows[:k]).to(V.device)
        dots, b_loss = V @ V.T, V @ W[2]
        b = b_loss + wd * (V @ W[3]) if wd else b_loss  # the gradient of the loss with the decay term
        C = gram + (lam + wd) * dots
        x = None
        try:
            x = torch.linalg.solve(C, -b)
        except RuntimeError:
            pass
        if x is None or not bool(torch.isfinite(x).all()):  # Delta parallel to delta_prev: Delta alone
            x = torch.zeros(k, dtype=torch.float64, device=V.device)
            x[0] = -b[0] / C[0, 0] if C[0, 0] > 0 else 0.0
        torch.mv(V.T, x.reshape(-1), out=W[4])
        # rounded to the parameters' dtype, as they are updated
        updates = [u.to(dtype=p.dtype, copy=True) for u, p in zip(rows[4], params)]
        if not all_finite(updates + list(torch._foreach_add(params, updates))):
            self._engine.skip("KFAC: the adaptive step's update is not finite; the step is skipped (parameters, "
                              "factors and momentum unchanged)")
            return None
        return updates, float(b_loss @ x + 0.5 * x @ gram @ x)

    def _workspace(self, params) -> Tuple[Tensor, List[List[Tensor]]]:
        """(5, P) float64 scratch over all of ``params`` and its rows as per-parameter views."""
        sizes = [p.numel() for p in params]
        key = (tuple(p.shape for p in params), params[0].device)
        if getattr(self, "_scratch_key", None) != key:
            W = torch.empty(5, sum(sizes), dtype=torch.float64, device=params[0].device)
            self._scratch = (W, [[v.view(p.shape) for v, p in zip(row.split(sizes), params)] for row in W])
            self._scratch_key = key
        return self._scratch

    def _closure_loss(self, closure) -> float:
        with torch.no_grad(), self._engine.suspended():
            value = closure()
        return float(value.detach().float() if isinstance(value, Tensor) else value)

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["kfac"] = self._engine.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()``. Everything is validated first (a bad entry raises ValueError
        naming it), so that a refused state leaves the optimizer exactly as it was."""
        if not isinstance(state_dict, dict) or "kfac" not in state_dict:
            raise ValueError("state_dict: not a KFAC state dict (no 'kfac' entry)")
        load_engine = self._engine.check_state_dict(state_dict["kfac"])
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict: not a KFAC state dict (no {key!r} entry)")
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != 1 or not isinstance(groups[0], dict):
            raise ValueError("state_dict: 'param_groups' must hold the one parameter group of a KFAC optimizer")
        saved_group = groups[0]
        params = self.param_groups[0]["params"]
        if len(saved_group.get("params", ())) != len(params):
            raise ValueError(f"state_dict: its parameter group has {len(saved_group.get('params', ()))} parameters, "
                             f"this optimizer's {len(params)}")
        merged = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        merged.update({k: v for k, v in saved_group.items() if k != "params"})
        try:
            _check_hyper(merged)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state_dict: param_groups[0]: {exc}") from None
        self._check_param_state(state_dict["state"], saved_group["params"], params)
        rest = {k: v for k, v in state_dict.items() if k != "kfac"}
        super().load_state_dict(rest)
        load_engine()

    @staticmethod
    def _check_param_state(state, ids, params) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"state_dict: 'state' must be a dict, got {type(state).__name__}")
        index = {i: p for i, p in zip(ids, params)}
        for i, entry in state.items():
            if i not in index or not isinstance(entry, dict):
                raise ValueError(f"state_dict: state entry {i!r} belongs to no parameter of this optimizer")
            for key, t in entry.items():
                if key not in ("momentum_buffer", "prev_update"):
                    raise ValueError(f"state_dict: state[{i!r}] has an unknown entry {key!r}")
                if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != index[i].shape:
                    raise ValueError(f"state_dict: state[{i!r}][{key!r}] must be a floating tensor of the parameter's "
                                     f"shape {tuple(index[i].shape)}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"state_dict: state[{i!r}][{key!r}] is not finite")

    def remove_hooks(self) -> None:
        """Detach from the model (its forwards are no longer recorded)."""
        self._engine.remove()


class KFACPreconditioner:
    """Rewrites the gradients of ``model``'s supported layers with their K-FAC directions, for any
    optimizer to follow::

        pre = KFACPreconditioner(model, loss="cross_entropy", lr=0.01)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        opt.zero_grad(); out = model(x); loss = F.cross_entropy(out, y)
        pre.backward(loss, out)
        pre.step()                # .grad <- KL-clipped (F_kfac + damping I)^-1 .grad, in place
        opt.step()

    Arguments as ``KFAC``, without momentum, weight decay and damping adaptation (the optimizer's
    business); ``lr`` only enters the KL clip and should be the optimizer's learning rate. Under a
    GradScaler call ``scaler.unscale_(opt)`` before ``pre.step()``. Attributes ``damping``, ``lr``,
    ``kl_clip``, ``factor_decay``, ``factor_update_freq``, ``inv_update_freq`` may be changed between
    steps.
    """

    _HYPER = ("lr", "damping", "factor_decay", "factor_update_freq", "inv_update_freq", "kl_clip")

    def __init__(self, model: nn.Module, *, lr: float = DEFAULTS["lr"], damping: float = DEFAULTS["damping"],
                 factor_decay: float = DEFAULTS["factor_decay"],
                 factor_update_freq: int = DEFAULTS["factor_update_freq"],
                 inv_update_freq: int = DEFAULTS["inv_update_freq"], kl_clip: Optional[float] = DEFAULTS["kl_clip"],
                 inverse: str = "eigen", fisher_type: str = "mc", mc_samples: int = 1, loss: Optional[str] = None,
                 reduction: str = "mean", kfac_approx: str = "expand", separate_weight_and_bias: bool = False,
                 max_consecutive_skips: Optional[int] = DEFAULTS["max_consecutive_skips"],
                 backend: str = "auto", seed: Optional[int] = None, grad_scaler=None,
                 structure: str = "block-diagonal", inverse_sharing: str = "eigenbases"):
        self.lr, self.damping, self.factor_decay, self.kl_clip = lr, damping, factor_decay, kl_clip
        self.factor_update_freq, self.inv_update_freq = factor_update_freq, inv_update_freq
        checked = _check_hyper(self._hyper())
        for k in self._HYPER:
            setattr(self, k, checked[k])
        self._engine = Engine(model, self._hyper, loss=loss, reduction=reduction, fisher_type=fisher_type,
                              mc_samples=mc_samples, kfac_approx=kfac_approx,
                              separate_weight_and_bias=separate_weight_and_bias, inverse=inverse, backend=backend,
                              seed=seed, grad_scaler=grad_scaler, max_consecutive_skips=max_consecutive_skips,
                              owner="KFACPreconditioner", structure=structure, inverse_sharing=inverse_sharing)
        # data parallel without DistributedDataParallel: every gradient the next optimizer reads is averaged
        self._all_params = [p for p in model.parameters() if p.requires_grad]
        if self._engine.unsupported:
            warnings.warn(f"K-FAC does not cover {', '.join(self._engine.unsupported)}; the gradients of parameters "
                          "that no covered layer holds are left as they are", UserWarning, stacklevel=2)

    __deepcopy__ = __copy__ = __reduce_ex__ = __getstate__ = refuse_copy

    def _hyper(self) -> dict:
        h = dict(DEFAULTS)
        h.update({k: getattr(self, k) for k in self._HYPER})
        return h

    def backward(self, loss: Tensor, outputs: Tensor) -> None:
        """``loss.backward()``, preceded on factor-update steps by the curvature pass that gives G;
        ``outputs`` is the tensor the model's forward returned (see ``KFAC.backward``)."""
        self._engine.backward(loss, outputs)

    @property
    def steps(self) -> int:
        return self._engine.steps

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients or directions."""
        return self._engine.skipped_steps

    @torch.no_grad()
    def step(self) -> bool:
        """Precondition the gradients in place. Returns False (gradients and factors untouched) when a
        gradient or a direction is not finite, so that the optimizer's step (or the GradScaler) can
        skip as well, and when there are no gradients at all (that step does not count)."""
        h = _check_hyper(self._hyper())
        engine = self._engine
        params = [p for layer in engine.layers for p in (layer.weight, layer.bias)
                  if p is not None and p.grad is not None]
        if not params:
            engine.discard()
            warn_user("KFACPreconditioner.step(): no K-FAC layer has a gradient (call pre.backward(loss, outputs) "
                      "first); nothing was done and the step does not count")
            return False
        engine.sync_gradients([p for p in self._all_params if p.grad is not None])
        engine.prepare(None)
        directions, blocks = engine.preconditioned()
        clipped = [p for p in params if id(p) in directions]
        dirs = [directions[id(p)] for p in clipped]
        grads = [p.grad for p in params]
        # one pass, one sync; each block's direction matrix stands for its parameters' (contiguous, once)
        if not all_finite(grads + [block[5] for block in blocks]):
            problem = ("a gradient holds NaN or Inf" if not all_finite(grads) else
                       "a preconditioned direction is not finite (an overflow: a low-precision model with a small "
                       "damping?)")
            # under a GradScaler skips are routine: silent
            engine.skip(None if engine.grad_scaler is not None else
                        f"KFACPreconditioner: {problem}; gradients left as they are and factors unchanged")
            return False
        engine.accept()
        nu = reference.kl_nu(dirs, [p.grad for p in clipped], [True] * len(clipped), h["lr"], h["kl_clip"] or 0.0)
        for p, d in zip(clipped, dirs):
            p.grad.copy_(d * nu.to(d.dtype))
        engine.step_done()
        return True

    def state_dict(self) -> dict:
        sd = self._engine.state_dict()
        sd["hyper"] = {k: getattr(self, k) for k in self._HYPER}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()``, validated completely first: a bad entry raises ValueError naming
        it and leaves the preconditioner exactly as it was."""
        if not isinstance(state_dict, dict) or "hyper" not in state_dict:
            raise ValueError("state_dict: not a KFACPreconditioner state dict (no 'hyper' entry)")
        hyper = state_dict["hyper"]
        if not isinstance(hyper, dict) or set(hyper) != set(self._HYPER):
            raise ValueError(f"state_dict: entry 'hyper' must hold exactly {sorted(self._HYPER)}")
        h = dict(DEFAULTS)
        h.update(hyper)
        try:
            checked = _check_hyper(h)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state_dict: hyper: {exc}") from None
        load_engine = self._engine.check_state_dict(state_dict)
        for k in self._HYPER:
            setattr(self, k, checked[k])
        load_engine()

    def remove_hooks(self) -> None:
        self._engine.remove()
