"""K-FAC factors of a model's Fisher / GGN over a data set: ``kfac(model, loss_fn, data, ...)``.

Conventions (normalisation, the loss-Hessian square roots, the dense layout) follow curvlinops 3.x
and are written down in ``docs/curvature.md``. Every factor accumulation goes through
``natgrad_cuda.ops.factor_update_``, so the native kernels do the heavy lifting when compiled.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..reference import accumulation_dtype
from ._layers import (ParamSlot, find_layers, parameter_slots, unit_indices, write_dense_blocks,
                      write_unit_blocks)
from .recording import Recorder, Tap, backward_scalars, take_input_rows
from .rules import DiagonalRows, EntryRows, LinearRule, rule_for
from ._losses import LossSpec

__all__ = ["kfac", "KFACCurvature", "FISHER_TYPES", "KFAC_APPROXES", "STRUCTURES", "iter_batches", "accumulate_rows",
           "is_joint", "drop_cross_terms", "check_chain"]

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROXES = ("expand", "reduce")
STRUCTURES = ("block-diagonal", "block-tridiagonal", "unit-wise")


@dataclass
class KFACCurvature:
    """K-FAC factors, keyed by the module's name in ``model.named_modules()``.

    ``input_covariances[name]`` is A (with the bias's constant 1 as its last entry when weight and
    bias are joint; the vector of its diagonal for a layer whose A is diagonal, an embedding),
    ``gradient_covariances[name]`` is G. A scale-and-shift layer (a norm) has no Kronecker factors:
    ``scale_shift_blocks[name]`` (P, k, k) is the exact block of each weight entry with its bias
    entry (k = 2; 1 without a trained bias), diagonal when weight and bias are separate.
    ``dense()`` assembles the (P, P) matrix.

    ``structure="unit-wise"``: ``unit_blocks[name]`` (out, k, k) is the exact block of each output
    unit's incoming weights and bias (k = d_in + 1; d_in without a trained bias), for every layer,
    and the other dicts are empty. ``structure="block-tridiagonal"``: also
    ``cross_input_covariances[(a, b)]`` and ``cross_gradient_covariances[(a, b)]`` of each pair of
    neighbouring layers of the chain (the inputs' with the bias's 1 appended to each layer that has
    a bias, whether or not weight and bias are joint), and ``dense()`` is the chain-structured
    matrix whose inverse is block tri-diagonal (docs/curvature.md).
    """

    input_covariances: Dict[str, Tensor]
    gradient_covariances: Dict[str, Tensor]
    scale_shift_blocks: Dict[str, Tensor]
    fisher_type: str
    kfac_approx: str
    separate_weight_and_bias: bool
    mc_samples: int
    num_data: int
    num_params: int  # P: the size of all of model.parameters(), flattened
    _slots: Dict[str, ParamSlot] = field(repr=False)
    structure: str = "block-diagonal"
    unit_blocks: Dict[str, Tensor] = field(default_factory=dict)
    cross_input_covariances: Dict[Tuple[str, str], Tensor] = field(default_factory=dict)
    cross_gradient_covariances: Dict[Tuple[str, str], Tensor] = field(default_factory=dict)

    @property
    def modules(self) -> List[str]:
        return [name for name in self._slots]

    def _any(self) -> Tensor:
        return next(iter({**self.input_covariances, **self.scale_shift_blocks, **self.unit_blocks}.values()))

    @property
    def dtype(self) -> torch.dtype:
        return self._any().dtype

    @property
    def device(self) -> torch.device:
        return self._any().device

    def is_joint(self, name: str) -> bool:
        """Whether module ``name``'s weight and bias share one Kronecker product."""
        return is_joint(self._slots[name], self.separate_weight_and_bias)

    def dense(self) -> Tensor:
        """The block-diagonal (P, P) matrix in model.parameters() order; zero blocks for the
        parameters of layers K-FAC does not cover."""
        out = torch.zeros(self.num_params, self.num_params, dtype=self.dtype, device=self.device)
        if self.structure == "block-tridiagonal":
            self._write_chain(out)
            return out
        for name, slot in self._slots.items():
            blocks = self.unit_blocks.get(name, self.scale_shift_blocks.get(name))
            if blocks is not None:
                write_unit_blocks(out, slot, blocks)
                continue
            write_dense_blocks(
                out, slot, self.input_covariances[name], self.gradient_covariances[name], self.is_joint(name)
            )
        return out


    def _write_chain(self, out: Tensor) -> None:
        """The chain-structured approximation (Martens and Grosse 2015, section 4.3) of the
        Kronecker-factored Fisher F~, whose blocks are kron(G_ij, A_ij): the covariance of the
        Gaussian Markov chain with F~'s diagonal and first off-diagonal blocks, block (i, j), i < j,
        Psi_i Psi_i+1 ... Psi_j-1 F~_jj with Psi_i = F~_i,i+1 F~_i+1,i+1^+ = kron(Gc G^+, Ac A^+) (^+
        the pseudo-inverse). It agrees with F~ on those blocks, and its inverse, where it has one,
        is block tri-diagonal. With weight and bias separate the weights and the biases form two
        chains (a bias's A is the constant 1)."""
        names = self.modules
        pairs = list(zip(names[:-1], names[1:]))
        one = torch.ones(1, 1, dtype=self.dtype, device=self.device)
        chains = []
        if not self.separate_weight_and_bias:
            chains.append([(self.input_covariances[n], self.gradient_covariances[n],
                            unit_indices(self._slots[n], self.input_covariances[n].shape[0], out.device).reshape(-1))
                           for n in names])
            crosses = [(self.cross_input_covariances[p], self.cross_gradient_covariances[p]) for p in pairs]
            chains[-1] = (chains[-1], crosses)
        else:
            weights = []
            for n in names:
                d = self._slots[n].in_features
                weights.append((self.input_covariances[n], self.gradient_covariances[n],
                                unit_indices(self._slots[n], d, out.device).reshape(-1)))
            crosses = [(self.cross_input_covariances[(a, b)][:self._slots[a].in_features, :self._slots[b].in_features],
                        self.cross_gradient_covariances[(a, b)]) for a, b in pairs]
            chains.append((weights, crosses))
            biases = [None if self._slots[n].bias is None else
                      (one, self.gradient_covariances[n],
                       self._slots[n].bias + torch.arange(self._slots[n].out_features, device=out.device))
                      for n in names]
            chains.append((biases, [(one, Gc) for _, Gc in crosses]))
        for layers, crosses in chains:
            _write_markov_chain(out, layers, crosses)


