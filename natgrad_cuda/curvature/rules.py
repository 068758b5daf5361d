"""Layer rules: how K-FAC treats each module type, one rule per type, in one place.

K-FAC approximates the curvature block of a layer y = W x (+ b), applied at each of S weight-sharing
positions of a data point, by G (x) A: A from the layer's inputs x, G from the gradients g at its
outputs (conventions: docs/curvature.md). A rule tells, for one module type, what the rest of the
package needs to know:

- ``check(module)``: whether K-FAC can cover this module (None) or why not;
- ``weight(module)``, ``bias(module)``: the parameters of its block;
- ``to_matrix(module, t)``, ``from_matrix(module, M)``: a weight-shaped tensor (the weight, its
  gradient, a direction) as the (out, in) matrix whose rows are the output units and whose columns
  are the entries of A's rows, and back (by default the weight's first dimension is the output and
  the rest flatten row-major); the bias is an extra column when weight and bias are joint
  (``bias_vector``, ``bias_from_vector``: a layer that is part of a bigger parameter, the
  projections of an attention, maps its entries to and from zeros elsewhere);
- ``input_rows(name, module, x, kfac_approx)``: the rows whose Gram matrix gives A, and the scale of
  their outer products (before the division by the number of data points);
- ``grad_rows(module, g, kfac_approx)``: the rows whose Gram matrix gives G;
- ``positions(module, output)``: S of one call, from its output.

From these the optimizer, the preconditioner and ``curvature.kfac`` derive everything else the same
way for every rule: the state's shapes (A: in (+1), G: out), the preconditioned form of the
gradient, the dense block of ``curvature.kfac(...).dense()`` (kron(G, A) over the matrix's entries,
placed at the weight entries ``to_matrix`` maps them from).

Add a rule for your own module with ``register_rule(MyModule, MyRule())``; a subclass of a module
type with a rule gets that rule unless it has its own.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["LayerRule", "LinearRule", "ConvRule", "ConvTransposeRule", "EmbeddingRule", "ScaleShiftRule",
           "LayerNormRule", "RMSNormRule", "GroupNormRule", "BatchNormRule", "DiagonalRows", "EntryRows",
           "register_rule", "rule_for", "conv_patches"]

Rows = Union[Tensor, ops.ConvPatches]


@dataclass(frozen=True)
class DiagonalRows:
    """The rows of A of a layer whose inputs are one-hot (an embedding's token ids), given by the
    only thing their Gram matrix holds, its diagonal: how often each input occurred. A rule that
    returns these keeps A as a vector, never an (in, in) matrix."""

    counts: Tensor  # (in,)


@dataclass(frozen=True)
class EntryRows:
    """The rows of a layer whose curvature is kept exactly for every weight entry with its bias
    entry (a normalisation layer's scale and shift): vectors (n, P, k), P weight entries and k = 2
    (weight, bias) or 1 (weight only); their outer products summed over n give the (P, k, k) blocks."""

    values: Tensor  # (n, P, k)


class LayerRule:
    """The rule of a layer y = W x (+ b). Subclasses implement ``input_rows``, ``grad_rows`` and
    ``positions``; the defaults of the others suit modules with ``weight`` and ``bias`` attributes.
    ``diagonal_input``: the rule's A is diagonal (its ``input_rows`` return ``DiagonalRows``).
    ``scale_shift``: a ``ScaleShiftRule`` (curvature kept per weight entry, not as a Kronecker product)."""

    diagonal_input = False
    scale_shift = False
    partial = False  # the layer's weight is part of a parameter that other layers share (an attention's q, k, v)

    def check(self, module: nn.Module) -> Optional[str]:
        """None when K-FAC covers ``module``; otherwise the reason, which the optimizer reports."""
        return None

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight

    def bias(self, module: nn.Module) -> Optional[Tensor]:
        return getattr(module, "bias", None)

    def to_matrix(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1)

    def from_matrix(self, module: nn.Module, M: Tensor) -> Tensor:
        return M.reshape(self.weight(module).shape)

    def bias_vector(self, module: nn.Module, t: Tensor) -> Tensor:
        """A bias-shaped tensor as the (out,) vector of the block's bias entries."""
        return t.reshape(-1)

    def bias_from_vector(self, module: nn.Module, v: Tensor) -> Tensor:
        return v.reshape(self.bias(module).shape)

    def input_rows(self, name: str, module: nn.Module, x: Tensor, kfac_approx: str) -> Tuple[Rows, float]:
        raise NotImplementedError

    def grad_rows(self, module: nn.Module, g: Tensor, kfac_approx: str) -> Tensor:
        raise NotImplementedError

    def positions(self, module: nn.Module, output: Tensor) -> int:
        raise NotImplementedError

    def _with_bias(self, module: nn.Module) -> bool:
        b = self.bias(module)
        return b is not None and b.requires_grad

    # ---- unit-wise curvature (structure="unit-wise"): one exact block per output unit -------------

    def unit_inputs(self, name: str, module: nn.Module, x: Tensor) -> Tensor:
        """What the per-example gradients need of the forward: the input rows (B, S, d) of every
        data point and position (the rows of A under "expand", one data point's together)."""
        if self.diagonal_input:
            raise ValueError(f"layer {name!r} ({type(module).__name__}): unit-wise curvature does not cover layers "
                             "with one-hot inputs")
        rows, _ = self.input_rows(name, module, x, "expand")
        if isinstance(rows, ops.ConvPatches):
            rows = rows.unfold()
        return rows.reshape(x.shape[0], -1, rows.shape[-1])

    def example_rows(self, module: nn.Module, g: Tensor, inputs: Tensor) -> EntryRows:
        """The per-example gradient of every output unit's incoming weights (and its bias entry),
        (B, out, d (+ 1)): the sum over positions of g times the input row."""
        gs = self.grad_rows(module, g, "expand").to(inputs.dtype).reshape(inputs.shape[0], inputs.shape[1], -1)
        rows = torch.einsum("bso,bsi->boi", gs, inputs)
        if self._with_bias(module):
            rows = torch.cat([rows, gs.sum(1).unsqueeze(-1)], -1)
        return EntryRows(rows)


def _batched(name: str, t: Tensor, min_dim: int, what: str) -> None:
    if t.dim() < min_dim:
        raise ValueError(f"layer {name!r}: K-FAC needs a batched {what}, got shape {tuple(t.shape)}")


def _rows_of(g: Tensor, kfac_approx: str) -> Tensor:
    """(B, S, d) per-position rows: all of them ("expand"), or their sum over positions ("reduce")."""
    return g.reshape(-1, g.shape[-1]) if kfac_approx == "expand" else g.sum(1)


class LinearRule(LayerRule):
    """nn.Linear on inputs (B, ..., in): every leading dimension after the batch is a position."""

    def input_rows(self, name, module, x, kfac_approx):
        x = x.detach()
        _batched(name, x, 2, "input (B, ..., in_features)")
        x = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])  # (B, S, d_in)
        if kfac_approx == "expand":
            return x.reshape(-1, x.shape[-1]), 1.0 / x.shape[1]
        return x.mean(1), 1.0

    def grad_rows(self, module, g, kfac_approx):
        g = g.detach()
        return _rows_of(g.reshape(g.shape[0], math.prod(g.shape[1:-1]), g.shape[-1]), kfac_approx)

    def positions(self, module, output):
        return math.prod(output.shape[1:-1])


