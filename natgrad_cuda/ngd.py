"""``NGD``: exact natural-gradient descent, a torch.optim.Optimizer.

The direction is (F + damping I)^-1 g with F the exact GGN (``fisher_type="type-2"``) or the
empirical Fisher (``"empirical"``) of the step's batch, in the conventions of ``curvature.ggn`` and
``curvature.empirical_fisher`` (docs/curvature.md), or its layer-wise block-diagonal part
(``blocks="layer"``: one exact block per module holding parameters).

F is never formed as a (P, P) matrix when the batch has fewer rows than parameters, and the
Jacobian never as a dense matrix. With the flattened outputs f (terms, C), J = df/dtheta, the loss
Hessian of each term H_r = S_r S_r^T (the empirical Fisher: S_r the term's own gradient, one
column), and U = S^T J / sqrt(Z) of shape (m, P), F = U^T U and, by the Woodbury identity,

    (U^T U + lambda I)^-1 g = (g - U^T (lambda I + U U^T)^-1 U g) / lambda,

an (m, m) solve. U^T w is one reverse-mode product through the forward's own graph, U x a
forward-mode product (the reverse of a reverse: the graph of w -> J^T w differentiated with
respect to w), both batched over many vectors; U U^T comes from m of each, a few vectors at a time,
so memory stays O(chunk * P + m^2). When m >= P (or a layer's block is that small), F is built in
parameter space from the same products and solved directly. Because the products go through the
graph of the user's own forward, dropout masks and batch statistics are those of the gradient.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from ._checks import check_number, refuse_copy, warn_user
from ._finite import all_finite
from .curvature._losses import LOSS_NAMES, LossSpec, class_dim_is_last

__all__ = ["NGD", "NGD_FISHER_TYPES", "NGD_BLOCKS"]

NGD_FISHER_TYPES = ("type-2", "empirical")
NGD_BLOCKS = ("full", "layer")
# Elements of the (chunk, P) block of U^T rows held at once (float64: 256 MB).
_CHUNK_ELEMENTS = 1 << 25


def _check_hyper(h: dict) -> dict:
    out = dict(h)
    out["lr"] = check_number("lr", h["lr"], low=0.0)
    out["damping"] = check_number("damping", h["damping"], low=0.0, low_open=True)
    out["momentum"] = check_number("momentum", h["momentum"], low=0.0, high=1.0, high_open=True)
    out["weight_decay"] = check_number("weight_decay", h["weight_decay"], low=0.0)
    out["kl_clip"] = check_number("kl_clip", h["kl_clip"], low=0.0, low_open=True, allow_none=True)
    return out


class _Jacobian:
    """U = S^T J / sqrt(Z) of one batch, as products: ``t(W)`` = U^T w for each row w of W (m,),
    ``n(X)`` = U x for parameter-space vectors x, both for any subset of the parameters."""

    def __init__(self, f: Tensor, S: Tensor, z: float):
        self.f, self.S = f, S  # f (terms, C) in the forward's graph; S (terms, C, k), detached
        self.scale = 1.0 / math.sqrt(z)
        self.terms, self.k = S.shape[0], S.shape[2]
        self.m = self.terms * self.k
        self._dual: dict = {}

    def t(self, W: Tensor, params: List[Tensor]) -> List[Tensor]:
        """U^T w for each of the b rows of W (b, m): per parameter (b, *shape)."""
        cot = torch.einsum("rck,brk->brc", self.S, W.to(self.S.dtype).view(-1, self.terms, self.k)) * self.scale
        grads = _batched_grad(self.f, params, cot.to(self.f.dtype))
        return [torch.zeros((W.shape[0], *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                for g, p in zip(grads, params)]

    def n(self, X: List[Tensor], params: List[Tensor]) -> Tensor:
        """U x for b parameter-space vectors (per parameter (b, *shape)): (b, m)."""
        key = tuple(id(p) for p in params)
        if key not in self._dual:
            # h(w) = J^T w, with its graph: differentiating it with respect to w gives J x
            w = torch.zeros_like(self.f, requires_grad=True)
            h = torch.autograd.grad(self.f, params, w, create_graph=True, allow_unused=True)
            self._dual[key] = (w, [(hi, i) for i, hi in enumerate(h) if hi is not None and hi.requires_grad])
        w, live = self._dual[key]
        b = X[0].shape[0]
        if not live:  # outputs independent of these parameters
            return torch.zeros(b, self.m, dtype=self.S.dtype, device=self.S.device)
        (Jx,) = _batched_grad([hi for hi, _ in live], [w], [X[i].to(hi.dtype) for hi, i in live])
        return torch.einsum("rck,brc->brk", self.S, Jx.to(self.S.dtype)).reshape(b, self.m) * self.scale


def _batched_grad(outputs, inputs: List[Tensor], grad_outputs) -> Tuple[Optional[Tensor], ...]:
    """torch.autograd.grad for a batch of grad_outputs (leading dimension b), the graph kept; one
    call at a time where an operation has no batching rule."""
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
    except RuntimeError:
        single = isinstance(grad_outputs, Tensor)
        b = (grad_outputs if single else grad_outputs[0]).shape[0]
        rows = [torch.autograd.grad(outputs, inputs, grad_outputs[i] if single else [g[i] for g in grad_outputs],
                                    retain_graph=True, allow_unused=True) for i in range(b)]
        return tuple(None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(inputs)))


def _flat(tensors: List[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def _batched_flat(tensors: List[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.reshape(t.shape[0], -1).to(dtype) for t in tensors], dim=1)


def _split(v: Tensor, params: List[Tensor]) -> List[Tensor]:
    out, i = [], 0
    for p in params:
        out.append(v[..., i:i + p.numel()].reshape(*v.shape[:-1], *p.shape).to(p.dtype))
        i += p.numel()
    return out


def _solve_spd(K: Tensor, rhs: Tensor) -> Tensor:
    """K^-1 rhs for a symmetric positive definite K (float64): Cholesky, or a least-squares solve
    when rounding made K indefinite."""
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
    return torch.linalg.lstsq(K, rhs.unsqueeze(-1)).solution.squeeze(-1)


def natural_direction(jac: _Jacobian, params: List[Tensor], grads: List[Tensor], damping: float) -> List[Tensor]:
    """(U^T U + damping I)^-1 g for the parameters ``params`` (U restricted to them), in float64:
    the Woodbury form when U has fewer rows than columns, the parameter-space one otherwise."""
    dtype, device = torch.float64, grads[0].device
    size = sum(p.numel() for p in params)
    g = _flat(grads, dtype)
    chunk = max(1, min(jac.m, _CHUNK_ELEMENTS // max(size, jac.m)))
    if jac.m < size:
        K = torch.empty(jac.m, jac.m, dtype=dtype, device=device)
        eye = torch.eye(jac.m, dtype=dtype, device=device)
        for i in range(0, jac.m, chunk):
            K[i:i + chunk] = jac.n(jac.t(eye[i:i + chunk], params), params).to(dtype)
        K = 0.5 * (K + K.T)
        K.diagonal().add_(damping)
        y = _solve_spd(K, jac.n(_split(g.unsqueeze(0), params), params)[0].to(dtype))
        d = (g - _batched_flat(jac.t(y.unsqueeze(0), params), dtype)[0]) / damping
    else:
        F = torch.zeros(size, size, dtype=dtype, device=device)
        eye = torch.eye(jac.m, dtype=dtype, device=device)
        for i in range(0, jac.m, chunk):
            W = _batched_flat(jac.t(eye[i:i + chunk], params), dtype)
            F.addmm_(W.T, W)
        F.diagonal().add_(damping)
        d = _solve_spd(F, g)
    return _split(d, params)


def layer_blocks(model: nn.Module, params: List[Tensor]) -> List[List[Tensor]]:
    """``params`` grouped by the module that holds them (weight and bias of a layer together), in
    ``model.named_modules()`` order; a parameter shared by several modules goes with the first."""
    wanted, seen, blocks = {id(p) for p in params}, set(), []
    for _, module in model.named_modules():
        block = [p for p in module.parameters(recurse=False) if id(p) in wanted and id(p) not in seen]
        seen.update(id(p) for p in block)
        if block:
            blocks.append(block)
    return blocks


class NGD(torch.optim.Optimizer):
    """Exact natural-gradient descent: every step, (F + damping I)^-1 g on the step's batch, F the
    exact GGN (``fisher_type="type-2"``) or the empirical Fisher (``"empirical"``) of all trainable
    parameters (``blocks="full"``) or its block-diagonal part with one block per module
    (``blocks="layer"``, weight and bias together). Any model whose forward autograd can
    differentiate twice; one batch per step.

    Use::

        opt = NGD(model, lr=1.0, damping=1e-3, loss="mse")
        opt.zero_grad(); out = model(x); loss = F.mse_loss(out, y)
        opt.backward(loss, out)   # loss.backward(), keeping the forward's graph for the step
        opt.step()

    Arguments (keyword-only): lr; damping (lambda > 0); loss ("cross_entropy", "mse", "bce") and
    reduction ("mean", "sum", "batchmean") of the loss computed from the outputs; fisher_type;
    blocks; momentum and weight_decay as torch.optim.SGD (weight decay added to the natural
    direction, not preconditioned); kl_clip: the trust region nu = min(1, sqrt(kl_clip / (lr^2
    <d, g>))) as KFAC's (None: off).

    The step uses the parameters' ``.grad`` as they are at ``step()`` (after any clipping), and the
    curvature of the forward passed to ``opt.backward``; a step whose direction is not finite is
    skipped with a warning. Cost: m reverse- and m forward-mode products per step (m = terms * C for
    "type-2", terms for "empirical"; per block for "layer"), plus an (m, m) Cholesky per block.
    """

    def __init__(self, model: nn.Module, *, lr: float = 1.0, damping: float = 1e-3, loss: Optional[str] = None,
                 reduction: str = "mean", fisher_type: str = "type-2", blocks: str = "full", momentum: float = 0.0,
                 weight_decay: float = 0.0, kl_clip: Optional[float] = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss is None:
            raise ValueError(f"NGD needs loss=, one of {LOSS_NAMES}")
        self.spec = LossSpec.from_name(loss, reduction)
        if fisher_type not in NGD_FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {NGD_FISHER_TYPES}, got {fisher_type!r}")
        if blocks not in NGD_BLOCKS:
            raise ValueError(f"blocks must be one of {NGD_BLOCKS}, got {blocks!r}")
        defaults = _check_hyper(dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                                     kl_clip=kl_clip))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        super().__init__(params, defaults)
        self.fisher_type, self.blocks = fisher_type, blocks
        self._model = model
        self._blocks = layer_blocks(model, params) if blocks == "layer" else [params]
        self._forwards: List[weakref.ref] = []  # the outputs of the model's forwards since the last step
        self._pending: Optional[Tuple[Tensor, Tensor]] = None  # (loss, outputs) of opt.backward
        self._class_last: dict = {}
        self.skipped_steps = 0
        self._handle = model.register_forward_hook(_OutputsHook(self))

    __deepcopy__ = __copy__ = __reduce_ex__ = __getstate__ = refuse_copy

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "param_groups", None):
            raise ValueError("NGD holds one parameter group (all of the model's trainable parameters)")
        super().add_param_group(param_group)

    def _saw(self, output) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor):
            self._forwards = [r for r in self._forwards if r() is not None] + [weakref.ref(output)]

    def backward(self, loss: Tensor, outputs: Tensor) -> None:
        """``loss.backward()``, keeping the graph of the forward that returned ``outputs`` (the
        model's output tensor, which ``loss`` was computed from) until ``step()``."""
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss must be a scalar tensor, got {loss!r:.80}")
        if not isinstance(outputs, Tensor):
            raise ValueError(f"outputs must be the model's output tensor, got {type(outputs).__name__}")
        if not loss.requires_grad or not outputs.requires_grad:
            raise ValueError("loss and outputs must require grad (not computed under torch.no_grad(), not detached)")
        if not any(r() is outputs for r in self._forwards):
            raise ValueError("outputs is not the tensor a forward of this optimizer's model returned since the last "
                             "step(): pass model(...)'s output itself, which the loss was computed from")
        if self._pending is not None:
            raise ValueError("NGD takes one batch per step: opt.backward was already called since the last step(); "
                             "call step() (or zero_grad() to drop that batch) first")
        (dl,) = torch.autograd.grad(loss, outputs, retain_graph=True)
        if self.spec.name == "cross_entropy" and outputs.dim() >= 3:
            key = tuple(outputs.shape[1:])
            if key not in self._class_last:
                last = class_dim_is_last(dl, outputs.shape)
                if last is None:
                    raise ValueError("cross-entropy outputs of 3+ dimensions with a zero gradient: the class "
                                     "dimension cannot be told on this batch")
                self._class_last[key] = last
        loss.backward(retain_graph=True)
        self._pending = (outputs, dl.detach())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending = None  # a batch whose gradient is dropped is not stepped on either
        super().zero_grad(set_to_none)

    def _flatten(self, t: Tensor) -> Tensor:
        if self._class_last.get(tuple(t.shape[1:])) and t.dim() >= 3:
            return t.reshape(-1, t.shape[-1])
        return self.spec.flatten_outputs(t)

    def _jacobian(self, outputs: Tensor, dl: Tensor) -> _Jacobian:
        f = self._flatten(outputs)
        z = self.spec.divisor(f.shape[0], f.shape[1], outputs.shape[0])
        fd = f.detach().double()
        if self.fisher_type == "type-2":
            S = self.spec.hessian_sqrt(fd)
        else:  # the terms' own gradients: the loss's gradient times its divisor
            S = (self._flatten(dl).double() * z).unsqueeze(-1)
        return _Jacobian(f, S, z)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> bool:
        """One natural-gradient step on the batch of the last ``opt.backward``. Returns True when
        taken, False when skipped (a non-finite gradient or direction)."""
        if closure is not None:
            raise ValueError("NGD.step() takes no closure")
        group = _check_hyper(self.param_groups[0])
        if self._pending is None:
            raise RuntimeError("NGD.step(): call opt.backward(loss, outputs) first; NGD needs the forward's graph "
                               "(a plain loss.backward() gives only the gradient)")
        outputs, dl = self._pending
        self._pending = None
        self._forwards = []
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            warn_user("NGD.step(): no parameter has a gradient; nothing was done")
            return False
        grads = [p.grad for p in params]
        directions = {}
        if all_finite(grads):
            with torch.enable_grad():
                jac = self._jacobian(outputs, dl)
                for block in self._blocks:
                    mine = [p for p in block if p.grad is not None]
                    if mine:
                        for p, d in zip(mine, natural_direction(jac, mine, [p.grad for p in mine], group["damping"])):
                            directions[p] = d
            del jac
        dirs = [directions.get(p) for p in params]
        if any(d is None for d in dirs) or not all_finite(dirs):
            self.skipped_steps += 1
            warn_user(f"NGD: the gradient or the natural direction holds NaN or Inf; the step is skipped "
                      f"({self.skipped_steps} skipped so far)")
            return False
        momentum = group["momentum"]
        bufs = []
        if momentum != 0:
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                bufs.append(state["momentum_buffer"])
        # the op updates in place: a parameter stored with gaps goes through a contiguous copy
        dense = [p if p.is_contiguous() else p.contiguous() for p in params]
        ops.kfac_update_(dense, dirs, grads, bufs, [True] * len(params), group["lr"], momentum,
                         group["weight_decay"], float(group["kl_clip"] or 0.0))
        for p, q in zip(params, dense):
            if q is not p:
                p.copy_(q)
        return True

    def remove_hooks(self) -> None:
        """Detach the optimizer from its model (its forwards are no longer watched)."""
        self._handle.remove()


class _OutputsHook:
    """The model's forward hook, through a weak reference (a dropped optimizer is not kept alive;
    a copy of the model gets a hook that does nothing)."""

    __slots__ = ("_target",)

    def __init__(self, target: NGD):
        self._target = weakref.ref(target)

    def __call__(self, module, args, output):
        target = self._target()
        if target is not None:
            target._saw(output)

    def __deepcopy__(self, memo):
        return _Inert()

    def __reduce__(self):
        return (_Inert, ())


class _Inert:
    def __call__(self, *args, **kwargs):
        return None
