"""The K-FAC machinery shared by ``KFAC`` and ``KFACPreconditioner``, one object per model, put
together from its parts, each in its own file:

- ``curvature/recording.py``: the hooks on the model, which forwards count, and the rows of the
  factors (shared with ``curvature.kfac``);
- ``_factors.py``: the factors' moving averages and eigendecompositions, staged per step;
- ``_directions.py``: the eigendecompositions and the preconditioned directions (batched ops);
- ``_quadratic.py``: the quadratic models (damping adaptation, adaptive step);
- ``_blocks.py``: a layer's parameters and block matrices; its rule is in ``curvature.rules``.

The factors follow the curvature layer's conventions (``natgrad_cuda.curvature``,
docs/curvature.md). The heavy lifting goes through the batched ops with ``impl`` = the backend:
``ops.factor_update_``, ``ops.eigh_batched`` and ``ops.precondition``; ``KFAC`` finishes the step
with ``ops.kfac_update_``.

A step is a transaction: ``prepare`` gathers this step's curvature and, when due, stages the new
moving averages and their eigendecompositions without touching the state; ``accept`` commits them;
``skip`` drops them, so that a step refused for a non-finite gradient, direction or update leaves
the factors, inverses and counters as they were.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._blocks import Layer
from ._chain import chain_check
from ._distributed import Distributed, describe, eigen_cost, refuse_sharded, sharing_bytes
from ._checks import check_bool, check_number, refuse_copy, warn_user
from ._directions import INVERSE_KEYS, directions
from ._factors import Factors
from ._quadratic import ggn_gram, quadratic_change
from .curvature.recording import COMPILED, Recorder
from .curvature import _layers
from .curvature._losses import LOSS_NAMES, REDUCTIONS, LossSpec
from .curvature.kfac import FISHER_TYPES, KFAC_APPROXES, STRUCTURES, is_joint
from .curvature.rules import rule_for
from .reference import INVERSES as KFAC_INVERSES

# The optimizer's ``inverse``: the ops' two K-FAC inverses, and EKFAC's scaling in the K-FAC eigenbasis.
INVERSES = KFAC_INVERSES + ("ekfac",)

__all__ = ["Engine", "BACKENDS"]

BACKENDS = ("auto", "reference", "native", "emulated")
# The Fisher types whose G needs the loss: the sampled or exact loss Hessian, or the normaliser Z.
_NEEDS_LOSS = ("mc", "type-2", "empirical")


class Engine:
    """Hooks, factors and inverses of one model. ``hyper()`` returns the current hyperparameters
    (a param group of ``KFAC`` or the preconditioner's own dict), read at every use so that
    schedulers and damping adaptation take effect at once."""

    def __init__(self, model: nn.Module, hyper: Callable[[], dict], *, loss: Optional[str], reduction: str,
                 fisher_type: str, mc_samples: int, kfac_approx: str, separate_weight_and_bias: bool,
                 inverse: str, backend: str, seed: Optional[int], grad_scaler,
                 max_consecutive_skips: Optional[int], owner: str, structure: str = "block-diagonal",
                 inverse_sharing: str = "eigenbases"):
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
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if structure != "block-diagonal" and fisher_type == "forward-only":
            raise ValueError(f"structure={structure!r} needs the output gradients: fisher_type='forward-only' has none")
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
            raise ValueError(COMPILED)
        refuse_sharded(model)
        self.dist = Distributed.current(inverse_sharing)
        self._pending, self._late = None, False  # data parallel: the factors' all-reduce in flight
        if self.dist is not None and structure == "block-tridiagonal" and inverse_sharing != "eigenbases":
            raise ValueError("structure='block-tridiagonal' needs every layer's inverse on every process: use "
                             "inverse_sharing='eigenbases'")
        # Layers are named inside a DistributedDataParallel wrapper (no "module." prefix), so that a
        # state saved by a data-parallel run loads into a single process and back; the hooks stay on
        # the model as given, whose forward is the one that runs.
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        inner = self.inner = model.module if self.ddp else model
        found, unsupported = _layers.find_layers(inner)
        if not found:
            raise ValueError(
                "model has no layer K-FAC supports (nn.Linear, nn.Conv1d, nn.Conv2d with zero padding, "
                "nn.ConvTranspose2d, nn.Embedding, the norm layers, or a module with a registered rule, with a trainable weight)"
            )
        for name, module in found:
            if not rule_for(module).weight(module).requires_grad:
                raise ValueError(f"layer {name!r}: K-FAC needs its weight trainable (a frozen weight with a "
                                 "trainable bias is not supported)")
        self.unsupported = unsupported
        if inverse == "ekfac":
            _check_ekfac(self.dist, inverse_sharing, structure, fisher_type, separate_weight_and_bias)
        slots, _ = _layers.parameter_slots(inner, found)
        self.layers = []
        unit_wise = structure == "unit-wise"
        for name, module in found:
            rule = rule_for(module)
            if unit_wise and rule.diagonal_input:
                raise ValueError(f"structure='unit-wise' does not cover layer {name!r} ({type(module).__name__}): its "
                                 "inputs are one-hot")
            bias = rule.bias(module)
            # per-unit blocks keep a unit's weight-bias terms (its bias is one of its incoming weights)
            joint = (unit_wise or is_joint(slots[name], separate_weight_and_bias)) and bias is not None and bias.requires_grad
            self.layers.append(Layer(name, module, joint, unit_wise))
        self.structure = structure
        if structure == "block-tridiagonal":
            chain_check(self.layers, separate_weight_and_bias)
            for layer, following in zip(self.layers[:-1], self.layers[1:]):
                layer.next_dims = (following.in_dim, following.out_dim)
        self.model, self.hyper, self.owner = model, hyper, owner
        self.spec = LossSpec.from_name(loss, reduction) if loss is not None else None
        self.fisher_type, self.kfac_approx, self.inverse = fisher_type, kfac_approx, inverse
        self.mc_samples = mc_samples if fisher_type == "mc" else 1
        self.impl = None if backend == "auto" else backend
        self.grad_scaler = grad_scaler

        device = self.layers[0].weight.device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.steps = 0  # completed (not skipped) steps
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_rho: Optional[float] = None
        self.factors = Factors(self.layers, hyper, self.impl, owner)
        self.factors.inverse = inverse
        if inverse == "ekfac":
            self.factors.ekfac = _ekfac_layers(self.layers, owner)
        self.recorder = Recorder(model, self.layers, spec=self.spec, fisher_type=fisher_type, kfac_approx=kfac_approx,
                                 mc_samples=self.mc_samples, owner=owner, factor_step_due=self.factor_step_due,
                                 generator=self._mc_generator, flush=self.factors.flush,
                                 before_use=self.follow_parameters)
        self.recorder.unit_wise = unit_wise
        if structure == "block-tridiagonal":
            self.factors.chain = [layer.name for layer in self.layers]
        if self.dist is not None:
            self._set_up_distributed(dict(owner=owner, fisher_type=fisher_type, mc_samples=self.mc_samples,
                                          kfac_approx=kfac_approx, separate_weight_and_bias=separate_weight_and_bias,
                                          inverse=inverse, structure=structure, inverse_sharing=inverse_sharing,
                                          loss=loss, reduction=reduction,
                                          layers=tuple(layer.name for layer in self.layers),
                                          hyper=tuple(sorted((k, v) for k, v in hyper().items() if k != "params"))))

    def _set_up_distributed(self, options: dict) -> None:
        """Data parallel: the same optimizer on every process (else a ValueError on all), each
        layer's owner, one MC generator state everywhere (rank 0's) and this process's stream."""
        dist = self.dist
        dist.check_same_everywhere(describe(self.inner, options))
        dist.assign({layer.name: eigen_cost(layer.shapes()) for layer in self.layers},
                    {layer.name: sharing_bytes(layer.shapes(), self.hyper()["inv_update_freq"]) for layer in self.layers})
        self.factors.dist = dist
        self.recorder.distributed = True
        if self.fisher_type in ("mc", "type-2"):  # all of a step's sums exist once the curvature pass ran
            self.recorder.after_flush = self._start_factor_sum
        (seed,) = dist.share([torch.randint(0, 2**52, (), generator=self.generator, device=self.generator.device
                                            ).double().to(dist.device)], [dist.rank == 0], "scalars")
        self.mc_seed = int(seed)
        self._next_stream()

    def _start_factor_sum(self) -> None:
        """Data parallel, at the end of opt.backward's curvature pass: the factors' all-reduce is
        launched, and runs while loss.backward() (and DDP's gradient all-reduce) does. A second
        backward in the step makes the step's sums reduced at step() instead."""
        if self._pending is not None:
            self._late = True
            return
        n, g_div = self.recorder.local_counts()
        self._pending = self.dist.start_factors(self.factors._sums, self.factors.layout(), n, g_div)
        self._late = False

    def _next_stream(self) -> None:
        """Data parallel: this process's MC stream for the next step, a function of the run's seed,
        the step (taken or skipped) and the rank, so that a resumed run draws what it would have."""
        if self.dist is not None:
            self._stream = self.dist.rank_generator(self.mc_seed, self.steps + self.skipped_steps,
                                                    self.generator.device)

    def _mc_generator(self) -> torch.Generator:
        return self.generator if self.dist is None else self._stream

    __deepcopy__ = __copy__ = __reduce_ex__ = refuse_copy

    @property
    def state(self) -> Dict[str, Dict[str, Tensor]]:
        """Every layer's committed factors and eigendecompositions."""
        return self.factors.state

    @property
    def keep_inputs(self) -> bool:
        return self.recorder.keep_inputs

    @keep_inputs.setter
    def keep_inputs(self, value: bool) -> None:  # KFAC(adaptive_step=True): the forward's inputs, for J v
        self.recorder.keep_inputs = value

    def factor_step_due(self) -> bool:
        return self.steps % self.hyper()["factor_update_freq"] == 0

    def inverse_step_due(self) -> bool:
        return self.steps % self.hyper()["inv_update_freq"] == 0

    def backward(self, loss: Tensor, outputs: Tensor) -> None:
        """loss.backward(), preceded on factor-update steps by the curvature passes that give G."""
        self.recorder.backward(loss, outputs)

    def follow_parameters(self) -> None:
        """Factors follow their layer's parameters to a new dtype or device (``model.double()``,
        ``model.half()``, ``model.to(device)`` after the optimizer was built)."""
        moved = [layer for layer in self.layers if layer.placement != (layer.weight.dtype, layer.weight.device)]
        for layer in moved:
            layer.placement = (layer.weight.dtype, layer.weight.device)
            self.factors.follow(layer)
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
        got = self.recorder.step_rows(lambda: self._empirical_scale(grad_scale))
        n, g_div = 0, 0.0
        if got is not None:
            rows, n, g_div = got
            self.factors.flush(rows)
            if rows:  # rows after the launch (a forward a plain backward reached): reduce everything at once
                self._late = True
        if self.dist is not None and self.factor_step_due():  # the global batch's factors, on every process
            pending, self._pending = self._pending, None
            if pending is not None and not self._late:  # launched in backward, overlapping loss.backward()
                n, g_div = self.dist.finish_factors(pending, self.factors._sums)
            else:
                if pending is not None:  # several backwards this step: their sum, all at once
                    self.dist.finish(pending[1])
                started = self.dist.start_factors(self.factors._sums, self.factors.layout(), n, g_div)
                n, g_div = self.dist.finish_factors(started, self.factors._sums)
        self.factors.stage(n, g_div, self.fisher_type == "forward-only", self.inverse_step_due())

    def _empirical_scale(self, grad_scale: Optional[float]) -> float:
        """1 / the GradScaler's scale squared: the empirical Fisher's rows come from scaled gradients."""
        s = grad_scale if grad_scale is not None else (
            self.grad_scaler.get_scale() if self.grad_scaler is not None and self.grad_scaler.is_enabled() else 1.0)
        return 1.0 / (s * s)

    def preconditioned(self):
        """{id(param): preconditioned gradient} for every K-FAC layer with an inverse, undamped by
        KL clipping, and per block (params, M, A_block, G) for the quadratic model."""
        share = None
        if self.dist is not None and any(self.dist.keeps(layer.name) for layer in self.layers):
            share = self._share_directions
        return directions(self.layers, self.factors.current(), self.hyper()["damping"], self.inverse, self.impl,
                          chain=self.structure == "block-tridiagonal", share=share)

    def _share_directions(self, computed):
        """Every block's direction of a layer whose directions are shared, from its owner."""
        keys, tensors, mine = [], [], []
        out = {key: P for key, P in computed.items() if not self.dist.keeps(key[0])}
        for layer in self.layers:
            if not self.dist.keeps(layer.name):
                continue
            for i, (params, _) in enumerate(layer.blocks()):
                if any(p.grad is None for p in params):
                    continue
                have = (layer.name, i) in computed and self.dist.owns(layer.name)
                M = layer.matrix(params, [p.grad for p in params])
                keys.append((layer.name, i))
                tensors.append(computed[(layer.name, i)].contiguous() if have else torch.zeros_like(M))
                mine.append(have)
        *shared, flags = self.dist.share(tensors + [self.dist.flags(mine)], mine + [True], "directions")
        out.update({key: P for key, P, flag in zip(keys, shared, flags.tolist()) if flag > 0})
        return out

    def sync_gradients(self, params: List[Tensor]) -> None:
        """Data parallel without DistributedDataParallel: the gradients' mean over the processes."""
        if self.dist is not None and not self.ddp:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                self.dist.average_gradients(grads)

    def mean_over_processes(self, values: List[float]) -> List[float]:
        """The mean of some batch quantities (the damping adaptation's losses) over the processes."""
        if self.dist is None:
            return values
        return [v / self.dist.world for v in self.dist.sum_scalars(values)]

    def accept(self) -> None:
        """Commit what ``prepare`` staged: the new moving averages (and inverses)."""
        self.factors.accept()

    def step_done(self) -> None:
        self.accept()
        self.steps += 1
        self.consecutive_skips = 0
        self._reset()
        self._next_stream()

    def skip(self, message: Optional[str]) -> None:
        """Drop this step (its recordings and anything staged), count it, say so (``message``
        None: a GradScaler's routine skip, silent) at the 1st, 2nd, 4th, 8th ... skip in a row (a
        diverged run does not print a warning per step; ``skipped_steps`` counts them all), and raise
        once too many were skipped in a row."""
        self.discard()
        self._next_stream()
        self.skipped_steps += 1
        self.consecutive_skips += 1
        n = self.consecutive_skips
        if message is not None and n & (n - 1) == 0:
            warn_user(f"{message} ({n} in a row, {self.skipped_steps} skipped in all; the next note at {2 * n} "
                      "in a row)")
        limit = self.max_consecutive_skips
        if limit is not None and self.consecutive_skips >= limit:
            raise RuntimeError(
                f"{self.owner}: the last {self.consecutive_skips} steps were all skipped (non-finite gradients, "
                "directions or updates), so training is making no progress. Look for the source of the NaN/Inf "
                "(the loss, the data, a too large lr or a too small damping); max_consecutive_skips=None "
                "disables this error")

    def discard(self) -> None:
        """Forget this step's recordings and anything staged, without counting a skip."""
        if self._pending is not None:  # every process launched it: every process waits for it
            self.dist.finish(self._pending[1])
            self._pending = None
        self.factors.drop()
        self._reset()

    def _reset(self) -> None:
        self.recorder.reset()
        self.factors.reset()

    # ---- the quadratic models -----------------------------------------------------------------

    def quadratic_change(self, deltas: Dict[int, Tensor], grads: Dict[int, Tensor], blocks) -> float:
        return quadratic_change(deltas, grads, blocks)

    def ggn_gram(self, params: List[Tensor], directions_: List[List[Tensor]]) -> Tensor:
        return ggn_gram(self.model, self.spec, self.recorder.flat_outputs, self.recorder.last_inputs, params,
                        directions_, self.recorder.suspended, None if self.dist is None else self._global_gram)

    def _global_gram(self, products: Tensor, divisor: float) -> Tuple[Tensor, float]:
        """The adaptive step's GGN products and divisor summed over the processes: the global batch's."""
        summed, total = self.dist.sum_tensors([products, torch.tensor([divisor], dtype=torch.float64,
                                                                      device=products.device)], "scalars")
        return summed, float(total)

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The K-FAC state; with inverse_sharing="directions" it gathers every owner's inverses, so
        every process must call it (a collective), and any process's copy is complete."""
        layers = {name: {k: v.clone() for k, v in st.items()} for name, st in self.factors.state.items()}
        if self.dist is not None and any(self.dist.keeps(layer.name) for layer in self.layers):
            self._gather_inverses(layers)
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "layers": layers,
            "generator": self.generator.get_state(),
            "last_rho": self.last_rho,
            "fisher_type": self.fisher_type,
            "inverse": self.inverse,
            "structure": self.structure,
            "mc_seed": getattr(self, "mc_seed", None),
            "inverse_damping": self.factors.inverse_damping,
        }

    def _gather_inverses(self, layers: Dict[str, Dict[str, Tensor]]) -> None:
        """Every layer's inverses from its owner, into ``layers`` (in place)."""
        kept = [layer for layer in self.layers if self.dist.keeps(layer.name)]
        entries = [{k: v for k, v in layers[layer.name].items() if k in INVERSE_KEYS}
                   if self.dist.owns(layer.name) else None for layer in kept]
        like = [torch.empty(0, dtype=layer.factor_dtype, device=layer.weight.device) for layer in kept]
        for layer, got in zip(kept, self.dist.share_entries(entries, INVERSE_KEYS, like, "inverses")):
            if got is not None:
                layers[layer.name].update({k: t.clone() for k, t in got.items()})

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
        if sd.get("structure", "block-diagonal") != self.structure:  # older states are block-diagonal
            raise ValueError(f"state_dict: saved with structure={sd.get('structure', 'block-diagonal')!r}, this "
                             f"optimizer uses {self.structure!r}")
        if sd["inverse"] not in INVERSES:
            raise ValueError(f"state_dict: entry 'inverse' must be one of {INVERSES}, got {sd['inverse']!r}")
        counters = {}
        for key in ("steps", "skipped_steps", "consecutive_skips"):
            value = sd.get(key, 0)  # the skip counters are newer than the format
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict: entry {key!r} must be an int >= 0, got {value!r}")
            counters[key] = value
        inverse_damping = sd.get("inverse_damping")  # newer than the format: None redoes explicit inverses
        if inverse_damping is not None and (isinstance(inverse_damping, bool) or not isinstance(inverse_damping, (int, float))):
            raise ValueError(f"state_dict: entry 'inverse_damping' must be a float or None, got {inverse_damping!r}")
        rho = sd["last_rho"]
        if rho is not None and (isinstance(rho, bool) or not isinstance(rho, (int, float))):
            raise ValueError(f"state_dict: entry 'last_rho' must be a float or None, got {rho!r}")
        generator = self._checked_generator(sd["generator"])
        layers = sd["layers"]
        if not isinstance(layers, dict) or set(layers) != set(self.factors.state):
            got = sorted(layers) if isinstance(layers, dict) else type(layers).__name__
            raise ValueError(f"state_dict: its K-FAC layers {got} are not this model's {sorted(self.factors.state)}")
        loaded = {layer.name: Factors.checked_layer_state(layer, layers[layer.name]) for layer in self.layers}

        def load() -> None:
            if self.dist is not None:  # a layer whose directions are shared: only its owner keeps its inverses
                for name, st in loaded.items():
                    if self.dist.keeps(name) and not self.dist.owns(name):
                        for key in INVERSE_KEYS:
                            st.pop(key, None)
            if self.inverse != "factored":  # a factored run's explicit inverses: eigendecompositions at the next step
                for st in loaded.values():
                    if "IG" in st:
                        for key in INVERSE_KEYS:
                            st.pop(key, None)
            self.factors.settle_scalings(loaded)
            self.factors.state = loaded
            self.factors.inverse_damping = None if inverse_damping is None else float(inverse_damping)
            self.steps, self.skipped_steps = counters["steps"], counters["skipped_steps"]
            self.consecutive_skips = counters["consecutive_skips"]
            self.generator = generator
            self.last_rho = None if rho is None else float(rho)
            self.discard()
            if self.dist is not None:  # a single process's state has none: one from its generator, alike everywhere
                saved = sd.get("mc_seed")
                self.mc_seed = int(saved) if isinstance(saved, int) and not isinstance(saved, bool) else int(
                    torch.randint(0, 2**52, (), generator=generator, device=generator.device).item())
            self._next_stream()

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

    def suspended(self):
        """Context in which forwards are not recorded (the damping adaptation's loss evaluations)."""
        return self.recorder.suspended()

    def remove(self) -> None:
        self.recorder.remove()


