"""Inverses and directions: the eigendecompositions of every factor (one batched op call) and the
damped-inverse directions of every block (one batched op call)."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import ops, reference
from ._blocks import Layer
from ._chain import chain_directions
from ._checks import warn_user

__all__ = ["decompose", "directions", "has_inverse", "full_eigenbases", "INVERSE_KEYS"]

# Per block: (layer, params, gradient matrix M, A of the block, G, direction matrix P); M, A and G
# for the quadratic model (a scale-and-shift layer: its blocks F as A, G None), P for the
# finiteness check (one contiguous tensor per block).
Block = Tuple[Layer, List[Tensor], Tensor, Tensor, Tensor, Optional[Tensor]]


# The inverse entries of a layer's state, by method: eigendecompositions (full or low rank) and
# the explicit damped inverses of the factored damping (those of a separate bias block apart).
INVERSE_KEYS = ("QA", "dA", "QG", "dG", "QF", "dF", "IA", "IG", "IAb", "IGb")

# A factor at least this wide is decomposed as low rank plus damping when a rank of at most a quarter
# of its width is certified (``_certified``): its (n, n) x (n, r) sketch then costs a few percent of
# an eigendecomposition.
WIDE = 512
# A low-rank factor may change its layer's damped inverse by at most this fraction of 1/damping (operator norm).
LOW_RANK_TOLERANCE = 0.1
_FIRST_RANK = 32
# Explicit inverses only for damped factors whose condition number (bounded by (|F| + shift) / shift)
# times their dtype's epsilon stays below this: the relative accuracy such an inverse can lose.
INVERSE_KAPPA_EPS = 1e-3
# A factor at least this wide keeps its previous eigenbasis while that basis still diagonalises it to
# within WARM_TOLERANCE (``_warm``): checking costs two (n, n) products, which below this width are
# no cheaper than a decomposition (README, "Warm-started eigenbases").
WARM_MIN = 128
WARM_TOLERANCE = 0.01
WARM_GATE = 0.01  # the trace move, as a fraction of the damping, that lets a factor be checked


def has_inverse(st: Dict[str, Tensor]) -> bool:
    return ("dA" in st and "QG" in st) or "QF" in st or "IG" in st


def full_eigenbases(st: Dict[str, Tensor]) -> bool:
    """Whether a layer holds square QA and QG (not low rank, not a diagonal A): EKFAC's scalings live there."""
    return all(k in st and st[k].dim() == 2 and st[k].shape[0] == st[k].shape[1] for k in ("QA", "QG"))


def decompose(states: Dict[str, Dict[str, Tensor]], impl: Optional[str], dist=None, *, damping: float = 1.0,
              inverse: str = "eigen", full_rank=frozenset(), bias_apart=frozenset()) -> None:
    """The inverses of every factor of ``states``, in place, each method in one batched call; a failed
    one keeps the previous, with a warning. Per factor, by cost:

    - low rank (``ops.eigh_lowrank``, warm-started from the previous basis): a factor at least ``WIDE``
      wide, outside ``full_rank``, whose last decomposition was not a full one, when a rank r <= n/4
      is certified: tr(F) minus the kept eigenvalues bounds every one left out, and that bound times
      the other factor's norm stays within LOW_RANK_TOLERANCE / 2 of the damping (exact damping), or
      within that fraction of the factor's own shift (factored damping). The rank starts at 32 and
      doubles until certified, then starts there at the next update; past n/4 the factor is
      decomposed in full from then on;
    - explicit damped inverses by Cholesky (``ops.damped_inverse``): both factors of a layer under
      ``inverse="factored"`` with neither low rank and both damped factors conditioned well enough
      for their dtype (``INVERSE_KAPPA_EPS``), so that preconditioning is two products; layers in
      ``bias_apart`` get their bias block's G inverse too (its own shift). A failed one falls back on
      an eigendecomposition;
    - the previous eigenbasis, kept (``ops.eigh_refine``, eigenvalues diag(Q^T F Q)): a factor at least
      ``WARM_MIN`` wide, decomposed in full last time, whose trace moved by at most ``WARM_GATE`` times
      the damping it meets since, when the certificate of that basis against the same damping is at most
      ``WARM_TOLERANCE`` (the layer's damped curvature then within a factor (1 +- 0.01)^2 of the
      approximation, in the Loewner order; ``_warm``);
    - eigendecompositions (``ops.eigh_batched``, eigenvalues clamped at zero) for the rest. A diagonal
      A (a vector) is its own eigenvalues in the standard basis. The per-unit blocks of a layer kept
      per unit are decomposed by torch's batched solver (a norm's are 2 x 2 at most: nothing for a
      kernel to gain).

    ``dist`` (data parallel): each process decomposes the layers it owns; the results of a layer
    whose eigenbases are shared then go to every process, those of a layer whose directions are
    shared stay with its owner (who preconditions it)."""
    mine = {name: st for name, st in states.items()
            if not (dist is not None and dist.keeps(name) and not dist.owns(name))}
    if dist is not None:  # data parallel: every process computes its own, then shares
        local = {name: st for name, st in mine.items() if dist.owns(name)}
        new = _inverses(local, impl, damping, inverse, full_rank, bias_apart)
        # the layers with factors (the same on every process: their sums were reduced) whose results go to all
        shared = [name for name, st in states.items() if not dist.keeps(name) and ("A" in st or "F" in st)]
        new.update(_share_inverses(states, new, shared, dist))
    else:
        new = _inverses(mine, impl, damping, inverse, full_rank, bias_apart)
    for name, entries in new.items():
        st = states[name]
        for key in INVERSE_KEYS:
            st.pop(key, None)
        st.update(entries)


