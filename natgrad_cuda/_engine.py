"""The K-FAC machinery shared by ``KFAC`` and ``KFACPreconditioner``: hooks that record the rows of
the Kronecker factors, their exponential moving averages, the damped eigenbasis inverses and the
preconditioned directions.

The factors follow the curvature layer's conventions (``natgrad_cuda.curvature``, CURVATURE.md): the
rows come from ``curvature._layers``, the backward scalars of each Fisher type from
``curvature.kfac``. The heavy lifting goes through the batched ops with ``impl`` = the backend:
``ops.factor_update_`` (factor accumulation), ``ops.eigh_batched`` (inverses) and
``ops.precondition`` (directions); ``KFAC`` finishes the step with ``ops.kfac_update_``. One step's
contribution is gathered in pending sums and enters the moving averages only in ``commit``, after
the gradients proved finite, so that a skipped step leaves the factors alone.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from .curvature import _layers
from .curvature._losses import LOSS_NAMES, REDUCTIONS, LossSpec
from .curvature.exact import load_forward_ad
from .curvature.kfac import FISHER_TYPES, KFAC_APPROXES, _backward_scalars, _flush, _is_joint
from .reference import INVERSES, accumulation_dtype

__all__ = ["Engine", "BACKENDS", "check_number"]

BACKENDS = ("auto", "reference", "native", "emulated")
# The Fisher types whose G needs the loss: the sampled or exact loss Hessian, or the normaliser Z.
_NEEDS_LOSS = ("mc", "type-2", "empirical")


def check_number(name: str, value, *, low: float = None, high: float = None, low_open: bool = False,
                 integer: bool = False, allow_none: bool = False):
    """Validate one hyperparameter; the ValueError names it."""
    if value is None and allow_none:
        return None
    kind = "an int" if integer else "a real number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return value


_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def warn_user(message: str, category=RuntimeWarning) -> None:
    """A warning attributed to the first caller outside natgrad_cuda and torch (the user's
    ``opt.step()``), however many wrappers (no_grad, torch.optim's hooks, GradScaler) lie between."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level - 1 if frame is None else level)


def all_finite(tensors: List[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one sync in the usual case. The 2-norms
    come from one vectorised pass; they are finite unless an entry is not or the sum of squares
    overflows, so only a non-finite 2-norm pays for the exact test (max-norms, which cannot overflow
    but are a slower, unvectorised reduction on the CPU)."""
    if not tensors:
        return True
    if bool(torch.stack(torch._foreach_norm(tensors, 2)).isfinite().all()):
        return True
    return bool(torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all())


class _Layer:
    """One K-FAC layer: its parameters and how its gradient becomes the (out, in[+1]) matrix M."""

    def __init__(self, name: str, module: nn.Module, joint: bool):
        self.name, self.module, self.joint = name, module, joint
        self.weight = module.weight
        self.bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        self.out_dim = self.weight.shape[0]
        self.in_dim = self.weight[0].numel() + int(joint)
        self.factor_dtype = accumulation_dtype(self.weight.dtype)

    def blocks(self) -> List[Tuple[List[Tensor], bool]]:
        """(parameters, is the separate bias) per preconditioned block: [W | b] jointly, or W and b
        apart (b with A = 1, the bias block of CURVATURE.md being G alone)."""
        if self.joint:
            return [([self.weight, self.bias], False)]
        if self.bias is None:
            return [([self.weight], False)]
        return [([self.weight], False), ([self.bias], True)]


def block_matrix(params: List[Tensor], tensors: List[Tensor]) -> Tensor:
    """Parameter-shaped tensors (weight, bias) of one block as the (out, in[+1]) matrix."""
    cols = [t.reshape(params[0].shape[0], -1) for t in tensors]
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)


def split_block(params: List[Tensor], M: Tensor) -> List[Tensor]:
    """Inverse of ``block_matrix``: the block matrix M back to parameter-shaped tensors."""
    if len(params) == 1:
        return [M.reshape(params[0].shape)]
    w, b = params
    return [M[:, :-1].reshape(w.shape), M[:, -1].reshape(b.shape)]


class _Record:
    """One recorded forward of the model: its batch size and loss normaliser Z (from its outputs)."""

    __slots__ = ("n", "z", "counted", "targets")

    def __init__(self):
        self.n: Optional[int] = None
        self.z: Optional[int] = None
        self.counted = False
        # Per layer call, its input (or, where that needs no gradient, its weight): the curvature
        # pass differentiates with respect to these, which reaches every layer's output (and so its
        # hook) without the weight-gradient products of the other layers.
        self.targets: List[Tensor] = []


class Engine:
    """Hooks, factors and inverses of one model. ``hyper()`` returns the current hyperparameters
    (a param group of ``KFAC`` or the preconditioner's own dict), read at every use so that
    schedulers and damping adaptation take effect at once."""

    def __init__(self, model: nn.Module, hyper: Callable[[], dict], *, loss: Optional[str], reduction: str,
                 fisher_type: str, mc_samples: int, kfac_approx: str, separate_weight_and_bias: bool,
                 inverse: str, backend: str, seed: Optional[int], grad_scaler):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if loss is None and fisher_type in _NEEDS_LOSS:
            raise ValueError(
                f"fisher_type={fisher_type!r} needs loss= (one of {LOSS_NAMES}): the loss's Hessian and "
                "normaliser define G; only fisher_type='forward-only' works without it"
            )
        if loss is not None and loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {LOSS_NAMES} or None, got {loss!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_number("mc_samples", mc_samples, low=1, integer=True)
        if kfac_approx not in KFAC_APPROXES:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROXES}, got {kfac_approx!r}")
        if not isinstance(separate_weight_and_bias, bool):
            raise ValueError(f"separate_weight_and_bias must be a bool, got {separate_weight_and_bias!r}")
        if inverse not in INVERSES:
            raise ValueError(f"inverse must be one of {INVERSES}, got {inverse!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        if grad_scaler is not None and not hasattr(grad_scaler, "get_scale"):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}")

        found, unsupported = _layers.find_layers(model)
        if not found:
            raise ValueError(
                "model has no layer K-FAC supports (nn.Linear, nn.Conv1d, nn.Conv2d with zero padding and a "
                "trainable weight)"
            )
        for name, module in found:
            if not module.weight.requires_grad:
                raise ValueError(f"layer {name!r}: K-FAC needs its weight trainable (a frozen weight with a "
                                 "trainable bias is not supported)")
        self.unsupported = unsupported
        slots, _ = _layers.parameter_slots(model, found)
        self.layers = [_Layer(name, module, _is_joint(slots[name], separate_weight_and_bias)
                              and module.bias.requires_grad) for name, module in found]
        self.model, self.hyper = model, hyper
        self.spec = LossSpec.from_name(loss, reduction) if loss is not None else None
        self.fisher_type, self.kfac_approx, self.inverse = fisher_type, kfac_approx, inverse
        self.mc_samples = mc_samples if fisher_type == "mc" else 1
        self.impl = None if backend == "auto" else backend
        self.grad_scaler = grad_scaler

        device = self.layers[0].weight.device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))

        self._buffers: Dict[Tuple[str, str], Tensor] = {}  # this step's sums of A and G, reused
        # [X, 1] rows for A of a joint weight-and-bias block; G's rows as they are.
        self._append_ones = {(k, layer.name): k == "A" and layer.joint for layer in self.layers for k in ("A", "G")}
        self.steps = 0  # completed (not skipped) steps
        self.state: Dict[str, Dict[str, Tensor]] = {layer.name: {} for layer in self.layers}
        self.last_rho: Optional[float] = None
        self._reset_pending()
        # During the curvature passes of backward(); otherwise "empirical" lets loss.backward() feed G.
        self._grad_mode = "empirical" if fisher_type == "empirical" else None
        self._record: Optional[_Record] = None
        self._suspended = False
        # Layer hooks before the root's forward hook: a model that is itself one layer needs its
        # layer hook to run while the forward's record is still open.
        self.keep_inputs = False  # set by KFAC(adaptive_step=True): the last forward's inputs, for J v
        self.last_inputs = None
        self._handles = [model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)]
        self._handles += [layer.module.register_forward_hook(self._layer_hook(layer)) for layer in self.layers]
        self._handles.append(model.register_forward_hook(self._root_hook))

    # ---- recording ----------------------------------------------------------------------------

    def _reset_pending(self) -> None:
        self._rows_A: List[Tuple[str, Tensor, float]] = []
        self._rows_G: List[Tuple[str, Tensor, float]] = []
        self._rows_G_empirical: List[Tuple[str, Tensor, float]] = []
        self._sums: Dict[Tuple[str, str], Tensor] = {}  # ("A" or "G", layer name): this step's sum
        self._records: List[_Record] = []
        self._g_divisor = 0.0

    def factor_step_due(self) -> bool:
        return self.steps % self.hyper()["factor_update_freq"] == 0

    def inverse_step_due(self) -> bool:
        return self.steps % self.hyper()["inv_update_freq"] == 0

    def _root_pre_hook(self, module, args, kwargs):
        if self.keep_inputs and torch.is_grad_enabled() and not self._suspended:
            self.last_inputs = (args, kwargs)
        capture = torch.is_grad_enabled() and not self._suspended and self.factor_step_due()
        self._record = _Record() if capture else None
        if capture:
            self._records.append(self._record)

    def _root_hook(self, module, args, output):
        if self._record is not None and isinstance(output, Tensor):
            self._note_outputs(self._record, output)
        self._record = None

    def _note_outputs(self, record: _Record, outputs: Tensor) -> None:
        if outputs.dim() < 2:
            raise ValueError(f"model outputs must be batched with a class / feature dimension, got shape "
                             f"{tuple(outputs.shape)}")
        record.n = outputs.shape[0]
        if self.spec is not None:
            record.z = self.spec.normalizer(*self.spec.flatten_outputs(outputs).shape)

    def _layer_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            record = self._record
            if record is None:
                return
            x = inputs[0]
            self._rows_A.append((layer.name, *_layers.input_rows(layer.name, module, x, self.kfac_approx)))
            record.targets.append(x if isinstance(x, Tensor) and x.requires_grad else module.weight)
            if self.fisher_type != "forward-only" and isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda g: self._grad_hook(layer, record, g))

        return hook

    def _grad_hook(self, layer: _Layer, record: _Record, g: Tensor) -> None:
        mode = self._grad_mode
        if mode is None or record not in self._records:  # a stale forward of a finished step
            return
        rows = _layers.grad_rows(layer.module, g, self.kfac_approx)
        if mode == "curvature":
            self._rows_G.append((layer.name, rows, 1.0))
        else:  # the loss's own gradient g_loss = g_phi / Z (mean): G gets Z^2 g g^T / sum(Z)
            if record.z is None:
                raise ValueError("fisher_type='empirical': the model's output is not a tensor, so its loss "
                                 "normaliser is unknown; call opt.backward(loss, outputs)")
            if not record.counted:
                record.counted = True
                self._g_divisor += record.z if self.spec.reduction == "mean" else 0.0
            scale = float(record.z) ** 2 if self.spec.reduction == "mean" else 1.0
            self._rows_G_empirical.append((layer.name, rows, scale))

    def backward(self, loss: Tensor, outputs: Tensor) -> None:
        """loss.backward(), preceded on factor-update steps by the curvature passes that give G."""
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss must be a scalar tensor, got {loss!r:.80}")
        if not isinstance(outputs, Tensor):
            raise ValueError(f"outputs must be the model's output tensor, got {type(outputs).__name__}")
        record = self._records[-1] if self._records else None
        if record is not None and self.factor_step_due():
            self._note_outputs(record, outputs)
            if self.fisher_type in ("mc", "type-2"):
                self._curvature_passes(record, outputs)
            record.targets = []  # done with them: no layer inputs held past the backward
        loss.backward()
        self.flush()

    def _curvature_passes(self, record: _Record, outputs: Tensor) -> None:
        f = self.spec.flatten_outputs(outputs)
        if f.dtype in (torch.float16, torch.bfloat16):  # sample and build S in fp32 under autocast
            f = f.float()
        if not bool(torch.isfinite(f).all()):
            return  # a diverged model: no curvature from it (its gradients will skip the step)
        z = self.spec.normalizer(*f.shape)
        self._g_divisor += self.mc_samples * (z if self.spec.reduction == "mean" else 1)
        targets = record.targets or [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]
        self._grad_mode = "curvature"
        try:
            for phi in _backward_scalars(self.spec, self.fisher_type, f, None, self.mc_samples, self.generator):
                # .grad stays untouched; the output hooks record g on the way.
                torch.autograd.grad(phi, targets, retain_graph=True, allow_unused=True)
        finally:
            self._grad_mode = "empirical" if self.fisher_type == "empirical" else None

    def flush(self, empirical_scale: Optional[float] = None) -> None:
        """Accumulate the recorded rows into this step's pending sums, A's and G's of every layer in
        one op call (one parallel region, balanced over all of them).

        The empirical rows wait for ``empirical_scale`` (1 / GradScaler scale^2, known at the step).
        """
        rows = [(("A", n), r, s) for n, r, s in self._rows_A] + [(("G", n), r, s) for n, r, s in self._rows_G]
        self._rows_A, self._rows_G = [], []
        if empirical_scale is not None:
            rows += [(("G", n), r, s * empirical_scale) for n, r, s in self._rows_G_empirical]
            self._rows_G_empirical = []
        if not rows:
            return
        # A layer's first rows of the step overwrite its buffer (decay 0: the buffers live across
        # steps and are never zeroed); later rows add to it.
        fresh, more, seen = [], [], set()
        for item in rows:
            (fresh if item[0] not in self._sums and item[0] not in seen else more).append(item)
            seen.add(item[0])
        for key, _, _ in fresh:
            self._sums[key] = self._buffer(*key)
        _flush(self._sums, fresh, self._append_ones, self.impl, decay=0.0, trusted=True)
        _flush(self._sums, more, self._append_ones, self.impl, trusted=True)

    def _buffer(self, which: str, name: str) -> Tensor:
        buf = self._buffers.get((which, name))
        if buf is None:
            layer = next(layer for layer in self.layers if layer.name == name)
            d = layer.in_dim if which == "A" else layer.out_dim
            buf = self._buffers[(which, name)] = torch.empty(d, d, dtype=layer.factor_dtype, device=layer.weight.device)
        return buf

    def discard(self) -> None:
        """Forget this step's recordings (a skipped step)."""
        self._reset_pending()

    # ---- the step -----------------------------------------------------------------------------

    def grads_finite(self, params: List[Tensor], warning: Optional[str]) -> bool:
        """Whether every gradient is finite; if not, this step's recordings are dropped and
        ``warning`` (when given) is issued, so that the caller can skip the step."""
        grads = [p.grad for p in params if p.grad is not None]
        if all_finite(grads):
            return True
        if warning is not None:
            warn_user(warning)
        self.discard()
        return False

    def commit(self, grad_scale: Optional[float]) -> None:
        """This step's factors into the moving averages, then the eigendecompositions when due."""
        if self._records or self._sums or self._rows_A:
            scale = 1.0
            if self.fisher_type == "empirical":
                s = grad_scale if grad_scale is not None else (
                    self.grad_scaler.get_scale() if self.grad_scaler is not None and self.grad_scaler.is_enabled()
                    else 1.0)
                scale = 1.0 / (s * s)
            self.flush(empirical_scale=scale)
            self._commit_factors()
        self._reset_pending()
        if self.inverse_step_due() or any("QA" not in st for st in self._updated_states()):
            self.update_inverses()

    def _updated_states(self):
        return [st for st in self.state.values() if "A" in st]

    def _commit_factors(self) -> None:
        n = sum(r.n for r in self._records if r.n is not None)
        if n == 0:
            return
        g_div = self._g_divisor if self.spec is None or self.spec.reduction == "mean" else float(self.mc_samples)
        forward_only = self.fisher_type == "forward-only"
        if not forward_only and g_div == 0:
            return  # no curvature pass ran (e.g. backward() was not called)
        # Every layer's sums share one scale per factor: A's 1/N, G's 1/divisor (1 for the identity).
        a_scale, g_scale = 1.0 / n, 1.0 if forward_only else 1.0 / g_div
        new: Dict[str, Tuple[Tensor, Tensor]] = {}  # (sum of A, sum of G) per layer updated this step
        for layer in self.layers:
            A = self._sums.get(("A", layer.name))
            if A is None:
                continue  # the layer did not run in this step's forward
            G = (torch.eye(layer.out_dim, dtype=A.dtype, device=A.device) if forward_only
                 else self._sums.get(("G", layer.name)))
            if G is not None:  # None: no curvature pass reached it
                new[layer.name] = (A, G)
        if not new:
            return
        # Gram sums: a NaN or Inf in any row shows on the diagonal, and |F_ij| <= sqrt(F_ii F_jj)
        # bounds the rest, so the diagonals decide.
        if not all_finite([t.diagonal() for pair in new.values() for t in pair]):
            warn_user("K-FAC: this step's factors are not finite (an overflow in the curvature pass?); the moving "
                      "averages keep their previous values")
            return
        decay = self.hyper()["factor_decay"]
        running = [name for name in new if "A" in self.state[name]]
        for name, (A, G) in new.items():
            if "A" not in self.state[name]:  # the first estimate starts the average (no bias towards zero)
                self.state[name]["A"], self.state[name]["G"] = A * a_scale, G * g_scale
        for j, (key, scale) in enumerate((("A", a_scale), ("G", g_scale))):  # one fused op per factor kind
            averages = [self.state[name][key] for name in running]
            if averages:
                torch._foreach_mul_(averages, decay)
                torch._foreach_add_(averages, [new[name][j] for name in running], alpha=(1.0 - decay) * scale)

    def update_inverses(self) -> None:
        """Eigendecompositions of every factor, one batched call; a failed one keeps the previous."""
        names = [name for name, st in self.state.items() if "A" in st]
        if not names:
            return
        mats = [self.state[n][k] for n in names for k in ("A", "G")]
        results = ops.eigh_batched(mats, impl=self.impl, _trusted=True)
        ok = torch.stack([torch.isfinite(d).all() for d, _ in results]).tolist()
        for i, name in enumerate(names):
            st = self.state[name]
            for j, key in enumerate(("A", "G")):
                k = 2 * i + j
                if ok[k]:
                    d, Q = results[k]
                    st["d" + key], st["Q" + key] = d.clamp_min(0), Q
                elif "Q" + key in st:
                    warn_user(f"K-FAC: the eigendecomposition of {key} of layer {name!r} failed in float32 and "
                              "float64; keeping the previous one")
                else:
                    warn_user(f"K-FAC: the eigendecomposition of {key} of layer {name!r} failed in float32 and "
                              "float64; the layer uses its plain gradient until one succeeds")

    def preconditioned(self) -> Tuple[Dict[int, Tensor], List[Tuple[List[Tensor], Tensor, Tensor, Tensor]]]:
        """{id(param): preconditioned gradient} for every K-FAC layer with an inverse, undamped by
        KL clipping, and per block (params, M, A_block, G) for the quadratic model."""
        h = self.hyper()
        Ms, QA, dA, QG, dG, blocks = [], [], [], [], [], []
        for layer in self.layers:
            st = self.state[layer.name]
            if "QA" not in st or "QG" not in st:
                continue
            for params, is_bias in layer.blocks():
                if any(p.grad is None for p in params):
                    continue
                M = block_matrix(params, [p.grad for p in params])
                if is_bias:
                    one = torch.ones(1, 1, dtype=st["QA"].dtype, device=M.device)
                    qa, da, A = one, one[0], one
                else:
                    qa, da, A = st["QA"], st["dA"], st["A"]
                Ms.append(M), QA.append(qa), dA.append(da), QG.append(st["QG"]), dG.append(st["dG"])
                blocks.append((params, M, A, st["G"]))
        if not Ms:
            return {}, []
        Ps = ops.precondition(Ms, QA, dA, QG, dG, float(h["damping"]), self.inverse, impl=self.impl, _trusted=True)
        out = {}
        for (params, M, _, _), P in zip(blocks, Ps):
            for p, d in zip(params, split_block(params, P)):
                out[id(p)] = d
        return out, [(params, M, A, G) for (params, M, A, G) in blocks]

    def quadratic_change(self, deltas: Dict[int, Tensor], grads: Dict[int, Tensor], blocks) -> float:
        """The K-FAC quadratic model's predicted change of the loss for the parameter change delta:
        <g, delta> over all parameters + 1/2 sum over blocks <D, G D A> (undamped)."""
        lin = sum(float((grads[k].double() * deltas[k].double()).sum()) for k in deltas if k in grads)
        quad = 0.0
        for params, _, A, G in blocks:
            D = block_matrix(params, [deltas[id(p)] for p in params]).to(A.dtype)
            quad += float((D * (G @ D @ A)).sum())
        return lin + 0.5 * quad

    def ggn_gram(self, params: List[Tensor], directions: List[List[Tensor]]) -> Tensor:
        """(k, k) matrix v_i^T GGN v_j on the last forward's batch for k parameter-space directions
        (each a list aligned with ``params``): Jacobian-vector products by forward-mode AD, then the
        loss Hessian in closed form; divided by Z as the loss is. float64."""
        import torch.autograd.forward_ad as fwad
        from torch.func import functional_call

        if self.last_inputs is None:
            raise RuntimeError("no recorded forward with gradients to take the curvature from")
        load_forward_ad()
        args, kwargs = self.last_inputs
        names = {id(p): n for n, p in self.model.named_parameters()}
        keys = [names[id(p)] for p in params]

        outs = []
        with self.suspended():
            for v in directions:  # forward-mode AD on dual parameters (cheaper than torch.func.jvp's wrapping)
                with fwad.dual_level():
                    duals = {k: fwad.make_dual(p.detach(), t.to(p.dtype)) for k, p, t in zip(keys, params, v)}
                    out, jv = fwad.unpack_dual(functional_call(self.model, duals, args, kwargs))
                    jv = torch.zeros_like(out) if jv is None else jv  # outputs that do not depend on params
                    outs.append(self.spec.flatten_outputs(jv).double())
        fo = self.spec.flatten_outputs(out).double()
        gram = self.spec.hessian_products(fo, torch.stack(outs))
        if self.spec.reduction == "mean":
            gram = gram / self.spec.normalizer(*fo.shape)
        return gram

    def step_done(self) -> None:
        self.steps += 1

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "layers": {name: {k: v.clone() for k, v in st.items()} for name, st in self.state.items()},
            "generator": self.generator.get_state(),
            "last_rho": self.last_rho,
            "fisher_type": self.fisher_type,
            "inverse": self.inverse,
        }

    def load_state_dict(self, sd: dict) -> None:
        try:
            steps, layers, gen = sd["steps"], sd["layers"], sd["generator"]
        except (KeyError, TypeError):
            raise ValueError("state_dict: not a K-FAC state (missing steps, layers or generator)") from None
        if set(layers) != set(self.state):
            raise ValueError(f"state_dict: its K-FAC layers {sorted(layers)} are not this model's {sorted(self.state)}")
        for layer in self.layers:
            saved = layers[layer.name]
            for key, t in saved.items():
                want = {"A": (layer.in_dim,) * 2, "G": (layer.out_dim,) * 2, "QA": (layer.in_dim,) * 2,
                        "QG": (layer.out_dim,) * 2, "dA": (layer.in_dim,), "dG": (layer.out_dim,)}.get(key)
                if want is None or tuple(t.shape) != want:
                    raise ValueError(f"state_dict: layer {layer.name!r} entry {key!r} has shape {tuple(t.shape)}, "
                                     f"expected {want}")
        self.steps = int(steps)
        device = self.layers[0].weight.device
        for layer in self.layers:
            self.state[layer.name] = {k: t.to(device=device, dtype=layer.factor_dtype).clone()
                                      for k, t in layers[layer.name].items()}
        self.generator.set_state(gen)
        self.last_rho = sd.get("last_rho")
        self._reset_pending()

    @contextlib.contextmanager
    def suspended(self):
        """Context in which forwards are not recorded (the damping adaptation's loss evaluations)."""
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