def _write_markov_chain(out: Tensor, layers, crosses) -> None:
    """Blocks of the chain covariance: ``layers`` [(A, G, index)] (None: no block, which breaks
    the chain), ``crosses`` [(Ac, Gc)] between neighbours; block (i, j) is kron(MG, MA) at rows
    index_i and columns index_j."""
    psi = []
    for i, (Ac, Gc) in enumerate(crosses):
        if layers[i] is None or layers[i + 1] is None:
            psi.append(None)
            continue
        A, G, _ = layers[i + 1]
        psi.append((Ac @ torch.linalg.pinv(A, hermitian=True), Gc @ torch.linalg.pinv(G, hermitian=True)))
    for j, layer in enumerate(layers):
        if layer is None:
            continue
        MA, MG, cols = layer
        out[cols[:, None], cols[None, :]] = torch.kron(MG, MA)
        for i in range(j - 1, -1, -1):
            if psi[i] is None:
                break
            MA, MG = psi[i][0] @ MA, psi[i][1] @ MG
            rows = layers[i][2]
            block = torch.kron(MG, MA)
            out[rows[:, None], cols[None, :]] = block
            out[cols[:, None], rows[None, :]] = block.T


def kfac(
    model: nn.Module,
    loss_fn: nn.Module,
    data,
    fisher_type: str = "mc",
    mc_samples: int = 1,
    kfac_approx: str = "expand",
    separate_weight_and_bias: bool = True,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
    structure: str = "block-diagonal",
) -> KFACCurvature:
    """K-FAC of ``model``'s curvature for ``loss_fn`` over ``data``.

    data: one (inputs, targets) pair or an iterable of them (list, generator, DataLoader); the
    result equals that of one batch holding all of them. fisher_type: "type-2" (exact loss Hessian,
    one backward pass per output class), "mc" (``mc_samples`` sampled targets per data point;
    ignored otherwise), "empirical" (the true targets) or "forward-only" (G = I). kfac_approx:
    "expand" or "reduce" for weight-shared layers. seed: None draws MC targets from torch's global
    RNG, an int from a private generator seeded with it. backend: the ``impl`` of
    ``ops.factor_update_``. structure: "block-diagonal" (K-FAC), "block-tridiagonal" (Martens and
    Grosse's chain: the layers, in model order, must be nn.Linear layers on (B, in) inputs, each run
    once per forward) or "unit-wise" (an exact block per output unit: its incoming weights and
    bias, always together; kfac_approx and separate_weight_and_bias do not apply). Neither of the
    last two takes fisher_type="forward-only". Supported layers: those with a rule (``curvature.rules``: nn.Linear,
    nn.Conv1d, nn.Conv2d with zero padding, nn.ConvTranspose2d, nn.Embedding, the norm layers
    (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d/2d/3d: exact per-entry blocks, in
    ``scale_shift_blocks``), and any registered with ``register_rule``); other modules with
    trainable parameters get a warning and zero blocks in ``dense()``.
    """
    spec = LossSpec.from_module(loss_fn)
    _check_options(fisher_type, mc_samples, kfac_approx, separate_weight_and_bias, seed, backend)
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if structure != "block-diagonal" and fisher_type == "forward-only":
        raise ValueError(f"structure={structure!r} needs the output gradients: fisher_type='forward-only' has none")
    unit_wise = structure == "unit-wise"
    if fisher_type != "mc":
        mc_samples = 1

    layers, unsupported = find_layers(model)
    if not layers:
        raise ValueError(
            "model has no layer K-FAC supports (nn.Linear, nn.Conv1d, nn.Conv2d with zero padding, "
            "nn.ConvTranspose2d, nn.Embedding, the norm layers, or a module with a registered rule, with a trainable parameter)"
        )
    if unsupported:
        warnings.warn(
            f"K-FAC does not support the layers {', '.join(unsupported)}; parameters that no covered layer holds "
            "get zero blocks in the curvature",
            UserWarning,
            stacklevel=2,
        )
    slots, num_params = parameter_slots(model, layers)
    taps = [Tap(name, module) for name, module in layers]
    joint = {name: is_joint(slots[name], separate_weight_and_bias) for name, _ in layers}
    if structure == "block-tridiagonal":
        check_chain(taps)
    chain = taps if structure == "block-tridiagonal" else []
    A, G, F = {}, {}, {}
    for tap in taps:
        name, module, w = tap.name, tap.module, tap.weight
        dtype = accumulation_dtype(w.dtype)
        if tap.rule.scale_shift or unit_wise:
            if tap.rule.diagonal_input:
                raise ValueError(f"structure='unit-wise' does not cover layer {name!r} ({type(module).__name__}): its "
                                 "inputs are one-hot")
            k = slots[name].in_features + int(tap.bias is not None)
            F[name] = torch.zeros(slots[name].out_features, k, k, dtype=dtype, device=w.device)
            continue
        d_in = slots[name].in_features + int(joint[name])
        # a diagonal A (one-hot inputs: an embedding) is kept as a vector
        A[name] = torch.zeros((d_in,) if rule_for(module).diagonal_input else (d_in, d_in), dtype=dtype,
                              device=w.device)
        d_out = slots[name].out_features
        G[name] = torch.zeros(d_out, d_out, dtype=dtype, device=w.device)

    factors = {"A": A, "G": G, "F": F}
    cross = {"A": {}, "G": {}}
    for a, b in zip(chain[:-1], chain[1:]):
        dtype = A[a.name].dtype
        cross["A"][(a.name, b.name)] = torch.zeros(slots[a.name].in_features + int(slots[a.name].bias is not None),
                                                   slots[b.name].in_features + int(slots[b.name].bias is not None),
                                                   dtype=dtype, device=a.weight.device)
        cross["G"][(a.name, b.name)] = torch.zeros(slots[a.name].out_features, slots[b.name].out_features,
                                                   dtype=dtype, device=a.weight.device)
    capture_grads = fisher_type != "forward-only"
    generator = None
    if fisher_type == "mc" and seed is not None:
        generator = torch.Generator(device=taps[0].weight.device).manual_seed(seed)
    # The optimizers' hooks (one implementation): a record per forward, A rows from the layers'
    # inputs, G rows from the backward of each scalar seen at the layers' outputs (and a
    # scale-and-shift layer's F rows from either).
    recorder = Recorder(model, taps, spec=spec,
                        fisher_type=fisher_type, kfac_approx=kfac_approx, mc_samples=mc_samples,
                        owner="curvature.kfac", factor_step_due=lambda: True, generator=lambda: generator,
                        flush=lambda rows: None, before_use=lambda: None)
    recorder.record_without_grad = not capture_grads
    recorder.unit_wise = unit_wise
    num_data, z, ran = 0, 0, set()
    try:
        for inputs, targets in iter_batches(data):
            with torch.enable_grad() if capture_grads else torch.no_grad():
                outputs = model(inputs)
            spec.check(outputs, targets)
            record = recorder.record_of(outputs)
            rows = take_input_rows(record)
            ran.update(name for (_, name), _, _ in rows)
            _accumulate(factors, rows, joint, backend)
            _accumulate_cross(cross["A"], rows, "A", outputs.shape[0], slots)
            num_data += outputs.shape[0]
            if not capture_grads:
                continue
            f = spec.flatten_outputs(outputs)
            z += spec.normalizer(*f.shape)
            for phi in backward_scalars(spec, fisher_type, f, spec.flatten_targets(targets, outputs), mc_samples,
                                        generator):
                # One scalar at a time, its rows accumulated at once; the graph is retained for the
                # next scalar and freed with this batch's outputs.
                rows = recorder.passes(record, [phi])
                ran.update(name for (_, name), _, _ in rows)
                _accumulate(factors, rows, joint, backend)
                _accumulate_cross(cross["G"], rows, "G", outputs.shape[0], slots)
            recorder.reset()
    finally:
        recorder.remove()
    if num_data == 0:
        raise ValueError("data is empty: it holds no (inputs, targets) batch with a data point")
    idle = [tap.name for tap in taps if tap.name not in ran]
    if idle:
        warnings.warn(f"K-FAC layers {', '.join(map(repr, idle))} did not run as modules in the forwards (is their "
                      "weight used functionally?); their factors are zero", UserWarning, stacklevel=2)

    for tap in taps:
        name = tap.name
        if not all(bool(torch.isfinite(kind[name]).all()) for kind in (A, G, F) if name in kind):
            raise ValueError(f"the K-FAC factors of layer {name!r} are not finite: the data, the model's parameters "
                             "or its outputs hold NaN or Inf")
    for a in [*A.values(), *cross["A"].values()]:
        a.div_(num_data)
    if fisher_type == "forward-only":
        G = {name: torch.eye(g.shape[0], dtype=g.dtype, device=g.device) for name, g in G.items()}
    else:
        divisor = mc_samples * (z if spec.reduction == "mean" else 1)
        for g in [*G.values(), *cross["G"].values()]:
            g.div_(divisor)
    for name, f in F.items():  # the G side's normaliser, or A's for the forward-only Fisher
        f.div_(num_data if fisher_type == "forward-only" else divisor)
        if not joint[name] and not unit_wise:
            drop_cross_terms(f)
    return KFACCurvature(
        input_covariances=A,
        gradient_covariances=G,
        scale_shift_blocks={} if unit_wise else F,
        unit_blocks=F if unit_wise else {},
        structure=structure,
        cross_input_covariances=cross["A"],
        cross_gradient_covariances=cross["G"],
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        separate_weight_and_bias=separate_weight_and_bias,
        mc_samples=mc_samples,
        num_data=num_data,
        num_params=num_params,
        _slots=slots,
    )