def _inverses(states, impl, damping, inverse, full_rank, bias_apart) -> Dict[str, Dict[str, Tensor]]:
    """{layer: its new inverse entries} for the layers of ``states`` with factors; a layer whose
    decomposition failed is left out (it keeps its previous entries), with a warning."""
    new: Dict[str, Dict[str, Tensor]] = {}
    eig = []  # (layer, "A" or "G") to decompose in full
    low = {}  # (layer, key) -> rank to try
    for name, st in states.items():
        if "F" in st:  # per-unit (P, k, k) blocks
            d, Q = torch.linalg.eigh(st["F"])
            new[name] = {"dF": d.clamp_min(0), "QF": Q}
            continue
        if "A" not in st:
            continue
        new[name] = {}
        keys = ("G",) if st["A"].dim() == 1 else ("A", "G")
        if st["A"].dim() == 1:
            new[name]["dA"] = st["A"].clamp_min(0)
        for key in keys:
            n, prev = st[key].shape[0], st.get("Q" + key)
            if (st["A"].dim() == 2 and name not in full_rank and n >= WIDE
                    and (prev is None or prev.shape[1] < prev.shape[0])):
                low[(name, key)] = _FIRST_RANK if prev is None else prev.shape[1]
    lowrank = _low_rank(states, low, impl, damping, inverse)
    cholesky = [name for name in new if inverse == "factored" and "A" in states[name] and states[name]["A"].dim() == 2
                and name not in full_rank and not any((name, k) in lowrank for k in ("A", "G"))]
    failed = set()
    if cholesky:
        failed = _damped_inverses(states, cholesky, impl, damping, bias_apart, new)
    for name in new:
        if "F" in states[name] or (name in cholesky and name not in failed):
            continue
        for key in (("G",) if states[name]["A"].dim() == 1 else ("A", "G")):
            if (name, key) in lowrank:
                new[name]["d" + key], new[name]["Q" + key] = lowrank[(name, key)]
            else:
                eig.append((name, key))
    if eig:
        eig = _warm(states, eig, impl, damping, inverse, bias_apart, new)
    if eig:
        results = ops.eigh_batched([states[name][key] for name, key in eig], impl=impl, _trusted=True)
        ok = torch.stack([torch.isfinite(d).all() for d, _ in results]).tolist()
        bad = set()
        for (name, key), good, (d, Q) in zip(eig, ok, results):
            if good:
                new[name]["d" + key], new[name]["Q" + key] = d.clamp_min(0), Q
                continue
            bad.add(name)
            keep = "keeping the previous one" if has_inverse(states[name]) else \
                "the layer uses its plain gradient until one succeeds"
            warn_user(f"K-FAC: the eigendecomposition of {key} of layer {name!r} failed in float32 and "
                      f"float64; {keep}")
        for name in bad:
            del new[name]
    return new