def _zero_padding(module: nn.Module) -> List[Tuple[int, int]]:
    """(left, right) padding per spatial dimension; "same" puts an odd remainder on the right, as torch does."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def conv_patches(module: nn.Module, x: Tensor) -> ops.ConvPatches:
    """Conv input (B, C_in, *spatial) -> the description of its unfolded patches (rows in F.unfold's
    order, columns (input channel, kernel row, kernel column), the order of weight.flatten(1)).

    Grouped conv: the input channels are averaged over the groups first, as curvlinops does. A
    Conv1d is a Conv2d with a kernel of height 1.
    """
    B, c_in = x.shape[:2]
    g = module.groups
    if g > 1:
        x = x.reshape(B, g, c_in // g, *x.shape[2:]).mean(1)
    pads = _zero_padding(module)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        pads = [(0, 0), *pads]
    return ops.ConvPatches(x, tuple(kernel), tuple(stride), tuple(dilation),
                           (pads[0][0], pads[0][1], pads[1][0], pads[1][1]))


class ConvRule(LayerRule):
    """nn.Conv1d and nn.Conv2d with zero padding: the rows of A are the patches under the kernel at
    every output position (the positions), those of G the output gradients there."""

    def check(self, module):
        # Circular, reflect and replicate padding put input entries in the patches that unfold's
        # zero padding does not.
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only zero padding is supported)"
        return None

    def input_rows(self, name, module, x, kfac_approx):
        """With "expand", when the unfold would be larger than the input (kernel taps > stride area,
        e.g. every 3x3 stride-1 conv), the rows stay an ``ops.ConvPatches`` description, which
        ``ops.factor_update_`` accumulates without materialising them on the native paths."""
        x = x.detach()
        _batched(name, x, module.weight.dim(), "input (B, C_in, *spatial)")
        patches = self._patches(module, x)
        positions = math.prod(patches.output_size)
        if kfac_approx == "expand":
            (kh, kw), (sh, sw) = patches.kernel, patches.stride
            return (patches if kh * kw > sh * sw else patches.unfold()), 1.0 / positions
        rows = patches.unfold()
        return rows.reshape(x.shape[0], positions, rows.shape[1]).mean(1), 1.0

    def _patches(self, module, x: Tensor) -> ops.ConvPatches:
        return conv_patches(module, x)

    def grad_rows(self, module, g, kfac_approx):
        return _rows_of(g.detach().flatten(2).transpose(1, 2), kfac_approx)  # (B, C_out, *spatial) -> (B, S, d_out)

    def positions(self, module, output):
        return math.prod(output.shape[2:])


class ConvTransposeRule(ConvRule):
    """nn.ConvTranspose2d (groups 1, zero padding): the output at each position is W applied to the
    patch, under the flipped kernel, of the input with stride - 1 zeros between its pixels and
    dilation * (kernel - 1) - padding around them (output_padding more on the bottom and right):
    a convolution's rows over that input. The weight (in, out, kh, kw) is the (out, in * kh * kw)
    matrix of those patches' columns (channel, kernel row, kernel column) with the kernel flipped.
    Calls with ``output_size`` (a different output padding) are refused."""

    def __init__(self):
        self._expected = weakref.WeakKeyDictionary()  # module -> the output size its last input gives

    def check(self, module):
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        return super().check(module)

    def _patches(self, module, x):
        (sh, sw), (dh, dw), (kh, kw) = module.stride, module.dilation, module.kernel_size
        (ph, pw), (oh, ow) = module.padding, module.output_padding
        B, C, H, W = x.shape
        up = x.new_zeros(B, C, (H - 1) * sh + 1, (W - 1) * sw + 1)
        up[:, :, ::sh, ::sw] = x
        top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
        padded = torch.nn.functional.pad(up, [left, left + ow, top, top + oh])  # negative sizes crop
        patches = ops.ConvPatches(padded, (kh, kw), (1, 1), (dh, dw))
        self._expected[module] = patches.output_size
        return patches

    def positions(self, module, output):
        expected = self._expected.get(module)
        if expected is not None and tuple(output.shape[2:]) != tuple(expected):
            raise ValueError(f"nn.ConvTranspose2d called with output_size (output {tuple(output.shape[2:])}, "
                             f"{tuple(expected)} from its output_padding): K-FAC supports the module's own "
                             "output_padding only")
        return super().positions(module, output)

    def to_matrix(self, module, t):
        return t.flip(2, 3).transpose(0, 1).reshape(t.shape[1], -1)

    def from_matrix(self, module, M):
        c_in, c_out, kh, kw = self.weight(module).shape
        return M.reshape(c_out, c_in, kh, kw).transpose(0, 1).flip(2, 3)


class EmbeddingRule(LayerRule):
    """nn.Embedding: a linear layer on one-hot inputs, y = W^T e_token, with the weight (num, dim)
    as the (dim, num) matrix. The Gram matrix of one-hot rows is diagonal, the token counts, so A
    is kept as a vector: memory linear in the vocabulary. "expand" only (the mean of one-hot rows
    over a sequence is not one-hot)."""

    diagonal_input = True

    def check(self, module):
        if module.max_norm is not None:
            return "max_norm (the forward rescales the weight rows it reads)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq (the gradient is not the loss's)"
        if module.sparse:
            return "sparse=True (K-FAC needs dense gradients)"
        return None

    def bias(self, module):
        return None

    def to_matrix(self, module, t):
        return t.T

    def from_matrix(self, module, M):
        return M.T

    def input_rows(self, name, module, x, kfac_approx):
        if kfac_approx != "expand":
            raise ValueError(f"layer {name!r}: nn.Embedding supports kfac_approx='expand' only")
        _batched(name, x, 1, "input (B, ...) of token ids")
        positions = x[0].numel() if x.dim() > 1 else 1
        counts = torch.bincount(x.detach().reshape(-1), minlength=module.num_embeddings)
        return DiagonalRows(counts), 1.0 / positions

    def grad_rows(self, module, g, kfac_approx):
        g = g.detach()
        return g.reshape(-1, g.shape[-1])

    def positions(self, module, output):
        return math.prod(output.shape[1:-1])


class ScaleShiftRule(LayerRule):
    """A layer y = xhat * weight (+ bias), elementwise, with xhat computed from the input x without
    parameters (the normalisation layers). Its weight has few entries (the channels), so its
    curvature is kept exactly rather than as a Kronecker product: for every weight entry e, the
    (k, k) block of the Fisher / GGN of (weight[e], bias[e]), the sum over data points n of v v^T
    with v the per-example gradient (sum over positions of g * xhat, and of g), which the curvature
    pass gives at the layer's output. No approximation beyond the block-diagonal one (the
    Kronecker rules' kfac_approx does not apply). Subclasses give ``normalized`` and ``entries``."""

    scale_shift = True

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """xhat of input x, shaped as the output (computed without the affine parameters)."""
        raise NotImplementedError

    def entries(self, module: nn.Module, t: Tensor) -> Tensor:
        """An output-shaped tensor as (B, S, P): per data point, position and weight entry."""
        raise NotImplementedError

    def to_matrix(self, module, t):
        return t.reshape(-1, 1)

    def from_matrix(self, module, M):
        return M.reshape(self.weight(module).shape)

    def unit_inputs(self, name, module, x):
        return self.normalized(module, x)

    def input_rows(self, name, module, x, kfac_approx):
        """The rows of the forward-only Fisher (G = I): [xhat, 1] per data point and position, scale 1/S."""
        xs = self.entries(module, self.normalized(module, x))
        cols = [xs] + ([torch.ones_like(xs)] if self._with_bias(module) else [])
        rows = torch.stack(cols, -1)
        return EntryRows(rows.reshape(-1, *rows.shape[2:])), 1.0 / xs.shape[1]

    def example_rows(self, module: nn.Module, g: Tensor, xhat: Tensor) -> EntryRows:
        """Per-example gradients (B, P, k) from the output gradient g and ``normalized``'s xhat."""
        gs = self.entries(module, g.detach().to(xhat.dtype))
        cols = [(gs * self.entries(module, xhat)).sum(1)] + ([gs.sum(1)] if self._with_bias(module) else [])
        return EntryRows(torch.stack(cols, -1))

    def grad_rows(self, module, g, kfac_approx):
        raise TypeError("a ScaleShiftRule's curvature comes from example_rows (its G is not Kronecker-factored)")

    def positions(self, module, output):
        return self.entries(module, output).shape[1]


