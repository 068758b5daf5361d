"""A K-FAC layer of the optimizer: its rule, its parameters, and the (out, in[+1]) block matrices
its gradients are preconditioned as."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from .curvature.recording import Tap
from .reference import accumulation_dtype

__all__ = ["Layer"]


class Layer(Tap):
    """One K-FAC layer: its parameters and how its gradient becomes the (out, in[+1]) matrix M."""

    def __init__(self, name: str, module: nn.Module, joint: bool):
        super().__init__(name, module)
        self.joint = joint
        out_dim, in_dim = self.rule.to_matrix(module, self.weight.detach()).shape
        # A scale-and-shift layer (a norm) keeps one exact (k, k) block per weight entry, k = 2 with
        # its bias: its matrix is (P, k) and ``joint`` says whether the blocks keep the weight-bias terms.
        self.scale_shift = self.rule.scale_shift
        extra = int(self.bias is not None) if self.scale_shift else int(joint)
        self.out_dim, self.in_dim = out_dim, in_dim + extra
        self.factor_dtype = accumulation_dtype(self.weight.dtype)
        self.placement = (self.weight.dtype, self.weight.device)
        # A diagonal (one-hot inputs, an embedding): A is the vector of its diagonal, its own eigenvalues.
        self.diagonal = self.rule.diagonal_input
        self.factor_keys = ("F",) if self.scale_shift else ("A", "G")

    def has_factors(self, st: Dict[str, Tensor]) -> bool:
        return self.factor_keys[0] in st

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """The shape of every state entry of this layer (no QA when A is diagonal; F and its
        per-entry eigendecompositions for a scale-and-shift layer)."""
        a, g = self.in_dim, self.out_dim
        if self.scale_shift:
            return {"F": (g, a, a), "QF": (g, a, a), "dF": (g, a)}
        if self.diagonal:
            return {"A": (a,), "G": (g, g), "dA": (a,), "QG": (g, g), "dG": (g,)}
        return {"A": (a, a), "G": (g, g), "QA": (a, a), "dA": (a,), "QG": (g, g), "dG": (g,)}

    def blocks(self) -> List[Tuple[List[Tensor], bool]]:
        """(parameters, is the separate bias) per preconditioned block: [W | b] jointly, or W and b
        apart (b with A = 1, the bias block of docs/curvature.md being G alone). A scale-and-shift
        layer is one block (its per-entry blocks hold the bias)."""
        if self.joint or (self.scale_shift and self.bias is not None):
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