def check_chain(taps: List[Tap]) -> None:
    """ValueError unless the layers (``Tap``s, in model order) can form a block tri-diagonal chain:
    nn.Linear layers only (the optimizer and ``kfac`` share this check)."""
    others = [f"{tap.name!r} ({type(tap.module).__name__})" for tap in taps
              if not (isinstance(tap.module, nn.Linear) and type(tap.rule) is LinearRule)]
    if others:
        raise ValueError("structure='block-tridiagonal' covers chains of nn.Linear layers on (B, in) inputs; the model "
                         f"also has {', '.join(others)}")


def _accumulate_cross(cross: Dict[Tuple[str, str], Tensor], rows, kind: str, batch: int,
                      slots: Dict[str, ParamSlot]) -> None:
    """Adds rows_a^T rows_b of each pair (a, b) of neighbouring chain layers (one row per data point
    and backward scalar, paired by position; A's rows with the bias's 1)."""
    if not cross:
        return
    mine: Dict[str, Tensor] = {}
    for (k, name), r, _ in rows:
        if k != kind:
            continue
        if name in mine:
            raise ValueError(f"structure='block-tridiagonal': layer {name!r} ran twice in one forward; the chain needs "
                             "each layer once")
        if r.shape[0] != batch:
            raise ValueError(f"structure='block-tridiagonal': layer {name!r} saw {r.shape[0]} rows for a batch of "
                             f"{batch} (inputs with positions, (B, T, in)?); the chain needs nn.Linear layers on "
                             "(B, in) inputs")
        if kind == "A" and slots[name].bias is not None:
            r = torch.cat([r, torch.ones_like(r[:, :1])], 1)
        mine[name] = r
    for (a, b), C in cross.items():
        if a in mine and b in mine:
            C.add_(mine[a].to(C.dtype).T @ mine[b].to(C.dtype))