def _warm(states, eig: List[Tuple[str, str]], impl, damping: float, inverse: str, bias_apart, new
          ) -> List[Tuple[str, str]]:
    """The factors of ``eig`` whose previous eigenbasis still holds: kept, with the eigenvalues
    diag(Q^T F Q) (``ops.eigh_refine`` with no iteration), when its certificate against the damping
    the factor meets in its layer is at most WARM_TOLERANCE; the others, returned, to decompose.

    Only factors at least WARM_MIN wide with a previous full eigendecomposition are tried, and only
    when their trace moved by at most ``WARM_GATE`` times that damping since (a factor fed new data
    moves by far more, and its basis would fail the certificate at the cost of most of a
    decomposition; with a gate of the whole damping, the checks of factors fed sampled gradients
    mostly failed: README, "Warm-started eigenbases"). The damping a
    factor meets: under exact damping, damping / tr(other factor) (at most the smallest shift it sees in the
    Kronecker product, damping / |other factor|; a certificate at a smaller shift holds at a larger
    one; a separate bias block's G meets the damping itself); under factored damping its own shift
    (the smaller of its layer's and bias block's, when apart)."""
    tries, shifts, moves = [], [], []
    root = math.sqrt(damping)
    for name, key in eig:
        st = states[name]
        F, Q, d = st[key], st.get("Q" + key), st.get("d" + key)
        if F.dim() != 2 or F.shape[0] < WARM_MIN or Q is None or Q.shape != F.shape or Q.dtype != F.dtype:
            continue
        if inverse == "eigen":
            other = st["G" if key == "A" else "A"]  # its trace bounds its norm at O(n) cost
            shift = damping / (other.sum() if other.dim() == 1 else other.diagonal().sum()).clamp_min(
                torch.finfo(F.dtype).tiny)
            if key == "G" and name in bias_apart:  # the bias block's A is 1: G meets the damping itself
                shift = shift.clamp_max(damping)
        else:
            pi = _layer_pi(st)
            shift = pi * root if key == "A" else root / pi
            if key == "G" and name in bias_apart:
                pi_b = reference.factored_pi(F.new_ones(1), F.diagonal())
                shift = torch.minimum(torch.as_tensor(shift), root / pi_b)
        tries.append((name, key))
        shifts.append(torch.as_tensor(shift, dtype=torch.float64, device=F.device))
        moves.append((F.diagonal().sum() - d.sum()).abs().to(torch.float64))
    if not tries:
        return eig
    values = torch.stack(shifts + moves).tolist()  # one host sync
    shifts, moves = values[:len(tries)], values[len(tries):]
    picked = [i for i, (s, m) in enumerate(zip(shifts, moves)) if s > 0 and m <= WARM_GATE * s]
    if not picked:
        return eig
    results = ops.eigh_refine([states[tries[i][0]][tries[i][1]] for i in picked],
                              [states[tries[i][0]]["Q" + tries[i][1]] for i in picked],
                              [shifts[i] for i in picked], tol=WARM_TOLERANCE, iterations=0, impl=impl,
                              _trusted=True)
    kept = torch.stack([k for _, _, k in results]).tolist()  # one host sync
    held = set()
    for i, (d, Q, _), k in zip(picked, results, kept):
        if k <= WARM_TOLERANCE:
            name, key = tries[i]
            new[name]["d" + key], new[name]["Q" + key] = d.clamp_min(0), Q
            held.add(tries[i])
    return [item for item in eig if item not in held]


def _norm_bound(F: Tensor) -> Tensor:
    """An upper bound on the spectral norm of a positive semi-definite factor: the smaller of its
    trace and its largest absolute row sum (a vector: its largest entry)."""
    if F.dim() == 1:
        return F.max().clamp_min(0)
    return torch.minimum(F.diagonal().sum(), F.abs().sum(dim=1).max())


def _layer_pi(st: Dict[str, Tensor]) -> Tensor:
    """The factored damping's pi of a layer from its factors' traces (their diagonals' means are
    the eigenvalues' means ``reference.factored_pi`` takes)."""
    A = st["A"] if st["A"].dim() == 1 else st["A"].diagonal()
    return reference.factored_pi(A, st["G"].diagonal())


