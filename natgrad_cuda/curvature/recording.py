"""Recording: the hooks that see a model's forwards and backwards, which of them count, and the
rows of the K-FAC factors they give. The optimizers and ``curvature.kfac`` share it: one hook
implementation.

Every forward of the model with gradients enabled opens a record, but only a record whose outputs
reach ``opt.backward(loss, outputs)`` (or, for the empirical and forward-only Fishers, whose layer
outputs a backward reaches) feeds the factors; a monitoring forward outside ``no_grad`` is dropped
at the step. Several recorded micro-batches before one step add up to the factors of their
concatenation (gradient accumulation). The rows of A come from the layers' inputs, those of G from
the gradients at their outputs, in the curvature passes of ``opt.backward`` (MC and type-2) or the
loss's own backward (empirical); each layer's rule (``curvature.rules``) says how.
"""
from __future__ import annotations

import contextlib
import functools
import math
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import warn_user
from .._finite import HALF
from ._losses import LossSpec, class_dim_is_last
from .attention import AttentionProjection, Watch
from .rules import rule_for

__all__ = ["Recorder", "Tap", "COMPILED", "backward_scalars", "take_input_rows"]

# The Fisher types whose G comes from the curvature passes of opt.backward (not from loss.backward()).
CURVATURE_PASS = ("mc", "type-2")
# Until the hooks see inside compiled graphs, a compiled model would silently get no curvature.
COMPILED = ("K-FAC does not support torch.compile'd models yet: its hooks do not see the layers' outputs inside a "
            "compiled graph, so the model would get no curvature (plain momentum SGD). Build the optimizer on the "
            "model itself and run its forward eagerly")

# (("A", "G" or "F", layer name), rows, scale): F is a scale-and-shift layer's per-entry blocks.
Rows = List[Tuple[Tuple[str, str], Tensor, float]]


def backward_scalars(spec: LossSpec, fisher_type: str, f: Tensor, y: Optional[Tensor], mc_samples: int,
                     generator: Optional[torch.Generator]) -> Iterable[Tensor]:
    """The scalars phi whose output gradients g make G = sum g g^T / (Z * M) (docs/curvature.md):
    f the outputs as (terms, C), y the targets (for "empirical")."""
    if fisher_type == "type-2":
        S = spec.hessian_sqrt(f)
        for c in range(f.shape[1]):
            yield (f * S[:, :, c]).sum()
    elif fisher_type == "mc":
        for _ in range(mc_samples):
            yield spec.term_losses(f, spec.sample_targets(f, generator)).sum()
    else:
        yield spec.term_losses(f, y).sum()


class Tap:
    """What the recorder needs of a covered layer: its name, module, rule and parameters (the bias
    only when it is trained)."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module, self.rule = name, module, rule_for(module)
        self.weight = self.rule.weight(module)
        bias = self.rule.bias(module)
        self.bias = bias if bias is not None and bias.requires_grad else None


class _InertHook:
    """What a copy or pickle of a model carries in place of an optimizer's hook: nothing."""

    def __call__(self, *args, **kwargs):
        return None


class _HookRef:
    """A model hook calling ``recorder.<method>(*extra, *args)`` through a weak reference: the model
    does not keep a dropped optimizer alive, and copies and pickles of the model get an inert hook
    (a copy is not trained by this optimizer; ``copy.deepcopy(model)`` and ``torch.save(model)``
    keep working)."""

    __slots__ = ("_target", "_method", "_extra")

    def __init__(self, target, method: str, *extra):
        self._target, self._method, self._extra = weakref.ref(target), method, extra

    def __call__(self, *args, **kwargs):
        target = self._target()
        return None if target is None else getattr(target, self._method)(*self._extra, *args, **kwargs)

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


class _Record:
    """One forward of the model with gradients enabled, since the last step."""

    __slots__ = ("capture", "outputs", "n", "z", "rows_A", "rows_G", "targets", "inputs", "used", "reached",
                 "batches")

    def __init__(self, capture: bool, inputs):
        self.capture = capture  # a factor-update step: its layers' inputs are kept for A
        self.outputs: List[weakref.ref] = []  # the tensors the forward returned, weakly
        self.n: Optional[int] = None  # data points, from the outputs
        self.z: Optional[int] = None  # the loss normaliser's share, from the outputs
        self.rows_A: Rows = []  # the rows of A (of F, for a scale-and-shift layer's forward-only Fisher)
        # The loss's own output gradients (empirical Fisher): ((kind, layer), rows) of G or F.
        self.rows_G: List[Tuple[Tuple[str, str], Tensor]] = []
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