def is_joint(slot: ParamSlot, separate_weight_and_bias: bool) -> bool:
    """Weight and bias share one Kronecker product: A carries a constant 1 for the bias."""
    return not separate_weight_and_bias and slot.bias is not None


def _check_options(fisher_type, mc_samples, kfac_approx, separate_weight_and_bias, seed, backend) -> None:
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if kfac_approx not in KFAC_APPROXES:
        raise ValueError(f"kfac_approx must be one of {KFAC_APPROXES}, got {kfac_approx!r}")
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
    if not isinstance(separate_weight_and_bias, bool):
        raise ValueError(f"separate_weight_and_bias must be a bool, got {separate_weight_and_bias!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be None or an int, got {seed!r}")
    if backend not in ops.IMPLS:
        raise ValueError(f"backend must be one of {ops.IMPLS}, got {backend!r}")


def iter_batches(data) -> Iterator[Tuple[Tensor, Tensor]]:
    """(inputs, targets) pairs from one pair or an iterable of pairs (consumed once)."""
    if _is_batch(data):
        yield data[0], data[1]
        return
    try:
        batches = iter(data)
    except TypeError:
        raise ValueError(
            f"data must be an (inputs, targets) pair or an iterable of them, got {type(data).__name__}"
        ) from None
    for batch in batches:
        if not _is_batch(batch):
            raise ValueError(
                f"data: every batch must be an (inputs, targets) pair with tensor inputs, got {type(batch).__name__}"
            )
        yield batch[0], batch[1]