def _float(x: Tensor) -> Tensor:
    x = x.detach()
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class LayerNormRule(ScaleShiftRule):
    """nn.LayerNorm: the weight's entries are the normalized_shape; every leading dimension after
    the batch is a position."""

    def normalized(self, module, x):
        _batched(type(module).__name__, x, len(module.normalized_shape) + 1, "input")
        return torch.nn.functional.layer_norm(_float(x), module.normalized_shape, None, None, module.eps)

    def entries(self, module, t):
        P = math.prod(module.normalized_shape)
        return t.reshape(t.shape[0], -1, P)


class RMSNormRule(LayerNormRule):
    """nn.RMSNorm (no bias): as nn.LayerNorm, xhat = x / rms(x)."""

    def normalized(self, module, x):
        _batched(type(module).__name__, x, len(module.normalized_shape) + 1, "input")
        return torch.nn.functional.rms_norm(_float(x), module.normalized_shape, None, module.eps)

    def bias(self, module):
        return None


class _ChannelRule(ScaleShiftRule):
    """Norms with one weight entry per channel (dim 1) of (B, C, *spatial): positions are spatial."""

    def entries(self, module, t):
        return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


class GroupNormRule(_ChannelRule):
    """nn.GroupNorm: xhat normalised over each group's channels and positions of one data point."""

    def normalized(self, module, x):
        _batched(type(module).__name__, x, 2, "input (B, C, *)")
        return torch.nn.functional.group_norm(_float(x), module.num_groups, None, None, module.eps)