def take_input_rows(record: _Record) -> Rows:
    """A record's rows from its forward (A's; F's for the forward-only Fisher), taken (once)."""
    rows, record.rows_A = record.rows_A, []
    return rows


class Recorder:
    """The hooks on one model and the records of its forwards since the last step, for ``layers``
    (``Tap``s).

    ``factor_step_due()`` says whether this step updates the factors, ``generator()`` is the
    optimizer's generator (MC targets), ``flush(rows)`` takes rows into this step's sums, and
    ``before_use()`` runs once the arguments of ``backward`` are checked (the factors follow the
    parameters' dtype and device then)."""

    def __init__(self, model: nn.Module, layers: list, *, spec: Optional[LossSpec], fisher_type: str,
                 kfac_approx: str, mc_samples: int, owner: str, factor_step_due: Callable[[], bool],
                 generator: Callable[[], torch.Generator], flush: Callable[[Rows], None],
                 before_use: Callable[[], None]):
        self.model, self.layers, self.spec, self.owner = model, layers, spec, owner
        self.fisher_type, self.kfac_approx, self.mc_samples = fisher_type, kfac_approx, mc_samples
        self.factor_step_due, self.generator, self.flush, self.before_use = (factor_step_due, generator, flush,
                                                                             before_use)
        # The backward that is running: "curvature" during the curvature passes; otherwise the
        # empirical Fisher takes its G rows from the loss's own backward, forward-only only notes
        # which forwards a backward reached, and the other types ignore it.
        self._idle_mode = {"empirical": "empirical", "forward-only": "reached"}.get(fisher_type)
        self._grad_mode = self._idle_mode
        self._open: Optional[_Record] = None  # the forward running now
        self._active: Optional[_Record] = None  # the record whose curvature pass is running
        # Cross-entropy over outputs of 3+ dimensions, by their shape after the batch dimension:
        # True when the classes are the last dimension (language-model logits (B, T, V) whose loss
        # is taken on their (B*T, V) view), False for torch's (B, C, d1, ...) layout.
        self._class_last: Dict[Tuple[int, ...], bool] = {}
        self._suspended = False
        self.record_without_grad = False  # curvature.kfac's forward-only Fisher: A from no_grad forwards
        # structure="unit-wise": every layer's curvature as exact per-unit blocks (F rows), as a
        # scale-and-shift layer's always is
        self.unit_wise = False
        # data parallel: the empirical Fisher's rows scaled to sum over processes (G's divisor is then
        # this process's Z, summed over them with the factors)
        self.distributed = False
        self.after_flush: Callable[[], None] = lambda: None  # data parallel: start the factors' all-reduce
        self.keep_inputs = False  # set by KFAC(adaptive_step=True): the forward's inputs, for J v
        self.last_inputs = None
        self.reset()
        # Layer hooks before the root's forward hook: a model that is itself one layer needs its
        # layer hook to run while the forward's record is still open.
        self._handles = [model.register_forward_pre_hook(_HookRef(self, "_root_pre_hook"), with_kwargs=True)]
        # An attention's projections get their rows from its forward (``attention.Watch``).
        attentions: Dict[int, Tuple[nn.Module, Dict[str, object]]] = {}
        for layer in layers:
            if isinstance(layer.module, AttentionProjection):
                a = layer.module.attention
                attentions.setdefault(id(a), (a, {}))[1]["qkv"[layer.module.index]] = layer
        for a, parts in attentions.values():
            out = next((layer for layer in layers if layer.module is a.out_proj), None)
            if out is not None:
                parts["out"] = out
        watched = {id(layer.module) for _, parts in attentions.values() for layer in parts.values()}
        self._watches: List[Optional[Watch]] = []
        self._handles += [layer.module.register_forward_hook(_HookRef(self, "_layer_hook", layer))
                          for layer in layers if id(layer.module) not in watched]
        for a, parts in attentions.values():
            self._handles.append(a.register_forward_pre_hook(_HookRef(self, "_attention_pre_hook", a, parts)))
            self._handles.append(a.register_forward_hook(_HookRef(self, "_attention_hook"), always_call=True))
        self._handles.append(model.register_forward_hook(_HookRef(self, "_root_hook")))

    def reset(self) -> None:
        """Forget the step's records (after a step, taken or skipped)."""
        self._records: List[_Record] = []
        self._rows_G: Rows = []  # the curvature passes' rows (of G, or F), until flushed
        self._g_divisor = 0.0
        self._stray = False  # a K-FAC layer ran outside a forward of the model

    # ---- hooks ----------------------------------------------------------------------------------

    def _recording(self) -> bool:
        return (torch.is_grad_enabled() or self.record_without_grad) and not self._suspended

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

    def _layer_hook(self, layer, module, inputs, output):
        self.saw(layer, inputs[0], output)

    def saw(self, layer, x, output, source=None) -> None:
        """``layer`` computed ``output`` from ``x`` in the forward that is running. A layer computed
        inside another module's forward (an attention's projections) passes batch-first views as
        ``x`` and ``output``, and ``source`` = (the real input, the real output, the view that turns
        the real output's gradient into ``output``'s layout)."""
        record = self._open
        if record is None:
            if self._recording() and self.factor_step_due():
                self._stray = True
            return
        if not record.capture:
            return
        real_x, hooked, view = source if source is not None else (x, output, None)
        module, rule, xhat = layer.module, layer.rule, None
        if not (rule.scale_shift or self.unit_wise):
            record.rows_A.append((("A", layer.name), *rule.input_rows(layer.name, module, x, self.kfac_approx)))
        elif self.fisher_type == "forward-only":
            record.rows_A.append((("F", layer.name), *rule.input_rows(layer.name, module, x, self.kfac_approx)))
        else:  # exact per-unit blocks from per-example gradients, which need the inputs at the backward
            xhat = rule.unit_inputs(layer.name, module, x)
        if isinstance(output, Tensor) and output.dim():
            record.batches.append((layer.name, output.shape[0], rule.positions(module, output)))
        target = real_x if isinstance(real_x, Tensor) and real_x.requires_grad else (
            layer.weight if layer.weight.requires_grad else layer.bias)
        if target is not None:
            record.targets.append(target)
        if isinstance(hooked, Tensor) and hooked.requires_grad:
            hooked.register_hook(functools.partial(self._grad_hook, layer, record, xhat, view))

    def _attention_pre_hook(self, attention, layers, module, args):
        record = self._open
        watch = None
        if record is not None and record.capture:
            watch = Watch(attention, layers, self.saw)
            watch.__enter__()
        self._watches.append(watch)

    def _attention_hook(self, module, args, output):
        watch = self._watches.pop() if self._watches else None
        if watch is None:
            return
        watch.__exit__(None, None, None)
        if output is not None:  # None: the forward raised, and that error is the one to see
            watch.check()

    def _grad_hook(self, layer, record: _Record, xhat: Optional[Tensor], view, g: Tensor) -> None:
        mode = self._grad_mode
        if mode is None or not any(r is record for r in self._records):  # not wanted, or a finished step's
            return
        if view is not None:
            g = view(g)
        if mode == "curvature" and record is not self._active:
            return
        if mode != "curvature":
            record.reached = True
            if mode != "empirical":
                return
        if xhat is not None:
            item = (("F", layer.name), layer.rule.example_rows(layer.module, g, xhat))
        else:
            item = (("G", layer.name), layer.rule.grad_rows(layer.module, g, self.kfac_approx))
        if mode == "curvature":
            self._rows_G.append((*item, 1.0))
        else:
            record.rows_G.append(item)

    # ---- the outputs and the loss ---------------------------------------------------------------

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
        if self.spec.reduction != "mean":  # the data points, or 1: no layout to know
            return shape[0], self.spec.divisor(0, 0, shape[0])
        last = self._classes_last(shape, class_last)
        if last is None:
            raise ValueError(f"cross-entropy outputs of shape {tuple(shape)}: which dimension holds the classes "
                             "is not known; call opt.backward(loss, outputs), which tells it from the loss")
        flat = (math.prod(shape[:-1]), shape[-1]) if last else self.spec.flat_shape(shape)
        return shape[0], self.spec.normalizer(*flat)

    def _classes_last(self, shape, class_last: Optional[bool] = None) -> Optional[bool]:
        """Whether the loss reads these outputs' classes from their last dimension: cross-entropy over
        3+ dimensions as given (``class_last``) or learned for this shape (None: not known yet);
        False for every other layout, which the loss's own flattening reads."""
        if self.spec.name != "cross_entropy" or len(shape) < 3:
            return False
        return self._class_last.get(tuple(shape[1:])) if class_last is None else class_last

    def flat_outputs(self, outputs: Tensor, class_last: Optional[bool] = None) -> Tensor:
        """The outputs as the loss reads them, (terms, C): (B, T, V) logits whose classes are last
        as (B*T, V), otherwise the loss's own flattening."""
        if self._classes_last(outputs.shape, class_last):
            return outputs.reshape(-1, outputs.shape[-1])
        return self.spec.flatten_outputs(outputs)

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
        along_last = class_dim_is_last(g, outputs.shape)
        if along_last is None:  # nothing to learn from: torch's layout for this step, where G is zero anyway
            return False
        self._class_last[key] = along_last
        return along_last

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

    # ---- opt.backward ---------------------------------------------------------------------------

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
            raise ValueError(COMPILED)
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
        self.before_use()
        record.used = True
        if self.keep_inputs:
            self.last_inputs = record.inputs
        if record.capture:
            record.n, record.z = n, z
            rows_G = (self._curvature_passes(record, self.flat_outputs(outputs, class_last))
                      if self.fisher_type in CURVATURE_PASS else [])
            record.targets = []  # done with them: no layer inputs held past the backward
            self.flush(take_input_rows(record) + rows_G)  # A's and G's rows of every layer in one op call
            self.after_flush()
        loss.backward()

    def _curvature_passes(self, record: _Record, f: Tensor) -> Rows:
        """The G rows of ``record``'s forward from its outputs as the loss reads them, f (terms, C)."""
        if f.dtype in HALF:  # sample and build S in fp32 under autocast
            f = f.float()
        if not bool(torch.isfinite(f).all()):
            return []  # a diverged model: no curvature from it (its gradients will skip the step)
        self._g_divisor += self.mc_samples * record.z
        return self.passes(record, backward_scalars(self.spec, self.fisher_type, f, None, self.mc_samples,
                                                    self.generator()))

    def passes(self, record: _Record, scalars: Iterable[Tensor]) -> Rows:
        """The G rows of ``record``'s forward from the backward of each scalar, seen by the hooks on
        its layers' outputs on the way to the layers' inputs (or weights); .grad stays untouched."""
        targets = record.targets or [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]
        self._grad_mode, self._active = "curvature", record
        try:
            for phi in scalars:
                torch.autograd.grad(phi, targets, retain_graph=True, allow_unused=True)
        finally:
            self._grad_mode, self._active = self._idle_mode, None
        rows, self._rows_G = self._rows_G, []
        return rows

    def record_of(self, outputs: Tensor) -> _Record:
        """The record of the forward that returned ``outputs`` (ValueError if none)."""
        return self._find_record(outputs)

    # ---- the step -------------------------------------------------------------------------------

    def local_counts(self) -> Tuple[int, float]:
        """The data points and G's divisor of this step's forwards so far (MC and type-2), as
        ``step_rows`` will give them."""
        n = sum(r.n for r in self._records if r.capture and (r.used or r.reached) and r.n is not None)
        return n, (self._g_divisor if self.spec.reduction != "sum" else float(self.mc_samples))

    def step_rows(self, empirical_scale: Callable[[], float]) -> Optional[Tuple[Rows, int, float]]:
        """At a factor-update step: the rows still to accumulate (of forwards that a plain
        loss.backward() reached; the empirical Fisher's G rows, scaled by ``empirical_scale()``,
        1 / the GradScaler's scale squared), the data points N of the forwards that count, and the
        divisor of G; None when nothing counts (with a warning when that is a misuse)."""
        if not self.factor_step_due():
            return None
        counted = [r for r in self._records if r.capture and (r.used or r.reached)]
        if self.fisher_type in CURVATURE_PASS and not any(r.used for r in counted):
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
        rows = [item for r in counted for item in take_input_rows(r)]
        if self.fisher_type == "empirical":
            # The accumulated gradient is the loss's mean over all counted forwards, g_phi / Z: G
            # = Z * sum of its outer products (1 for a sum), whatever the micro-batches.
            z_total = sum(r.z for r in counted) if self.spec.reduction != "sum" else 1.0
            scale = float(z_total) * empirical_scale()
            g_div = 1.0
            if self.distributed:  # Z_p^2 / Z over the processes: each process's rows times Z_p^2, divided by the sum of Z_p
                scale, g_div = scale * float(z_total), float(z_total)
            rows += [(key, g, scale) for r in counted for key, g in r.rows_G]
            for r in counted:
                r.rows_G = []
        elif self.fisher_type == "forward-only":
            g_div = 1.0
        else:
            g_div = self._g_divisor if self.spec.reduction != "sum" else float(self.mc_samples)
        return rows, sum(r.n for r in counted), g_div

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
