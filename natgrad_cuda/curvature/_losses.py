"""Per-loss rules: which losses are supported and what the curvature needs from each.

A loss is a sum (reduction "sum") or mean (reduction "mean") of per-term losses l_r over the model's
outputs flattened to (terms, C): CrossEntropy takes (B, C, ...) outputs, MSE and BCE take (B, ..., C).
``LossSpec`` holds these rules; it is built from an ``nn`` loss module (``LossSpec.from_module``) or
from a name (``LossSpec.from_name``, what the optimizer uses). Conventions: ``docs/curvature.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LossSpec", "LOSS_NAMES", "REDUCTIONS", "class_dim_is_last"]

LOSS_NAMES = ("cross_entropy", "mse", "bce")
REDUCTIONS = ("mean", "sum", "batchmean")  # batchmean: summed over all but the batch dimension, mean over it

_MODULE_NAMES = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce"}


@dataclass(frozen=True)
class LossSpec:
    """One supported loss: ``name`` in ``LOSS_NAMES`` and ``reduction`` in ``REDUCTIONS``."""

    name: str
    reduction: str = "mean"

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {LOSS_NAMES}, got {self.name!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {self.reduction!r}")

    @classmethod
    def from_name(cls, name: str, reduction: str = "mean") -> "LossSpec":
        return cls(name, reduction)

    @classmethod
    def from_module(cls, loss_fn: nn.Module) -> "LossSpec":
        """Validate ``loss_fn``; options that change the loss's Hessian are refused, not ignored."""
        name = _MODULE_NAMES.get(type(loss_fn))
        if name is None:
            raise ValueError(
                "loss_fn must be nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss, "
                f"got {type(loss_fn).__name__}"
            )
        if loss_fn.reduction not in ("mean", "sum"):
            raise ValueError(f"loss_fn.reduction must be 'mean' or 'sum', got {loss_fn.reduction!r}")
        if name == "cross_entropy":
            if loss_fn.weight is not None:
                raise ValueError("loss_fn: nn.CrossEntropyLoss with class weights is not supported")
            if loss_fn.label_smoothing != 0.0:
                raise ValueError("loss_fn: nn.CrossEntropyLoss with label_smoothing is not supported")
            if loss_fn.ignore_index != -100:
                raise ValueError("loss_fn: nn.CrossEntropyLoss with a non-default ignore_index is not supported")
        if name == "bce" and (loss_fn.weight is not None or loss_fn.pos_weight is not None):
            raise ValueError("loss_fn: nn.BCEWithLogitsLoss with weight or pos_weight is not supported")
        return cls(name, loss_fn.reduction)

    # ---- shapes -------------------------------------------------------------------------------

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise ValueError unless ``targets`` fit ``outputs`` for this loss."""
        if outputs.dim() < (2 if self.name == "cross_entropy" else 1):
            raise ValueError(
                f"model outputs must be batched with a class / feature dimension, got shape {tuple(outputs.shape)}"
                + (" (a (B,) output works with MSE and BCE)" if outputs.dim() == 1 else "")
            )
        if not isinstance(targets, Tensor):
            raise ValueError(f"data: targets must be tensors, got {type(targets).__name__}")
        if self.name == "cross_entropy":
            index_shape = outputs.shape[:1] + outputs.shape[2:]
            if _is_index(targets) and targets.shape == index_shape:
                return
            if targets.is_floating_point() and targets.shape == outputs.shape:
                return  # class probabilities
            raise ValueError(
                f"data: targets of shape {tuple(targets.shape)} and dtype {targets.dtype} do not fit outputs of "
                f"shape {tuple(outputs.shape)} for cross_entropy: give integer class indices of shape "
                f"{tuple(index_shape)} or probabilities of shape {tuple(outputs.shape)}"
            )
        if targets.shape != outputs.shape or not targets.is_floating_point():
            raise ValueError(
                f"data: targets of shape {tuple(targets.shape)} and dtype {targets.dtype} do not fit outputs of "
                f"shape {tuple(outputs.shape)} for {self.name}: they need the outputs' shape and a floating dtype"
            )

    def flatten_outputs(self, outputs: Tensor) -> Tensor:
        """(terms, C) view of the outputs, differentiable; (B,) outputs of MSE and BCE are (B, 1)."""
        if self.name == "cross_entropy":
            outputs = outputs.movedim(1, -1)
        elif outputs.dim() == 1:
            return outputs.unsqueeze(-1)
        return outputs.reshape(-1, outputs.shape[-1])

    def flatten_targets(self, targets: Tensor, outputs: Tensor) -> Tensor:
        """Targets as (terms,) class indices or (terms, C), matching ``flatten_outputs``."""
        if self.name == "cross_entropy" and _is_index(targets):
            return targets.reshape(-1).long()
        return self.flatten_outputs(targets.to(outputs.dtype))

    def flat_shape(self, shape) -> tuple:
        """(terms, C) of ``flatten_outputs`` for outputs of this shape, without touching them."""
        if self.name == "cross_entropy":
            return math.prod(shape) // shape[1], shape[1]
        if len(shape) == 1:
            return shape[0], 1
        return math.prod(shape[:-1]), shape[-1]

    def normalizer(self, terms: int, classes: int) -> int:
        """This batch's share of Z for reduction "mean": the elements the mean is over."""
        return terms if self.name == "cross_entropy" else terms * classes

    def divisor(self, terms: int, classes: int, points: int) -> int:
        """This batch's share of Z, what the reduction divides the sum of the terms by, for a batch
        of ``points`` data points flattened to (terms, classes): all elements' count ("mean"), the
        data points ("batchmean": ``((out - y) ** 2).sum(1).mean()``, say), or 1 ("sum")."""
        if self.reduction == "mean":
            return self.normalizer(terms, classes)
        return points if self.reduction == "batchmean" else 1

    # ---- per-term losses ----------------------------------------------------------------------

    def term_losses(self, f: Tensor, y: Tensor) -> Tensor:
        """l_r for flattened outputs f (terms, C) and targets y: (terms,), each summed over C."""
        if self.name == "cross_entropy":
            return F.cross_entropy(f, y, reduction="none")
        if self.name == "mse":
            return (f - y).square().sum(-1)
        return F.binary_cross_entropy_with_logits(f, y, reduction="none").sum(-1)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """S_r with S_r S_r^T = the Hessian of l_r at f_r: (terms, C, C), detached.

        CE uses the non-symmetric factor diag(sqrt p) - p sqrt(p)^T: it is what curvlinops uses, and
        a different square root gives a different K-FAC whenever several terms feed one g.
        """
        f = f.detach()
        if self.name == "cross_entropy":
            p = f.softmax(-1)
            s = p.sqrt()
            return torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)
        if self.name == "mse":
            eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
            return (math.sqrt(2.0) * eye).expand(f.shape[0], -1, -1)
        sig = f.sigmoid()
        return torch.diag_embed((sig * (1 - sig)).sqrt())

    def hessian_products(self, f: Tensor, U: Tensor) -> Tensor:
        """(k, k) matrix of sum over terms r of u_{i,r}^T H_r u_{j,r}, H_r the Hessian of l_r at f_r,
        for k output directions U (k, terms, C) (e.g. Jacobian-vector products); not divided by Z."""
        f = f.detach()
        if self.name == "cross_entropy":
            p = f.softmax(-1)
            pu = (p * U).sum(-1)  # (k, terms)
            return torch.einsum("rc,irc,jrc->ij", p, U, U) - torch.einsum("ir,jr->ij", pu, pu)
        if self.name == "mse":
            return 2.0 * torch.einsum("irc,jrc->ij", U, U)
        sig = f.sigmoid()
        return torch.einsum("rc,irc,jrc->ij", sig * (1 - sig), U, U)

    def sample_targets(self, f: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """Targets drawn from the model's predictive distribution at f (terms, C).

        MSE's noise has variance 1/2 so that E[g g^T] is its Hessian 2I. One draw over all terms of
        the batch, in curvlinops' order, so that a seeded run reproduces its MC K-FAC.
        """
        f = f.detach()
        if self.name == "cross_entropy":
            return f.softmax(-1).multinomial(num_samples=1, generator=generator).squeeze(-1)
        if self.name == "mse":
            noise = torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=generator)
            return f + math.sqrt(0.5) * noise
        return f.sigmoid().bernoulli(generator=generator)