def _low_rank(states, todo: Dict[Tuple[str, str], int], impl, damping: float, inverse: str
              ) -> Dict[Tuple[str, str], Tuple[Tensor, Tensor]]:
    """The certified low-rank decompositions of the factors in ``todo`` ((layer, key) -> rank to
    try), all of a round in one ``ops.eigh_lowrank`` call; the rank doubles for those not certified
    until it passes n/4 (then they are left out: decomposed in full)."""
    done: Dict[Tuple[str, str], Tuple[Tensor, Tensor]] = {}
    bases = {item: states[item[0]].get("Q" + item[1]) for item in todo}
    todo = {item: min(r, states[item[0]][item[1]].shape[0] // 4) for item, r in todo.items()}
    while todo:
        items = list(todo)
        results = ops.eigh_lowrank([states[name][key] for name, key in items], [todo[i] for i in items],
                                   [bases[i] for i in items], impl=impl, _trusted=True)
        results = [_trimmed(d, Q) for d, Q in results]
        bounds = []
        for (name, key), (d, Q) in zip(items, results):
            st = states[name]
            other = st["G" if key == "A" else "A"]
            tail = (st[key].diagonal().sum() - d.sum()).clamp_min(0)
            if inverse == "eigen":
                bounds.append(tail * _norm_bound(other) / damping)
            else:
                pi = _layer_pi(st)
                shift = pi * math.sqrt(damping) if key == "A" else math.sqrt(damping) / pi
                bounds.append(tail / shift)
        certified = (torch.stack(bounds) <= LOW_RANK_TOLERANCE / 2).tolist()  # one host sync per round
        nxt = {}
        for item, (d, Q), good in zip(items, results, certified):
            n = states[item[0]][item[1]].shape[0]
            if good and bool(torch.isfinite(d).all()):
                done[item] = (d, Q)
            elif 2 * todo[item] <= n // 4:
                nxt[item], bases[item] = 2 * todo[item], Q
        todo = nxt
    return done


def _trimmed(d: Tensor, Q: Tensor) -> Tuple[Tensor, Tensor]:
    """A low-rank decomposition without the pairs beyond twice the rank that holds all but 1e-6 of
    its trace (at least the first rank), so that the next update, which starts from this rank, does
    not keep a sketch wider than the factor needs; the certificate is taken after the trim."""
    total = d.sum()
    tail = torch.cumsum(d, 0)  # ascending: the mass below each index
    k = int((tail > 1e-6 * total).sum())  # pairs needed to hold all but 1e-6 of the captured trace
    r = min(d.shape[0], max(_FIRST_RANK, 2 * k))
    return d[d.shape[0] - r:], Q[:, Q.shape[1] - r:]


def _damped_inverses(states, names: List[str], impl, damping: float, bias_apart, new) -> set:
    """The factored damping's explicit inverses (A + pi sqrt(damping) I)^-1 and
    (G + sqrt(damping)/pi I)^-1 of every layer in ``names`` (and a separate bias block's, whose A is
    1), into ``new``, in one ``ops.damped_inverse`` call; the names of those left to an
    eigendecomposition: the ill-conditioned (an explicit inverse loses about kappa eps of its
    accuracy, where the eigenbasis keeps a gradient's zero components zero: ``INVERSE_KAPPA``) and
    the failed (with a warning)."""
    root = math.sqrt(damping)
    mats, shifts, where, kappas = [], [], [], []
    pis = {}
    for name in names:
        st = states[name]
        pi = _layer_pi(st)
        entries = [("IA", st["A"], pi * root), ("IG", st["G"], root / pi)]
        if name in bias_apart:  # the bias block: A = 1, so pi from G alone
            pi_b = reference.factored_pi(st["G"].new_ones(1), st["G"].diagonal())
            pis[name] = pi_b
            entries.append(("IGb", st["G"], root / pi_b))
        for key, F, shift in entries:
            mats.append(F), shifts.append(shift), where.append((name, key))
            # a bound on the damped factor's condition number, relative to what its dtype can afford
            kappas.append((_norm_bound(F) + shift) / shift * torch.finfo(F.dtype).eps / INVERSE_KAPPA_EPS)
    device = mats[0].device
    values = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in shifts + kappas]
                         ).tolist()  # one host sync
    shifts, kappas = values[:len(shifts)], values[len(shifts):]
    ill = {name for (name, _), k in zip(where, kappas) if not k <= 1.0}
    todo = [i for i, (name, _) in enumerate(where) if name not in ill]
    results = ops.damped_inverse([mats[i] for i in todo], [shifts[i] for i in todo], impl=impl, _trusted=True)
    ok = torch.stack([torch.isfinite(I).all() for I in results]).tolist() if results else []
    failed = set()
    for i, I, good in zip(todo, results, ok):
        name, key = where[i]
        if not good:
            failed.add(name)
        new[name][key] = I
    for name in names:
        if name in failed:
            for key in ("IA", "IG", "IGb"):
                new[name].pop(key, None)
            warn_user(f"K-FAC: the Cholesky factorisation of the damped factors of layer {name!r} failed in "
                      "float32 and float64; it uses an eigendecomposition instead")
        elif name in pis and name not in ill:
            pi_b = pis[name]
            new[name]["IAb"] = (1.0 / (1.0 + pi_b * root)).reshape(1, 1).to(states[name]["A"].dtype)
    return failed | ill