def _check_ekfac(dist, inverse_sharing: str, structure: str, fisher_type: str, separate_weight_and_bias: bool
                 ) -> None:
    """ValueError for what inverse="ekfac" does not cover (yet): its scaling pairs each row of A with
    the G rows of the same data point, which the curvature passes give per forward, and every process
    sums its rows' share in the eigenbasis, which it must hold."""
    if dist is not None and inverse_sharing != "eigenbases":
        raise ValueError(f"inverse='ekfac' under torch.distributed needs every layer's eigenbasis on every process "
                         f"(each sums its share of the scaling in it): use inverse_sharing='eigenbases', not "
                         f"{inverse_sharing!r}")
    if structure != "block-diagonal":
        raise ValueError(f"inverse='ekfac' rescales the block-diagonal K-FAC eigenbasis; structure={structure!r} "
                         "has none")
    if fisher_type not in ("type-2", "mc"):
        raise ValueError(f"inverse='ekfac' needs fisher_type 'type-2' or 'mc' (its scaling pairs each input row with "
                         f"the curvature pass's output gradients of the same data point), got {fisher_type!r}")
    if separate_weight_and_bias:
        raise ValueError("inverse='ekfac' scales the joint weight-and-bias block: use separate_weight_and_bias=False")


def _ekfac_layers(layers: List[Layer], owner: str) -> set:
    """The layers EKFAC rescales: nn.Linear ones (their input rows pair one to one with their output
    gradients' rows); the others keep K-FAC's own scaling, with a warning naming them."""
    mine = {layer.name for layer in layers if isinstance(layer.module, nn.Linear) and not layer.per_unit}
    others = [f"{layer.name!r} ({type(layer.module).__name__})" for layer in layers if layer.name not in mine]
    if others:
        warn_user(f"{owner}: inverse='ekfac' rescales nn.Linear layers only; layers {', '.join(others)} keep K-FAC's "
                  "own scaling (inverse='eigen')")
    for layer in layers:
        layer.ekfac = layer.name in mine
    return mine
