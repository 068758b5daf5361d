"""The K-FAC machinery shared by ``KFAC`` and ``KFACPreconditioner``: hooks that record the rows of
the Kronecker factors, their exponential moving averages, the damped eigenbasis inverses and the
preconditioned directions.

The factors follow the curvature layer's conventions (``natgrad_cuda.curvature``, docs/curvature.md): the
rows come from ``curvature._layers``, the backward scalars of each Fisher type from
``curvature.kfac``. The heavy lifting goes through the batched ops with ``impl`` = the backend:
``ops.factor_update_`` (factor accumulation), ``ops.eigh_batched`` (inverses) and
``ops.precondition`` (directions); ``KFAC`` finishes the step with ``ops.kfac_update_``.

Which forwards count: every forward of the model with gradients enabled opens a record, but only a
record whose outputs reach ``opt.backward(loss, outputs)`` (or, for the empirical and forward-only
Fishers, whose layer outputs a backward reaches) feeds the factors; a monitoring forward outside
``no_grad`` is dropped at the step. Several recorded micro-batches before one step add up to the
factors of their concatenation (gradient accumulation).

A step is a transaction: ``prepare`` gathers this step's curvature and, when due, stages the new
moving averages and their eigendecompositions without touching the state; ``accept`` commits them;
``skip`` drops them, so that a step refused for a non-finite gradient, direction or update leaves
the factors, inverses and counters as they were.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from ._checks import check_bool, check_number
from .curvature import _layers
from .curvature._losses import LOSS_NAMES, REDUCTIONS, LossSpec
from .curvature.rules import rule_for
from .curvature.exact import load_forward_ad
from .curvature.kfac import FISHER_TYPES, KFAC_APPROXES, _backward_scalars, _flush, _is_joint
from .reference import INVERSES, accumulation_dtype

__all__ = ["Engine", "BACKENDS", "all_finite", "norms_of", "warn_user", "refuse_copy"]

BACKENDS = ("auto", "reference", "native", "emulated")
# The Fisher types whose G needs the loss: the sampled or exact loss Hessian, or the normaliser Z.
_NEEDS_LOSS = ("mc", "type-2", "empirical")
# The Fisher types whose G comes from the curvature passes of opt.backward (not from loss.backward()).
_CURVATURE_PASS = ("mc", "type-2")
_STATE_KEYS = ("A", "G", "QA", "dA", "QG", "dG")

# Until the hooks see inside compiled graphs, a compiled model would silently get no curvature.
_COMPILED = ("K-FAC does not support torch.compile'd models yet: its hooks do not see the layers' outputs inside a "
             "compiled graph, so the model would get no curvature (plain momentum SGD). Build the optimizer on the "
             "model itself and run its forward eagerly")

_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def warn_user(message: str, category=RuntimeWarning) -> None:
    """A warning attributed to the first caller outside natgrad_cuda and torch (the user's
    ``opt.step()``), however many wrappers (no_grad, torch.optim's hooks, GradScaler) lie between."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level - 1 if frame is None else level)


_HALF = (torch.float16, torch.bfloat16)


def norms_of(tensors: List[Tensor], ord_=2) -> Tensor:
    """The norms of every tensor as one vector, from vectorised passes; half-precision tensors are
    reduced in float32 (their 2-norm overflows early)."""
    low = [t.dtype in _HALF for t in tensors]
    if not any(low):
        return torch.stack(torch._foreach_norm(tensors, ord_))
    if all(low):
        return torch.stack(torch._foreach_norm(tensors, ord_, dtype=torch.float32))
    return torch.stack([torch.linalg.vector_norm(t, ord_, dtype=torch.float32 if h else None).float()
                        for t, h in zip(tensors, low)])


def all_finite(tensors: List[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one sync in the usual case. The 2-norms
    come from one vectorised pass; they are finite unless an entry is not or the sum of squares
    overflows, so only a non-finite 2-norm pays for the exact test (max-norms, which cannot overflow
    but are a slower, unvectorised reduction on the CPU)."""
    if not tensors:
        return True
    if bool(norms_of(tensors).isfinite().all()):
        return True
    return bool(norms_of(tensors, float("inf")).isfinite().all())


def refuse_copy(obj, *args):
    raise TypeError(
        f"{type(obj).__name__} cannot be copied or pickled: it is bound to its model through hooks. Save "
        "opt.state_dict() and load it into an optimizer built for the (copied) model")


class _InertHook:
    """What a copy or pickle of a model carries in place of an optimizer's hook: nothing."""

    def __call__(self, *args, **kwargs):
        return None


class _HookRef:
    """A model hook calling ``engine.<method>(*extra, *args)`` through a weak reference: the model
    does not keep a dropped optimizer alive, and copies and pickles of the model get an inert hook
    (a copy is not trained by this optimizer; ``copy.deepcopy(model)`` and ``torch.save(model)``
    keep working)."""

    __slots__ = ("_engine", "_method", "_extra")

    def __init__(self, engine: "Engine", method: str, *extra):
        self._engine, self._method, self._extra = weakref.ref(engine), method, extra

    def __call__(self, *args, **kwargs):
        engine = self._engine()
        return None if engine is None else getattr(engine, self._method)(*self._extra, *args, **kwargs)

    def __deepcopy__(self, memo):
        return _InertHook()

    def __reduce__(self):
        return (_InertHook, ())


def _tensors_in(obj, out: List[Tensor], depth: int = 0) -> List[Tensor]:
    """The tensors of a model's output: a tensor, or tuples, lists and dicts of them."""
    if isinstance(obj, Tensor):
        out.append(obj)
    elif depth < 4 and isinstance(obj, (tuple, list)):
        for item in obj:
            _tensors_in(item, out, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for item in obj.values():
            _tensors_in(item, out, depth + 1)
    return out


def _reaches(root, target, limit: int = 100000) -> bool:
    """Whether autograd node ``target`` lies in the graph below ``root`` (breadth-first from the
    loss: the model's outputs are usually a few nodes away, so a match ends the search early)."""
    if root is None or target is None:
        return False
    seen, frontier = {root}, [root]
    while frontier and len(seen) < limit:
        nxt = []
        for node in frontier:
            if node is target:
                return True
            for child, _ in node.next_functions:
                if child is not None and child not in seen:
                    seen.add(child)
                    nxt.append(child)
        frontier = nxt
    return False


class _Layer:
    """One K-FAC layer: its parameters and how its gradient becomes the (out, in[+1]) matrix M."""

    def __init__(self, name: str, module: nn.Module, joint: bool):
        self.name, self.module, self.joint = name, module, joint
        self.rule = rule_for(module)
        self.weight = self.rule.weight(module)
        bias = self.rule.bias(module)
        self.bias = bias if bias is not None and bias.requires_grad else None
        self.out_dim = self.weight.shape[0]
        self.in_dim = self.weight[0].numel() + int(joint)
        self.factor_dtype = accumulation_dtype(self.weight.dtype)
        self.placement = (self.weight.dtype, self.weight.device)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """The shape of every state entry of this layer."""
        a, g = self.in_dim, self.out_dim
        return {"A": (a, a), "G": (g, g), "QA": (a, a), "dA": (a,), "QG": (g, g), "dG": (g,)}

    def blocks(self) -> List[Tuple[List[Tensor], bool]]:
        """(parameters, is the separate bias) per preconditioned block: [W | b] jointly, or W and b
        apart (b with A = 1, the bias block of docs/curvature.md being G alone)."""
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
    """One forward of the model with gradients enabled, since the last step."""

    __slots__ = ("capture", "outputs", "n", "z", "rows_A", "rows_G", "targets", "inputs", "used", "reached",
                 "batches")

    def __init__(self, capture: bool, inputs):
        self.capture = capture  # a factor-update step: its layers' inputs are kept for A
        self.outputs: List[weakref.ref] = []  # the tensors the forward returned, weakly
        self.n: Optional[int] = None  # data points, from the outputs
        self.z: Optional[int] = None  # the loss normaliser's share, from the outputs
        self.rows_A: List[Tuple[str, Tensor, float]] = []
        self.rows_G: List[Tuple[str, Tensor]] = []  # the loss's own output gradients (empirical Fisher)
        # Per layer call, its input (or, where that needs no gradient, its weight): the curvature
        # pass differentiates with respect to these, which reaches every layer's output (and so its
        # hook) without the weight-gradient products of the other layers.
        self.targets: List[Tensor] = []
        self.inputs = inputs  # (args, kwargs) of the forward, for the adaptive step's J v
        self.batches: List[Tuple[str, int, int]] = []  # (layer, batch size, positions) per call
        self.used = False  # its outputs went to opt.backward
        self.reached = False  # a backward reached its layers' outputs

    def produced(self, t: Tensor) -> bool:
        return any(ref() is t for ref in self.outputs)

    def alive(self) -> bool:
        return not self.outputs or any(ref() is not None for ref in self.outputs)


class Engine:
    """Hooks, factors and inverses of one model. ``hyper()`` returns the current hyperparameters
    (a param group of ``KFAC`` or the preconditioner's own dict), read at every use so that
    schedulers and damping adaptation take effect at once."""

    def __init__(self, model: nn.Module, hyper: Callable[[], dict], *, loss: Optional[str], reduction: str,
                 fisher_type: str, mc_samples: int, kfac_approx: str, separate_weight_and_bias: bool,
                 inverse: str, backend: str, seed: Optional[int], grad_scaler,
                 max_consecutive_skips: Optional[int], owner: str):
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
        mc_samples = check_number("mc_samples", mc_samples, low=1, integer=True)
        if kfac_approx not in KFAC_APPROXES:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROXES}, got {kfac_approx!r}")
        check_bool("separate_weight_and_bias", separate_weight_and_bias)
        if inverse not in INVERSES:
            raise ValueError(f"inverse must be one of {INVERSES}, got {inverse!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        seed = check_number("seed", seed, integer=True, allow_none=True)
        if grad_scaler is not None and not hasattr(grad_scaler, "get_scale"):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}")
        self.max_consecutive_skips = check_number("max_consecutive_skips", max_consecutive_skips, low=1,
                                                  integer=True, allow_none=True)

        if getattr(model, "_orig_mod", None) is not None:  # torch.compile's OptimizedModule
            raise ValueError(_COMPILED)
        found, unsupported = _layers.find_layers(model)
        if not found:
            raise ValueError(
                "model has no layer K-FAC supports (nn.Linear, nn.Conv1d, nn.Conv2d with zero padding and a "
                "trainable weight)"
            )
        for name, module in found:
            if not rule_for(module).weight(module).requires_grad:
                raise ValueError(f"layer {name!r}: K-FAC needs its weight trainable (a frozen weight with a "
                                 "trainable bias is not supported)")
        self.unsupported = unsupported
        slots, _ = _layers.parameter_slots(model, found)
        self.layers = []
        for name, module in found:
            bias = rule_for(module).bias(module)
            joint = _is_joint(slots[name], separate_weight_and_bias) and bias.requires_grad
            self.layers.append(_Layer(name, module, joint))
        self.model, self.hyper, self.owner = model, hyper, owner
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
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.state: Dict[str, Dict[str, Tensor]] = {layer.name: {} for layer in self.layers}
        self.last_rho: Optional[float] = None
        self._staged: Optional[Dict[str, Dict[str, Tensor]]] = None  # prepare()'s new state, until accept()
        self._new = None  # prepare()'s sums of this step, until accept()
        self._records: List[_Record] = []
        self._reset_pending()
        # The backward that is running: "curvature" during the curvature passes; otherwise the
        # empirical Fisher takes its G rows from the loss's own backward, forward-only only notes
        # which forwards a backward reached, and the other types ignore it.
        self._idle_mode = {"empirical": "empirical", "forward-only": "reached"}.get(fisher_type)
        self._grad_mode = self._idle_mode
        self._open: Optional[_Record] = None  # the forward running now
        self._active: Optional[_Record] = None  # the record whose curvature pass is running
        self._stray = False  # a K-FAC layer ran outside a forward of the model
        # Cross-entropy over outputs of 3+ dimensions, by their shape after the batch dimension:
        # True when the classes are the last dimension (language-model logits (B, T, V) whose loss
        # is taken on their (B*T, V) view), False for torch's (B, C, d1, ...) layout.
        self._class_last: Dict[Tuple[int, ...], bool] = {}
        self._unrecorded: set = set()  # layers warned about for having no factors
        self._suspended = False
        self.keep_inputs = False  # set by KFAC(adaptive_step=True): the forward's inputs, for J v
        self.last_inputs = None
        # Layer hooks before the root's forward hook: a model that is itself one layer needs its
        # layer hook to run while the forward's record is still open.
        self._handles = [model.register_forward_pre_hook(_HookRef(self, "_root_pre_hook"), with_kwargs=True)]
        self._handles += [layer.module.register_forward_hook(_HookRef(self, "_layer_hook", layer))
                          for layer in self.layers]
        self._handles.append(model.register_forward_hook(_HookRef(self, "_root_hook")))

    __deepcopy__ = __copy__ = __reduce_ex__ = refuse_copy

    # ---- recording ----------------------------------------------------------------------------

    def _reset_pending(self) -> None:
        self._rows_G: List[Tuple[str, Tensor, float]] = []  # the curvature passes' rows, until flushed
        self._sums: Dict[Tuple[str, str], Tensor] = {}  # ("A" or "G", layer name): this step's sum
        self._records = []
        self._g_divisor = 0.0
        self._stray = False

    def factor_step_due(self) -> bool:
        return self.steps % self.hyper()["factor_update_freq"] == 0

    def inverse_step_due(self) -> bool:
        return self.steps % self.hyper()["inv_update_freq"] == 0

    def _recording(self) -> bool:
        return torch.is_grad_enabled() and not self._suspended

    def _root_pre_hook(self, module, args, kwargs):
        if not self._recording():
            self._open = None
            return
        # Forwards whose outputs are gone without reaching a backward can no longer count: free them.
        self._records = [r for r in self._records if r.used or r.reached or r.alive()]
        record = _Record(self.factor_step_due(), (args, kwargs) if self.keep_inputs else None)
        self._records.append(record)
        self._open = record

    def _root_hook(self, module, args, output):
        record, self._open = self._open, None
        if record is None:
            return
        record.outputs = [weakref.ref(t) for t in _tensors_in(output, [])]
        if record.capture and isinstance(output, Tensor):
            try:  # for a backward that is not opt.backward (empirical, forward-only); opt.backward sets them again
                record.n, record.z = self._sizes(output.shape)
            except ValueError:
                pass

    def _sizes(self, shape, class_last: Optional[bool] = None) -> Tuple[int, Optional[int]]:
        """(data points, loss normaliser) of a batch of model outputs of this shape; ValueError when
        they do not fit the loss or (cross-entropy over 3+ dimensions) the class dimension is not
        known (``class_last``, else what was learned for this shape)."""
        if len(shape) == 0 or (len(shape) == 1 and self.spec is not None and self.spec.name == "cross_entropy"):
            raise ValueError(f"model outputs must be batched with a class / feature dimension, got shape "
                             f"{tuple(shape)}" + (" (a (B,) output works with loss='mse' or 'bce')"
                                                  if len(shape) == 1 else ""))
        if self.spec is None:
            return shape[0], None
        flat = self.spec.flat_shape(shape)
        if self.spec.name == "cross_entropy" and len(shape) >= 3:
            last = self._class_last.get(tuple(shape[1:])) if class_last is None else class_last
            if last is None:
                raise ValueError(f"cross-entropy outputs of shape {tuple(shape)}: which dimension holds the classes "
                                 "is not known; call opt.backward(loss, outputs), which tells it from the loss")
            if last:
                flat = (math.prod(shape[:-1]), shape[-1])
        return shape[0], self.spec.normalizer(*flat)

    def _class_dim_is_last(self, loss: Tensor, outputs: Tensor) -> bool:
        """Cross-entropy over outputs of 3+ dimensions: torch's loss reads the classes from dim 1,
        a language model's loss on the (B*T, V) view from the last. The loss's gradient with
        respect to its logits sums to zero along the classes, which tells them apart; a layout it
        cannot tell is an error, never a guess. Learned once per output shape (a gradient of zero,
        from saturated logits, tells nothing: torch's layout for that step, where G is zero anyway)."""
        key = tuple(outputs.shape[1:])
        if key in self._class_last:
            return self._class_last[key]
        mode, self._grad_mode = self._grad_mode, None  # a probe: no hook records anything
        try:
            (g,) = torch.autograd.grad(loss, outputs, retain_graph=True)
        finally:
            self._grad_mode = mode
        g = g.detach().double()
        total = float(g.abs().sum())
        if total == 0 or not math.isfinite(total):
            return False
        tol = (1e-2 if outputs.dtype in _HALF else 1e-5) * total
        along_1, along_last = float(g.sum(1).abs().sum()) <= tol, float(g.sum(-1).abs().sum()) <= tol
        if along_1 == along_last:
            raise ValueError(
                f"loss='cross_entropy' with outputs of shape {tuple(outputs.shape)}: cannot tell which dimension holds "
                "the classes (the gradient of a cross-entropy sums to zero along them, and here it sums to zero "
                f"along {'both' if along_1 else 'neither'} of dim 1 and the last). Use torch's (B, C, d1, ...) "
                "layout, or (B, T, V) logits with the loss computed on their (B*T, V) view")
        self._class_last[key] = along_last
        return along_last

    def _layer_hook(self, layer: _Layer, module, inputs, output):
        record = self._open
        if record is None:
            if self._recording() and self.factor_step_due():
                self._stray = True
            return
        if not record.capture:
            return
        x = inputs[0]
        record.rows_A.append((layer.name, *layer.rule.input_rows(layer.name, module, x, self.kfac_approx)))
        if isinstance(output, Tensor) and output.dim():
            record.batches.append((layer.name, output.shape[0], layer.rule.positions(module, output)))
        record.targets.append(x if isinstance(x, Tensor) and x.requires_grad else layer.weight)
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(functools.partial(self._grad_hook, layer, record))

    def _grad_hook(self, layer: _Layer, record: _Record, g: Tensor) -> None:
        mode = self._grad_mode
        if mode is None or not any(r is record for r in self._records):  # not wanted, or a finished step's
            return
        if mode == "curvature":
            if record is self._active:
                self._rows_G.append((layer.name, layer.rule.grad_rows(layer.module, g, self.kfac_approx), 1.0))
            return
        record.reached = True
        if mode == "empirical":
            record.rows_G.append((layer.name, layer.rule.grad_rows(layer.module, g, self.kfac_approx)))

    def _find_record(self, outputs: Tensor) -> _Record:
        """The record of the forward that returned ``outputs``; ValueError saying what is wrong otherwise."""
        for record in self._records:
            if record.produced(outputs):
                return record
        if not outputs.requires_grad:
            raise ValueError("outputs does not require grad: it is detached or was computed under torch.no_grad(); "
                             "pass the tensor the model's forward returned, with gradients enabled")
        for record in self._records:
            for ref in record.outputs:
                t = ref()
                if t is not None and t.grad_fn is not None and _reaches(outputs.grad_fn, t.grad_fn, limit=256):
                    raise ValueError(
                        f"outputs (shape {tuple(outputs.shape)}) was computed from the model's output (shape "
                        f"{tuple(t.shape)}), for example a slice or a view: pass the tensor the model returned "
                        "itself, which the loss must be computed from")
        raise ValueError(
            "outputs is not the output of a forward of this optimizer's model since the last step(): pass the "
            "tensor model(...) returned in this step (a forward run before the optimizer was built, a stale "
            "output or another model's does not count)")

    def backward(self, loss: Tensor, outputs: Tensor) -> None:
        """loss.backward(), preceded on factor-update steps by the curvature passes that give G.
        Only the forward that returned ``outputs`` feeds the factors; the arguments are checked
        before anything changes."""
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss must be a scalar tensor, got {loss!r:.80}")
        if not isinstance(outputs, Tensor):
            raise ValueError(f"outputs must be the model's output tensor, got {type(outputs).__name__}")
        if not loss.requires_grad:
            raise ValueError("loss does not require grad (computed under torch.no_grad(), or detached)")
        if outputs.grad_fn is not None and type(outputs.grad_fn).__name__.startswith("CompiledFunction"):
            raise ValueError(_COMPILED)
        record = self._find_record(outputs)
        if record.used:
            raise ValueError("opt.backward was already called with these outputs in this step; run a new forward")
        if not (loss.grad_fn is outputs.grad_fn or _reaches(loss.grad_fn, outputs.grad_fn)):
            raise ValueError("loss was not computed from outputs: pass the model output the loss was computed from")
        for layer in self.layers:
            if not layer.weight.requires_grad or (layer.bias is not None and not layer.bias.requires_grad):
                raise ValueError(f"layer {layer.name!r} was frozen after the optimizer was built (its parameters no "
                                 "longer all require grad); build a new optimizer over the trainable layers")
        class_last = False
        if record.capture:
            if self.spec is not None and self.spec.name == "cross_entropy" and outputs.dim() >= 3:
                class_last = self._class_dim_is_last(loss, outputs)
            n, z = self._sizes(outputs.shape, class_last)
            for name, batch, positions in record.batches:
                if positions > 1 and n == batch * positions:
                    raise ValueError(
                        f"outputs have {n} rows, layer {name!r}'s batch of {batch} times its {positions} positions: "
                        "the model returned its outputs with the positions folded into the batch (the (B*T, V) view "
                        "of (B, T, V) logits), which would scale A by 1/T. Return the outputs with the batch "
                        "dimension the layers saw, and compute the loss on whatever view it needs")
        self.follow_parameters()
        record.used = True
        if self.keep_inputs:
            self.last_inputs = record.inputs
        if record.capture:
            record.n, record.z = n, z
            if self.fisher_type in _CURVATURE_PASS:
                # the outputs as the loss reads them: (B, T, V) logits with the classes last as (B*T, V)
                view = outputs.reshape(-1, outputs.shape[-1]) if class_last else outputs
                self._curvature_passes(record, view)
            record.targets = []  # done with them: no layer inputs held past the backward
            # A's and G's rows of every layer in one op call
            self._flush(self._take_rows_A(record) + self._take_rows_G())
        loss.backward()

    def _curvature_passes(self, record: _Record, outputs: Tensor) -> None:
        f = self.spec.flatten_outputs(outputs)
        if f.dtype in (torch.float16, torch.bfloat16):  # sample and build S in fp32 under autocast
            f = f.float()
        if not bool(torch.isfinite(f).all()):
            return  # a diverged model: no curvature from it (its gradients will skip the step)
        self._g_divisor += self.mc_samples * (record.z if self.spec.reduction == "mean" else 1)
        targets = record.targets or [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]
        self._grad_mode, self._active = "curvature", record
        try:
            for phi in _backward_scalars(self.spec, self.fisher_type, f, None, self.mc_samples, self.generator):
                # .grad stays untouched; the output hooks record g on the way.
                torch.autograd.grad(phi, targets, retain_graph=True, allow_unused=True)
        finally:
            self._grad_mode, self._active = self._idle_mode, None

    def _take_rows_G(self) -> List[Tuple[Tuple[str, str], Tensor, float]]:
        rows, self._rows_G = self._rows_G, []
        return [(("G", n), r, s) for n, r, s in rows]

    @staticmethod
    def _take_rows_A(record: _Record) -> List[Tuple[Tuple[str, str], Tensor, float]]:
        rows, record.rows_A = record.rows_A, []
        return [(("A", n), r, s) for n, r, s in rows]

    def _flush(self, rows) -> None:
        """Accumulate (key, rows, scale) into this step's pending sums, all in one op call (one
        parallel region, balanced over all of them)."""
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

    def follow_parameters(self) -> None:
        """Factors follow their layer's parameters to a new dtype or device (``model.double()``,
        ``model.half()``, ``model.to(device)`` after the optimizer was built)."""
        moved = [layer for layer in self.layers if layer.placement != (layer.weight.dtype, layer.weight.device)]
        for layer in moved:
            layer.placement = (layer.weight.dtype, layer.weight.device)
            layer.factor_dtype = accumulation_dtype(layer.weight.dtype)
            to = dict(dtype=layer.factor_dtype, device=layer.weight.device)
            self.state[layer.name] = {k: t.to(**to) for k, t in self.state[layer.name].items()}
            for which in ("A", "G"):
                self._buffers.pop((which, layer.name), None)
                if (which, layer.name) in self._sums:
                    self._sums[(which, layer.name)] = self._sums[(which, layer.name)].to(**to)
        device = self.layers[0].weight.device
        if moved and self.generator.device != device:  # MC targets are drawn on the outputs' device
            seed = int(torch.randint(0, 2**62, (), generator=self.generator, device=self.generator.device).item())
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    # ---- the step -----------------------------------------------------------------------------

    def prepare(self, grad_scale: Optional[float]) -> None:
        """This step's factors and, when due, the inverses of the new moving averages, staged for
        ``accept``: the state is not changed."""
        self.follow_parameters()
        self._new = self._step_factors(grad_scale)
        have = {name for name, st in self.state.items() if "A" in st} | set(self._new[0] if self._new else ())
        missing = any("QA" not in self.state[name] for name in have)
        self._staged = None
        if have and (self.inverse_step_due() or missing):
            staged = {name: dict(st) for name, st in self.state.items()}
            if self._new:
                self._average(staged, *self._new, in_place=False)
            self._decompose(staged)
            self._staged = staged

    def accept(self) -> None:
        """Commit what ``prepare`` staged: the new moving averages (and inverses)."""
        if self._staged is not None:
            self.state = self._staged
        elif self._new:
            self._average(self.state, *self._new, in_place=True)
        self._staged = self._new = None

    def step_done(self) -> None:
        self.accept()
        self.steps += 1
        self.consecutive_skips = 0
        self._reset_pending()

    def skip(self, message: Optional[str]) -> None:
        """Drop this step (its recordings and anything staged), count it, say so (``message``
        None: a GradScaler's routine skip, silent), and raise once too many were skipped in a row."""
        self._reset_pending()
        self._staged = self._new = None
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if message is not None:
            warn_user(f"{message} ({self.consecutive_skips} in a row, {self.skipped_steps} skipped in all)")
        limit = self.max_consecutive_skips
        if limit is not None and self.consecutive_skips >= limit:
            raise RuntimeError(
                f"{self.owner}: the last {self.consecutive_skips} steps were all skipped (non-finite gradients, "
                "directions or updates), so training is making no progress. Look for the source of the NaN/Inf "
                "(the loss, the data, a too large lr or a too small damping); max_consecutive_skips=None "
                "disables this error")

    def discard(self) -> None:
        """Forget this step's recordings without counting a skip (a step with nothing to do)."""
        self._reset_pending()
        self._staged = self._new = None

    def _step_factors(self, grad_scale: Optional[float]):
        """This step's (sums of A, sums of G) per layer with their scales, from the forwards that
        count; None when there are none, or when they are not finite (with a warning)."""
        if not self.factor_step_due():
            return None
        counted = [r for r in self._records if r.capture and (r.used or r.reached)]
        if self.fisher_type in _CURVATURE_PASS and not any(r.used for r in counted):
            warn_user(f"{self.owner}: no curvature this factor-update step: fisher_type={self.fisher_type!r} builds "
                      "G in opt.backward(loss, outputs), which was not called with this step's outputs (a plain "
                      "loss.backward() gives only the gradient, and the layers keep their previous factors)")
            return None
        if self._stray and not counted:
            warn_user(f"{self.owner}: K-FAC layers ran outside a forward of the model the optimizer was built with; "
                      "they were not recorded (call the model itself)")
        if not counted:
            return None
        for record in counted:
            if record.n is None:
                raise ValueError(f"fisher_type={self.fisher_type!r}: the batch size and loss normaliser of a forward "
                                 "that went to a plain loss.backward() are unknown (its output is not a tensor, or is "
                                 "a cross-entropy's over 3+ dimensions whose class dimension was never seen); call "
                                 "opt.backward(loss, outputs)")
        n = sum(r.n for r in counted)
        forward_only = self.fisher_type == "forward-only"
        # the A rows of forwards a plain loss.backward() reached (empirical, forward-only)
        rows = [item for r in counted for item in self._take_rows_A(r)]
        if self.fisher_type == "empirical":
            s = grad_scale if grad_scale is not None else (
                self.grad_scaler.get_scale() if self.grad_scaler is not None and self.grad_scaler.is_enabled()
                else 1.0)
            # The accumulated gradient is the loss's mean over all counted forwards, g_phi / Z: G
            # = Z * sum of its outer products (1 for a sum), whatever the micro-batches.
            z_total = sum(r.z for r in counted) if self.spec.reduction == "mean" else 1.0
            rows += [(("G", name), g, float(z_total) / (s * s)) for r in counted for name, g in r.rows_G]
            for r in counted:
                r.rows_G = []
            g_div = 1.0
        else:
            g_div = 1.0 if forward_only else (self._g_divisor if self.spec.reduction == "mean"
                                              else float(self.mc_samples))
        self._flush(rows)
        if not forward_only and g_div == 0:
            return None  # no curvature pass ran (non-finite outputs)
        new: Dict[str, Tuple[Tensor, Tensor]] = {}  # (sum of A, sum of G) per layer updated this step
        for layer in self.layers:
            A = self._sums.get(("A", layer.name))
            if A is None:
                continue  # the layer did not run in this step's forward
            G = (torch.eye(layer.out_dim, dtype=A.dtype, device=A.device) if forward_only
                 else self._sums.get(("G", layer.name)))
            if G is not None:  # None: no backward reached it
                new[layer.name] = (A, G)
        self._note_unrecorded(new)
        if not new:
            return None
        # Gram sums: a NaN or Inf in any row shows on the diagonal, and |F_ij| <= sqrt(F_ii F_jj)
        # bounds the rest, so the diagonals decide.
        if not all_finite([t.diagonal() for pair in new.values() for t in pair]):
            warn_user("K-FAC: this step's factors are not finite (an overflow in the curvature pass?); the moving "
                      "averages keep their previous values")
            return None
        return new, 1.0 / n, 1.0 / g_div

    def _note_unrecorded(self, new: Dict[str, Tuple[Tensor, Tensor]]) -> None:
        """Warn, once per layer, about a K-FAC layer with a gradient that no counted forward ran as a
        module (its weight used functionally, say): it has no factors and follows its plain gradient."""
        for layer in self.layers:
            if (layer.name not in new and layer.name not in self._unrecorded and "A" not in self.state[layer.name]
                    and layer.weight.grad is not None):
                self._unrecorded.add(layer.name)
                warn_user(f"{self.owner}: layer {layer.name!r} has a gradient but did not run as a module in this "
                          "step's forward (is its weight used functionally?); it gets no factors and follows its "
                          "plain gradient until it does")

    def _average(self, states, new: Dict[str, Tuple[Tensor, Tensor]], a_scale: float, g_scale: float, *,
                 in_place: bool) -> None:
        """The moving averages of ``states`` take in this step's sums; the first estimate starts one.
        Every layer's sums share one scale per factor kind, so each kind is one fused op."""
        decay = self.hyper()["factor_decay"]
        running = [name for name in new if "A" in states[name]]
        for name, (A, G) in new.items():
            if "A" not in states[name]:  # the first estimate starts the average (no bias towards zero)
                states[name]["A"], states[name]["G"] = A * a_scale, G * g_scale
        for j, (key, scale) in enumerate((("A", a_scale), ("G", g_scale))):
            averages = [states[name][key] for name in running]
            if not averages:
                continue
            if in_place:
                torch._foreach_mul_(averages, decay)
            else:
                averages = torch._foreach_mul(averages, decay)
            torch._foreach_add_(averages, [new[name][j] for name in running], alpha=(1.0 - decay) * scale)
            for name, avg in zip(running, averages):
                states[name][key] = avg

    def _decompose(self, states) -> None:
        """Eigendecompositions of every factor of ``states``, one batched call; a failed one keeps the previous."""
        names = [name for name, st in states.items() if "A" in st]
        if not names:
            return
        mats = [states[n][k] for n in names for k in ("A", "G")]
        results = ops.eigh_batched(mats, impl=self.impl, _trusted=True)
        ok = torch.stack([torch.isfinite(d).all() for d, _ in results]).tolist()
        for i, name in enumerate(names):
            st = states[name]
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

    def current_state(self) -> Dict[str, Dict[str, Tensor]]:
        """The state this step's directions use: staged by ``prepare``, or the committed one."""
        return self._staged if self._staged is not None else self.state

    def preconditioned(self) -> Tuple[Dict[int, Tensor], List[Tuple[List[Tensor], Tensor, Tensor, Tensor]]]:
        """{id(param): preconditioned gradient} for every K-FAC layer with an inverse, undamped by
        KL clipping, and per block (params, M, A_block, G) for the quadratic model."""
        h = self.hyper()
        state = self.current_state()
        Ms, QA, dA, QG, dG, blocks = [], [], [], [], [], []
        for layer in self.layers:
            st = state[layer.name]
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
        return out, blocks

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
        """(k, k) matrix v_i^T GGN v_j on the batch of the forward that went to opt.backward, for k
        parameter-space directions (each a list aligned with ``params``): Jacobian-vector products
        by forward-mode AD, then the loss Hessian in closed form; divided by Z as the loss is. float64."""
        import torch.autograd.forward_ad as fwad
        from torch.func import functional_call

        if self.last_inputs is None:
            raise RuntimeError("adaptive_step: no forward went to opt.backward(loss, outputs) in this step, so "
                               "there is no batch to take the curvature from")
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

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "layers": {name: {k: v.clone() for k, v in st.items()} for name, st in self.state.items()},
            "generator": self.generator.get_state(),
            "last_rho": self.last_rho,
            "fisher_type": self.fisher_type,
            "inverse": self.inverse,
        }

    def check_state_dict(self, sd) -> Callable[[], None]:
        """Validate a saved K-FAC state completely (every entry present, of the right kind, shape and
        dtype, finite; eigenvectors orthonormal) and return the function that loads it: a bad state
        raises ValueError naming the entry before anything changes."""
        if not isinstance(sd, dict):
            raise ValueError(f"state_dict: a K-FAC state must be a dict, got {type(sd).__name__}")
        missing = [k for k in ("steps", "layers", "generator", "fisher_type", "inverse", "last_rho") if k not in sd]
        if missing:
            raise ValueError(f"state_dict: not a K-FAC state (missing {', '.join(missing)})")
        if sd["fisher_type"] != self.fisher_type:
            raise ValueError(f"state_dict: saved with fisher_type={sd['fisher_type']!r}, this optimizer uses "
                             f"{self.fisher_type!r}")
        if sd["inverse"] not in INVERSES:
            raise ValueError(f"state_dict: entry 'inverse' must be one of {INVERSES}, got {sd['inverse']!r}")
        counters = {}
        for key in ("steps", "skipped_steps", "consecutive_skips"):
            value = sd.get(key, 0)  # the skip counters are newer than the format
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict: entry {key!r} must be an int >= 0, got {value!r}")
            counters[key] = value
        rho = sd["last_rho"]
        if rho is not None and (isinstance(rho, bool) or not isinstance(rho, (int, float))):
            raise ValueError(f"state_dict: entry 'last_rho' must be a float or None, got {rho!r}")
        generator = self._checked_generator(sd["generator"])
        layers = sd["layers"]
        if not isinstance(layers, dict) or set(layers) != set(self.state):
            got = sorted(layers) if isinstance(layers, dict) else type(layers).__name__
            raise ValueError(f"state_dict: its K-FAC layers {got} are not this model's {sorted(self.state)}")
        loaded = {}
        for layer in self.layers:
            loaded[layer.name] = self._checked_layer_state(layer, layers[layer.name])

        def load() -> None:
            self.state = loaded
            self.steps, self.skipped_steps = counters["steps"], counters["skipped_steps"]
            self.consecutive_skips = counters["consecutive_skips"]
            self.generator = generator
            self.last_rho = None if rho is None else float(rho)
            self._reset_pending()
            self._staged = self._new = None

        return load

    def load_state_dict(self, sd) -> None:
        self.check_state_dict(sd)()

    def _checked_generator(self, state) -> torch.Generator:
        """A generator for this optimizer's device in the saved state; a state saved on another kind
        of device (a CPU checkpoint resumed on a GPU, say) seeds it deterministically instead."""
        if not isinstance(state, Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
            raise ValueError("state_dict: entry 'generator' must be a generator state (a 1-D uint8 tensor)")
        generator = torch.Generator(device=self.generator.device)
        try:
            generator.set_state(state.cpu())
            return generator
        except (RuntimeError, ValueError):
            pass
        try:
            saved = torch.Generator()
            saved.set_state(state.cpu())
        except (RuntimeError, ValueError):
            raise ValueError("state_dict: entry 'generator' is not a valid generator state") from None
        generator.manual_seed(int(torch.randint(0, 2**62, (), generator=saved).item()))
        return generator

    def _checked_layer_state(self, layer: _Layer, saved) -> Dict[str, Tensor]:
        where = f"state_dict: layer {layer.name!r}"
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: its state must be a dict, got {type(saved).__name__}")
        unknown = set(saved) - set(_STATE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown entries {sorted(unknown)}")
        keys = set(saved)
        # A layer holds nothing (never updated), its factors, or its factors and their eigendecompositions.
        for need, having in ((("A", "G"), ("A", "G", "QA", "dA", "QG", "dG")), (("QA",), ("dA",)),
                             (("dA",), ("QA",)), (("QG",), ("dG",)), (("dG",), ("QG",))):
            if keys & set(having) and not set(need) <= keys:
                raise ValueError(f"{where}: entries {sorted(keys)} are incomplete (missing "
                                 f"{sorted(set(need) - keys)})")
        out, shapes = {}, layer.shapes()
        device = layer.weight.device
        for key in _STATE_KEYS:
            if key not in saved:
                continue
            t = saved[key]
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"{where} entry {key!r} must be a floating-point tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
            if tuple(t.shape) != shapes[key]:
                raise ValueError(f"{where} entry {key!r} has shape {tuple(t.shape)}, expected {shapes[key]}")
            t = t.detach().to(device=device, dtype=layer.factor_dtype).clone()
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where} entry {key!r} is not finite")
            if key.startswith("d") and bool((t < 0).any()):
                raise ValueError(f"{where} entry {key!r}: eigenvalues must be >= 0")
            if key.startswith("Q"):
                eye = torch.eye(t.shape[0], dtype=t.dtype, device=device)
                tol = 1e-3 if t.dtype == torch.float32 else 1e-8
                if t.numel() and float((t.T @ t - eye).abs().max()) > tol * max(1, t.shape[0]) ** 0.5:
                    raise ValueError(f"{where} entry {key!r}: eigenvectors must be orthonormal")
            out[key] = t
        return out

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