def _share_inverses(states, new, shared: List[str], dist) -> Dict[str, Dict[str, Tensor]]:
    """The inverse entries of the layers in ``shared`` from their owners, on every process (the
    owner of one that failed has none: everyone keeps the previous)."""
    entries = [new.get(name) if dist.owns(name) else None for name in shared]
    like = [states[name]["F" if "F" in states[name] else "G"] for name in shared]
    got = dist.share_entries(entries, INVERSE_KEYS, like, "inverses")
    return {name: e for name, e in zip(shared, got) if e is not None}


def directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], damping: float, inverse: str,
               impl: Optional[str], chain: bool = False,
               share: Optional[Callable[[BlockDirections], BlockDirections]] = None
               ) -> Tuple[Dict[int, Tensor], List[Block]]:
    """{id(param): preconditioned gradient} for every layer with an inverse (before KL clipping),
    and the blocks for the quadratic model (their diagonal blocks, for a chain). ``share``: data
    parallel with the directions computed on each layer's owner, which turns this process's block
    directions into everyone's."""
    computed = (_chain_directions(layers, states, damping, impl) if chain else
                block_directions(layers, states, damping, inverse, impl))
    if share is not None:
        computed = share(computed)
    return assemble(layers, states, computed)


# (layer name, block index) -> the block's direction matrix P
BlockDirections = Dict[Tuple[str, int], Tensor]


def block_directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], damping: float, inverse: str,
                     impl: Optional[str]) -> BlockDirections:
    """The direction matrix of every block of the layers with an inverse and a gradient: the
    Kronecker blocks with eigendecompositions in one batched ``ops.precondition`` call, those with
    explicit damped inverses in one ``ops.kron_matmul`` call."""
    out: BlockDirections = {}
    Ms, QA, dA, QG, dG, keys = [], [], [], [], [], []
    Mi, IA, IG, ikeys = [], [], [], []
    Me, QAe, QGe, Se, ekeys = [], [], [], [], []  # EKFAC's rescaled layers
    ekfac, inverse = inverse == "ekfac", "eigen" if inverse == "ekfac" else inverse  # the others: K-FAC's own
    for layer in layers:
        st = states[layer.name]
        if not has_inverse(st):
            continue
        for i, (params, is_bias) in enumerate(layer.blocks()):
            if any(p.grad is None for p in params):
                continue
            M = layer.matrix(params, [p.grad for p in params])
            if layer.per_unit:  # exact per-unit blocks: (F_e + lambda I)^-1 per unit
                out[(layer.name, i)] = _entry_direction(M, st, damping)
            elif layer.diagonal:  # no eigenbasis on the A side: two products with Q_G, never an (in, in) matrix
                out[(layer.name, i)] = _diagonal_direction(M, st, damping, inverse)
            elif "IG" in st:  # the factored damping's explicit inverses
                Mi.append(M), IA.append(st["IAb" if is_bias else "IA"]), IG.append(st["IGb" if is_bias else "IG"])
                ikeys.append((layer.name, i))
            elif ekfac and "S" in st and full_eigenbases(st):
                Me.append(M), QAe.append(st["QA"]), QGe.append(st["QG"]), Se.append(st["S"])
                ekeys.append((layer.name, i))
            else:
                if is_bias:
                    one = torch.ones(1, 1, dtype=st["QA"].dtype, device=M.device)
                    qa, da = one, one[0]
                else:
                    qa, da = st["QA"], st["dA"]
                Ms.append(M), QA.append(qa), dA.append(da), QG.append(st["QG"]), dG.append(st["dG"])
                keys.append((layer.name, i))
    if Ms:
        out.update(zip(keys, ops.precondition(Ms, QA, dA, QG, dG, float(damping), inverse, impl=impl, _trusted=True)))
    if Mi:
        out.update(zip(ikeys, ops.kron_matmul(Mi, IA, IG, impl=impl, _trusted=True)))
    if Me:
        out.update(zip(ekeys, ops.ekfac_precondition(Me, QAe, QGe, Se, float(damping), impl=impl, _trusted=True)))
    return out