def _is_batch(obj) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], Tensor)


def drop_cross_terms(F: Tensor) -> Tensor:
    """Scale-and-shift blocks (P, 2, 2) with weight and bias separate: their off-diagonals zeroed, in place."""
    if F.shape[-1] == 2:
        F[:, 0, 1] = 0
        F[:, 1, 0] = 0
    return F


def _accumulate(factors: Dict[str, Dict[str, Tensor]], rows, joint: Dict[str, bool], backend: Optional[str]) -> None:
    """Rows keyed (kind, layer name) into the factors of their kind ("A", "G" or "F"); A's rows get
    the bias's 1 of a joint layer."""
    for kind, F in factors.items():
        mine = [(name, r, s) for (k, name), r, s in rows if k == kind]
        if mine:
            accumulate_rows(F, mine, joint if kind == "A" else dict.fromkeys(F, False), backend)


def accumulate_rows(factors: Dict[str, Tensor], items: List[Tuple[str, Tensor, float]], append_ones: Dict[str, bool],
                    backend: Optional[str], decay: float = 1.0, trusted: bool = False) -> None:
    """F = decay * F + scale * rows~^T rows~ for every recorded (name, rows, scale), all layers in one
    call (decay 0 overwrites: F need not be initialised).

    A module called twice in one pass (a shared layer) has two items; they go to separate calls so
    that no call updates a factor twice; the later calls add (decay 1). ``DiagonalRows`` (one-hot
    inputs) update a diagonal factor, kept as a vector, by their counts; ``EntryRows`` (a
    scale-and-shift layer) its (P, k, k) blocks, by torch (k is 1 or 2: nothing for a kernel to gain).
    """
    small = [item for item in items if isinstance(item[1], (DiagonalRows, EntryRows))]
    if small:  # their Gram matrices by torch: a vector of counts, or (P, k, k) with k <= 2
        items = [item for item in items if not isinstance(item[1], (DiagonalRows, EntryRows))]
        fresh = set()
        for name, rows, scale in small:
            F = factors[name]
            if isinstance(rows, DiagonalRows):
                gram = rows.counts.to(F.dtype)
            else:
                V = rows.values.to(F.dtype)
                gram = torch.einsum("npi,npj->pij", V, V)
            if name not in fresh and decay == 0.0:
                F.zero_()  # as BLAS's beta = 0: the old values (maybe an uninitialised buffer's) are not read
            elif name not in fresh:
                F.mul_(decay)
            fresh.add(name)
            F.add_(gram, alpha=scale)
    while items:
        seen, now, later = set(), [], []
        for item in items:
            (later if item[0] in seen else now).append(item)
            seen.add(item[0])
        ops.factor_update_(
            [factors[name] for name, _, _ in now],
            [rows for _, rows, _ in now],
            decay,
            [scale for _, _, scale in now],
            [append_ones[name] for name, _, _ in now],
            impl=backend,
            _trusted=trusted,
        )
        items, decay = later, 1.0