class BatchNormRule(_ChannelRule):
    """nn.BatchNorm1d/2d/3d: xhat with the batch's statistics in training mode (or without running
    statistics), the running ones in eval mode. In training mode the batch statistics couple the
    data points; the per-example gradients are taken at the layer's output as for every other
    layer, which is exact when no later layer couples them again (docs/curvature.md)."""

    def normalized(self, module, x):
        _batched(type(module).__name__, x, 2, "input (B, C, *)")
        x = _float(x)
        batch_stats = module.training or module.running_mean is None
        mean, var = (None, None) if batch_stats else (module.running_mean.to(x.dtype), module.running_var.to(x.dtype))
        return torch.nn.functional.batch_norm(x, mean, var, None, None, batch_stats, 0.0, module.eps)


_RULES: Dict[Type[nn.Module], LayerRule] = {}


def register_rule(module_type: Type[nn.Module], rule: LayerRule) -> None:
    """Make K-FAC cover every module of ``module_type`` (and its subclasses without a rule of their
    own) with ``rule``. Register before building the optimizer; a later registration for the same
    type replaces the earlier one."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a natgrad_cuda.curvature.rules.LayerRule, got {type(rule).__name__}")
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> Optional[LayerRule]:
    """The rule of ``module``'s type (the nearest registered class in its MRO), or None."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


register_rule(nn.Linear, LinearRule())
register_rule(nn.Conv1d, ConvRule())
register_rule(nn.Conv2d, ConvRule())
register_rule(nn.ConvTranspose2d, ConvTransposeRule())
register_rule(nn.Embedding, EmbeddingRule())
register_rule(nn.LayerNorm, LayerNormRule())
register_rule(nn.RMSNorm, RMSNormRule())
register_rule(nn.GroupNorm, GroupNormRule())
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, BatchNormRule())