def assemble(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], computed: BlockDirections
             ) -> Tuple[Dict[int, Tensor], List[Block]]:
    """The per-parameter directions and the quadratic model's blocks from the block directions; a
    layer with none whose weight is part of a shared parameter moves that part by its plain
    gradient, not by zero."""
    out, blocks = {}, []
    for layer in layers:
        st = states[layer.name]
        mine = [(i, params) for i, (params, _) in enumerate(layer.blocks()) if (layer.name, i) in computed]
        if not mine and layer.rule.partial:
            for params, _ in layer.blocks():
                if all(p.grad is not None for p in params):
                    _add(out, params, layer.split(params, layer.matrix(params, [p.grad for p in params])))
        for i, params in mine:
            P = computed[(layer.name, i)]
            M = layer.matrix(params, [p.grad for p in params])
            _add(out, params, layer.split(params, P))
            if layer.per_unit:
                blocks.append((layer, params, M, st["F"], None, P))
            else:
                is_bias = layer.blocks()[i][1]
                A = torch.ones(1, 1, dtype=st["A"].dtype, device=M.device) if is_bias else st["A"]
                blocks.append((layer, params, M, A, st["G"], P))
    return out, blocks


def _chain_directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], damping: float,
                      impl: Optional[str]) -> BlockDirections:
    """structure="block-tridiagonal": every chain layer is one block (weight and bias joint)."""
    Ms = {}
    for layer in layers:
        ((params, _),) = layer.blocks()
        if has_inverse(states[layer.name]) and all(p.grad is not None for p in params):
            Ms[layer.name] = layer.matrix(params, [p.grad for p in params])
    return {(name, 0): P for name, P in chain_directions(layers, states, Ms, damping, impl).items()}


def _diagonal_direction(M: Tensor, st: Dict[str, Tensor], damping: float, inverse: str) -> Tensor:
    """The damped inverse of G (x) diag(dA) applied to M (out, in), as ``reference.precondition``
    with Q_A the identity."""
    qg, dg, da = st["QG"], st["dG"], st["dA"]
    V = qg.T @ M.to(qg.dtype)
    if inverse == "eigen":
        denom = torch.outer(dg, da) + damping
    else:
        pi = reference.factored_pi(da, dg)
        root = math.sqrt(damping)
        denom = torch.outer(dg + root / pi, da + pi * root)
    return (qg @ (V / denom)).to(M.dtype)


def _add(out: Dict[int, Tensor], params: List[Tensor], parts: List[Tensor]) -> None:
    """Directions into ``out``; layers that are parts of one parameter (an attention's q, k and v
    rows of in_proj_weight) add theirs, each zero outside its part."""
    for p, d in zip(params, parts):
        out[id(p)] = out[id(p)] + d if id(p) in out else d


def _entry_direction(M: Tensor, st: Dict[str, Tensor], damping: float) -> Tensor:
    """(F_e + lambda I)^-1 applied to each row of M (P, k) with F_e = Q_e diag(d_e) Q_e^T: the exact
    damped inverse, for either ``inverse`` (there is no Kronecker product to factor the damping over)."""
    Q, d = st["QF"], st["dF"]
    V = torch.einsum("pji,pj->pi", Q, M.to(Q.dtype)) / (d + damping)
    return torch.einsum("pij,pj->pi", Q, V).to(M.dtype)
