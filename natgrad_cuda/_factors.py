"""Factor state: every layer's A and G as exponential moving averages of the steps' sums, and their
eigendecompositions.

A step is a transaction: ``stage`` takes this step's sums and, when the inverses are due, computes
the new moving averages and their eigendecompositions out of place; ``accept`` commits them (or,
between inverse updates, updates the averages in place); ``drop`` forgets them, so that a skipped
step leaves the state as it was.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._blocks import Layer
from ._chain import cross_rows
from ._checks import warn_user
from ._directions import decompose, full_eigenbases, has_inverse
from ._finite import all_finite
from .curvature.kfac import accumulate_rows, drop_cross_terms
from .reference import accumulation_dtype

__all__ = ["Factors"]


class Factors:
    """The factors of ``layers``; ``hyper()`` gives factor_decay, ``impl`` is the ops' backend."""

    def __init__(self, layers: List[Layer], hyper: Callable[[], dict], impl: Optional[str], owner: str):
        self.layers, self.hyper, self.impl, self.owner = layers, hyper, impl, owner
        self.state: Dict[str, Dict[str, Tensor]] = {layer.name: {} for layer in layers}
        self._buffers: Dict[Tuple[str, str], Tensor] = {}  # this step's sums of A and G (or F), reused across steps
        self._by_name = {layer.name: layer for layer in layers}
        # [X, 1] rows for A of a joint weight-and-bias block; G's and F's rows as they are.
        self._append_ones = {(k, layer.name): k == "A" and layer.joint for layer in layers for k in ("A", "G", "F")}
        self._staged: Optional[Dict[str, Dict[str, Tensor]]] = None  # stage()'s new state, until accept()
        self._new = None  # stage()'s sums of this step, until accept()
        self._unrecorded: set = set()  # layers warned about for having no factors
        # structure="block-tridiagonal": the chain's layer names (their cross factors are kept too)
        self.chain: List[str] = []
        self.dist = None  # data parallel: the process group (``_distributed.Distributed``)
        self.inverse = "eigen"  # the optimizer's ``inverse``
        # the damping the factored damping's explicit inverses were computed for (they are redone when it changes)
        self.inverse_damping: Optional[float] = None
        self._staged_damping: Optional[float] = None
        # layers with a separate bias block (whose factored inverse of G has its own shift)
        self.bias_apart = {layer.name for layer in layers
                           if not layer.per_unit and not layer.joint and layer.bias is not None}
        # inverse="ekfac": the layers rescaled (their scaling S, a moving average like A and G, of the
        # squared per-example gradients in the eigenbasis)
        self.ekfac: set = set()
        self._ekfac_warned: set = set()
        self.reset()

    def reset(self) -> None:
        self._sums: Dict[Tuple[str, str], Tensor] = {}  # ("A", "G" or "F", layer name): this step's sum

    # ---- this step's sums -----------------------------------------------------------------------

    def flush(self, rows) -> None:
        """Accumulate (key, rows, scale) into this step's sums, all in one op call (one parallel
        region, balanced over all of them)."""
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
        if self.ekfac:
            self._scaling_sums(rows)
        accumulate_rows(self._sums, fresh, self._append_ones, self.impl, decay=0.0, trusted=True)
        accumulate_rows(self._sums, more, self._append_ones, self.impl, trusted=True)
        if self.chain:
            for key, C in cross_rows(rows, self.chain, self._append_ones):
                self._sums[key] = self._sums[key] + C if key in self._sums else C

    def _scaling_sums(self, rows) -> None:
        """EKFAC: this step's sum of squared per-example gradients in each rescaled layer's current
        eigenbasis, from the rows of one forward: the sum over A's rows r and output-gradient rows k
        of s_G (QG^T g_kr)^2 ((QA^T a_r)^2)^T. ``_step_sums`` divides it by G's divisor: an nn.Linear's
        A is s_A / N times its rows' sum with s_A R = N (the forward's data points, R its rows:
        positions or sequences per data point, s_A their inverse), so for independent a and g this is
        diag(QG^T G QG) diag(QA^T A QA)^T, K-FAC's own scaling, and a data-parallel sum of the
        processes' shares is the global batch's. A layer with no full eigenbasis yet adds nothing; one
        that ran more than once in the forward (its rows cannot be paired) adds nothing this step,
        with a warning."""
        items: Dict[str, Tuple[list, list]] = {}
        for key, X, scale in rows:
            if key[1] in self.ekfac and key[0] in ("A", "G"):
                items.setdefault(key[1], ([], []))[key[0] == "G"].append((X, scale))
        for name, (a_items, g_items) in items.items():
            st = self.state[name]
            if not full_eigenbases(st) or not g_items:
                continue
            QA, QG = st["QA"], st["QG"]
            if len(a_items) != 1:
                if name not in self._ekfac_warned:
                    self._ekfac_warned.add(name)
                    warn_user(f"{self.owner}: layer {name!r} ran {len(a_items)} times in one forward: EKFAC cannot pair "
                              "its input rows with its output gradients, and keeps its scaling from other steps")
                continue
            X, _ = a_items[0]
            X = X.to(QA.dtype)
            if self._append_ones[("A", name)]:
                X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
            A2 = (X @ QA).square_()
            total = None
            for g, s_g in g_items:
                part = (g.to(QG.dtype) @ QG).square_().mT @ A2
                total = part * s_g if total is None else total.add_(part, alpha=s_g)
            key = ("S", name)
            self._sums[key] = self._sums[key] + total if key in self._sums else total

    def settle_scalings(self, states: Dict[str, Dict[str, Tensor]]) -> None:
        """EKFAC: a rescaled layer with a full eigenbasis and no scaling (a K-FAC state loaded) starts
        from K-FAC's own, dG dA^T (``checked_layer_state`` drops the others' scalings)."""
        for name in self.ekfac:
            st = states[name]
            if "S" not in st and full_eigenbases(st):
                st["S"] = torch.outer(st["dG"], st["dA"])

    def layout(self) -> List[Tuple[Tuple[str, str], tuple, torch.dtype, torch.device]]:
        """(key, shape, dtype, device) of every sum a step can have, in a fixed order (the same on
        every process of a data-parallel run)."""
        out = []
        for layer in self.layers:
            shapes = layer.shapes()
            for which in (*layer.factor_keys, *(k for k in ("AC", "GC", "S") if k in shapes)):
                out.append(((which, layer.name), shapes[which], layer.factor_dtype, layer.weight.device))
        return out

    def _buffer(self, which: str, name: str) -> Tensor:
        buf = self._buffers.get((which, name))
        if buf is None:
            layer = self._by_name[name]
            shape = layer.shapes()[which]  # a diagonal A is a vector
            buf = self._buffers[(which, name)] = torch.empty(shape, dtype=layer.factor_dtype, device=layer.weight.device)
        return buf

    def follow(self, layer: Layer) -> None:
        """The layer's factors to its parameters' new dtype and device."""
        layer.factor_dtype = accumulation_dtype(layer.weight.dtype)
        to = dict(dtype=layer.factor_dtype, device=layer.weight.device)
        self.state[layer.name] = {k: t.to(**to) for k, t in self.state[layer.name].items()}
        for which in layer.factor_keys:
            self._buffers.pop((which, layer.name), None)
            if (which, layer.name) in self._sums:
                self._sums[(which, layer.name)] = self._sums[(which, layer.name)].to(**to)

    # ---- the transaction ------------------------------------------------------------------------

    def stage(self, n: int, g_div: float, forward_only: bool, inverses_due: bool) -> None:
        """This step's factors from its sums (N data points, G's divisor; ``n`` 0: none this step)
        and, when due or missing, the inverses of the new moving averages, staged for ``accept``
        (EKFAC's scalings too, which this step's directions use even between inverse updates)."""
        self._new = self._step_sums(n, g_div, forward_only) if n else None
        have = {layer.name for layer in self.layers if layer.has_factors(self.state[layer.name])}
        have |= set(self._new[0] if self._new else ())
        # a process holds the inverses of a layer whose directions are shared only when it owns it
        missing = any(not has_inverse(self.state[name]) for name in have
                      if self.dist is None or not self.dist.keeps(name) or self.dist.owns(name))
        damping = self.hyper()["damping"]
        stale = self.inverse == "factored" and damping != self.inverse_damping  # explicit inverses of another damping
        self._staged = None
        decomposing = bool(have) and (inverses_due or missing or stale)
        # EKFAC between inverse updates too: this step's directions use the scalings with its estimate in
        scaling = bool(self._new) and any("S" in sums for sums in self._new[0].values())
        if not (decomposing or scaling):
            return
        staged = {name: dict(st) for name, st in self.state.items()}
        if self._new:
            self._average(staged, *self._new, in_place=False)
        if decomposing:
            decompose(staged, self.impl, self.dist, damping=damping,
                      inverse="eigen" if self.inverse == "ekfac" else self.inverse,
                      full_rank=set(self.chain) | self.ekfac, bias_apart=self.bias_apart)
            for name in self.ekfac:  # a new eigenbasis: the scaling starts again from K-FAC's own in it
                st, old = staged[name], self.state[name]
                if "QA" in st and (st["QA"] is not old.get("QA") or st["QG"] is not old.get("QG")):
                    st["S"] = torch.outer(st["dG"], st["dA"])
        self._staged, self._staged_damping = staged, damping if decomposing else self.inverse_damping

    def current(self) -> Dict[str, Dict[str, Tensor]]:
        """The state this step's directions use: staged, or the committed one."""
        return self._staged if self._staged is not None else self.state

    def accept(self) -> None:
        """Commit what ``stage`` staged: the new moving averages (and inverses)."""
        if self._staged is not None:
            self.state, self.inverse_damping = self._staged, self._staged_damping
        elif self._new:
            self._average(self.state, *self._new, in_place=True)
        self._staged = self._new = None

    def drop(self) -> None:
        self._staged = self._new = None
        self.reset()

    def _step_sums(self, n: int, g_div: float, forward_only: bool):
        """(this step's sums per layer and kind, the scale of each kind) for the layers updated this
        step; None when there are none, or when they are not finite (with a warning). A scale-and-
        shift layer's F takes G's scale (A's for the forward-only Fisher, whose rows are its inputs')."""
        if not forward_only and g_div == 0:
            return None  # no curvature pass ran (non-finite outputs)
        new: Dict[str, Dict[str, Tensor]] = {}
        for layer in self.layers:
            first = self._sums.get((layer.factor_keys[0], layer.name))
            if first is None:
                continue  # the layer did not run in this step's forward (or no backward reached it)
            if layer.per_unit:
                if not layer.joint:
                    drop_cross_terms(first)
                new[layer.name] = {"F": first}
                continue
            G = (torch.eye(layer.out_dim, dtype=first.dtype, device=first.device) if forward_only
                 else self._sums.get(("G", layer.name)))
            if G is not None:  # None: no backward reached it
                new[layer.name] = {"A": first, "G": G}
                for key in ("AC", "GC", "S"):
                    if (key, layer.name) in self._sums:
                        new[layer.name][key] = self._sums[(key, layer.name)]
        self._note_unrecorded(new)
        if not new:
            return None
        # Gram sums: a NaN or Inf in any row shows on the diagonal, and |F_ij| <= sqrt(F_ii F_jj)
        # bounds the rest, so the diagonals decide.
        if not all_finite([t if t.dim() == 1 else t.diagonal(dim1=-2, dim2=-1) for sums in new.values()
                           for t in sums.values()]):
            warn_user("K-FAC: this step's factors are not finite (an overflow in the curvature pass?); the moving "
                      "averages keep their previous values")
            return None
        scales = {"A": 1.0 / n, "G": 1.0 / g_div, "F": 1.0 / (n if forward_only else g_div), "S": 1.0 / g_div}
        if self.chain:
            scales.update(AC=1.0 / n, GC=1.0 / g_div)
        return new, scales

    def _note_unrecorded(self, new: Dict[str, Tuple[Tensor, Tensor]]) -> None:
        """Warn, once per layer, about a K-FAC layer with a gradient that no counted forward ran as a
        module (its weight used functionally, say): it has no factors and follows its plain gradient."""
        for layer in self.layers:
            if (layer.name not in new and layer.name not in self._unrecorded and not layer.has_factors(self.state[layer.name])
                    and layer.weight.grad is not None):
                self._unrecorded.add(layer.name)
                warn_user(f"{self.owner}: layer {layer.name!r} has a gradient but did not run as a module in this "
                          "step's forward (is its weight used functionally?); it gets no factors and follows its "
                          "plain gradient until it does")

    def _average(self, states, new: Dict[str, Dict[str, Tensor]], scales: Dict[str, float], *, in_place: bool) -> None:
        """The moving averages of ``states`` take in this step's sums; the first estimate starts one.
        Every layer's sums share one scale per factor kind, so each kind is one fused op."""
        decay = self.hyper()["factor_decay"]
        for key, scale in scales.items():
            have = [name for name, sums in new.items() if key in sums]
            running = [name for name in have if key in states[name]]
            for name in have:
                if key not in states[name]:  # the first estimate starts the average (no bias towards zero)
                    states[name][key] = new[name][key] * scale
            if not running:
                continue
            averages = [states[name][key] for name in running]
            if in_place:
                torch._foreach_mul_(averages, decay)
            else:
                averages = torch._foreach_mul(averages, decay)
            torch._foreach_add_(averages, [new[name][key] for name in running], alpha=(1.0 - decay) * scale)
            for name, avg in zip(running, averages):
                states[name][key] = avg

    # ---- saved state ----------------------------------------------------------------------------

    @staticmethod
    def checked_layer_state(layer: Layer, saved) -> Dict[str, Tensor]:
        """A layer's saved state, validated (entries, kinds, shapes, finite, eigenvalues >= 0,
        eigenvectors orthonormal) and moved to the layer's device and factor dtype; ValueError
        naming the entry otherwise."""
        where = f"state_dict: layer {layer.name!r}"
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: its state must be a dict, got {type(saved).__name__}")
        if not layer.ekfac:  # an EKFAC run's scaling, loaded by an optimizer that does not rescale this layer
            saved = {k: v for k, v in saved.items() if k != "S"}
        out, shapes = {}, layer.shapes()
        unknown = set(saved) - set(shapes)
        if unknown:
            raise ValueError(f"{where}: unknown entries {sorted(unknown)}")
        keys = set(saved)
        # A layer holds nothing (never updated), its factors, or its factors and their inverses:
        # eigendecompositions (a diagonal A has no QA) or explicit damped inverses.
        if layer.per_unit:
            pairs = [(("F",), tuple(shapes)), (("QF",), ("dF",)), (("dF",), ("QF",))]
        else:
            pairs = [(("A", "G"), tuple(shapes)), (("QG",), ("dG",)), (("dG",), ("QG",))]
            if not layer.diagonal:
                explicit = ("IA", "IG", "IAb", "IGb") if "IGb" in shapes else ("IA", "IG")
                pairs += [(("QA",), ("dA",)), (("dA",), ("QA",)), (explicit, explicit)]
                if keys & {"QA", "QG"} and keys & set(explicit):
                    raise ValueError(f"{where}: entries {sorted(keys)} mix eigendecompositions and explicit inverses")
                if layer.ekfac:  # a scaling belongs to an eigenbasis
                    pairs.append((("QA", "QG"), ("S",)))
        for need, having in pairs:
            if keys & set(having) and not set(need) <= keys:
                raise ValueError(f"{where}: entries {sorted(keys)} are incomplete (missing "
                                 f"{sorted(set(need) - keys)})")
        device = layer.weight.device
        for key in shapes:
            if key not in saved:
                continue
            t = saved[key]
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"{where} entry {key!r} must be a floating-point tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
            expected = shapes[key]
            if key in ("QA", "QG", "dA", "dG") and not layer.diagonal:  # low rank: r <= n columns
                q = saved.get("Q" + key[1])
                r = q.shape[1] if isinstance(q, Tensor) and q.dim() == 2 and q.shape[1] <= q.shape[0] else expected[0]
                expected = (expected[0], r) if key[0] == "Q" else (r,)
            if tuple(t.shape) != expected:
                raise ValueError(f"{where} entry {key!r} has shape {tuple(t.shape)}, expected {expected}")
            t = t.detach().to(device=device, dtype=layer.factor_dtype).clone()
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where} entry {key!r} is not finite")
            if key.startswith("d") and bool((t < 0).any()):
                raise ValueError(f"{where} entry {key!r}: eigenvalues must be >= 0")
            if key == "S" and bool((t < 0).any()):
                raise ValueError(f"{where} entry 'S': EKFAC's scaling (mean squares) must be >= 0")
            if key.startswith("Q"):  # (n, r), or (P, k, k) per entry
                eye = torch.eye(t.shape[-1], dtype=t.dtype, device=device)
                tol = 1e-3 if t.dtype == torch.float32 else 1e-8
                if t.numel() and float((t.mT @ t - eye).abs().max()) > tol * max(1, t.shape[-1]) ** 0.5:
                    raise ValueError(f"{where} entry {key!r}: eigenvectors must be orthonormal")
            out[key] = t
        return out
