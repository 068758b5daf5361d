"""A K-FAC layer of the optimizer: its rule, its parameters, and the (out, in[+1]) block matrices
its gradients are preconditioned as."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .curvature.recording import Tap
from .reference import accumulation_dtype

__all__ = ["Layer"]


class Layer(Tap):
    """One K-FAC layer: its parameters and how its gradient becomes the (out, in[+1]) matrix M."""

    def __init__(self, name: str, module: nn.Module, joint: bool, unit_wise: bool = False):
        super().__init__(name, module)
        self.joint = joint
        out_dim, in_dim = self.rule.to_matrix(module, self.weight.detach()).shape
        # Exact per-unit blocks instead of a Kronecker product: a scale-and-shift layer (a norm)
        # always, one (k, k) block per weight entry (k = 2 with its bias), every layer under
        # structure="unit-wise", one block per output unit (its row of the matrix, with its bias
        # entry). The matrix is (units, k); ``joint`` says whether the blocks keep the weight-bias terms.
        self.per_unit = self.rule.scale_shift or unit_wise
        extra = int(self.bias is not None) if self.per_unit else int(joint)
        self.out_dim, self.in_dim = out_dim, in_dim + extra
        self.factor_dtype = accumulation_dtype(self.weight.dtype)
        self.placement = (self.weight.dtype, self.weight.device)
        # A diagonal (one-hot inputs, an embedding): A is the vector of its diagonal, its own eigenvalues.
        self.diagonal = self.rule.diagonal_input
        self.factor_keys = ("F",) if self.per_unit else ("A", "G")
        # structure="block-tridiagonal": (in, out) of the next layer of the chain, whose cross
        # factors with this one (AC, GC) this layer keeps; None for the chain's last layer
        self.next_dims: Optional[Tuple[int, int]] = None
        self.ekfac = False  # inverse="ekfac" rescales this layer: it keeps the scaling S (out, in[+1])

    def has_factors(self, st: Dict[str, Tensor]) -> bool:
        return self.factor_keys[0] in st

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """The shape of every state entry of this layer (no QA when A is diagonal; F and its
        per-unit eigendecompositions for a layer kept per unit); a low-rank QA or QG (and its
        eigenvalues) has fewer columns."""
        a, g = self.in_dim, self.out_dim
        if self.per_unit:
            return {"F": (g, a, a), "QF": (g, a, a), "dF": (g, a)}
        if self.diagonal:
            return {"A": (a,), "G": (g, g), "dA": (a,), "QG": (g, g), "dG": (g,)}
        # QA and QG hold (n, r) with r <= n for a low-rank factor; IA, IG (and a separate bias
        # block's IAb, IGb) are the factored damping's explicit inverses, held instead of them
        shapes = {"A": (a, a), "G": (g, g), "QA": (a, a), "dA": (a,), "QG": (g, g), "dG": (g,), "IA": (a, a),
                  "IG": (g, g)}
        if self.bias is not None and not self.joint:
            shapes.update(IAb=(1, 1), IGb=(g, g))
        if self.next_dims is not None:
            shapes.update(AC=(a, self.next_dims[0]), GC=(g, self.next_dims[1]))
        if self.ekfac:  # EKFAC's scaling in the eigenbasis of its A and G
            shapes["S"] = (g, a)
        return shapes

    def blocks(self) -> List[Tuple[List[Tensor], bool]]:
        """(parameters, is the separate bias) per preconditioned block: [W | b] jointly, or W and b
        apart (b with A = 1, the bias block of docs/curvature.md being G alone). A layer kept per
        unit is one block (its per-unit blocks hold the bias)."""
        if self.joint or (self.per_unit and self.bias is not None):
            return [([self.weight, self.bias], False)]
        if self.bias is None:
            return [([self.weight], False)]
        return [([self.weight], False), ([self.bias], True)]

    def matrix(self, params: List[Tensor], tensors: List[Tensor]) -> Tensor:
        """Parameter-shaped tensors of one of its blocks (weight and bias, or one of them) as the
        block's (out, in[+1]) matrix: the rule's matrix of the weight, the bias as a column."""
        cols = [self.rule.to_matrix(self.module, t) if p is self.weight else
                self.rule.bias_vector(self.module, t).reshape(self.out_dim, 1) for p, t in zip(params, tensors)]
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)

    def split(self, params: List[Tensor], M: Tensor) -> List[Tensor]:
        """Inverse of ``matrix``: a block's matrix back to parameter-shaped tensors."""
        if len(params) == 1:
            p = params[0]
            return [self.rule.from_matrix(self.module, M) if p is self.weight else
                    self.rule.bias_from_vector(self.module, M.reshape(-1))]
        return [self.rule.from_matrix(self.module, M[:, :-1]), self.rule.bias_from_vector(self.module, M[:, -1])]