def class_dim_is_last(grad: Tensor, shape) -> Optional[bool]:
    """Cross-entropy over outputs of 3+ dimensions: whether the loss read the classes from the last
    dimension (True: (B, T, V) logits whose loss is taken on the (B*T, V) view) or from dim 1
    (False: torch's layout), told from ``grad``, the loss's gradient with respect to the outputs,
    which sums to zero along the classes. None when it tells nothing (zero or not finite, as from
    saturated logits); ValueError when it sums to zero along both dimensions or neither."""
    g = grad.detach().double()
    total = float(g.abs().sum())
    if total == 0 or not math.isfinite(total):
        return None
    tol = (1e-2 if grad.dtype in (torch.float16, torch.bfloat16) else 1e-5) * total
    along_1, along_last = float(g.sum(1).abs().sum()) <= tol, float(g.sum(-1).abs().sum()) <= tol
    if along_1 == along_last:
        raise ValueError(
            f"loss='cross_entropy' with outputs of shape {tuple(shape)}: cannot tell which dimension holds "
            "the classes (the gradient of a cross-entropy sums to zero along them, and here it sums to zero "
            f"along {'both' if along_1 else 'neither'} of dim 1 and the last). Use torch's (B, C, d1, ...) "
            "layout, or (B, T, V) logits with the loss computed on their (B*T, V) view")
    return along_last


def _is_index(targets: Tensor) -> bool:
    return not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
