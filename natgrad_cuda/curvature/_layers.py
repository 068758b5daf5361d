"""Supported-layer rules: which layers K-FAC covers, the rows their factors are built from, and
where their parameters sit in the dense (P, P) matrix. Conventions: ``docs/curvature.md``.

A layer's input x and output gradient g become rows: A accumulates sum(rows^T rows) * scale / N and
G accumulates sum(rows^T rows) / Z.
- expand: one row per data point and weight-sharing position (scale 1/S for A);
- reduce: one row per data point, the mean of x over positions (scale 1) and the sum of g.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops

__all__ = [
    "SUPPORTED_LAYERS",
    "is_supported",
    "find_layers",
    "input_rows",
    "conv_patches",
    "grad_rows",
    "positions",
    "ParamSlot",
    "parameter_slots",
    "write_dense_blocks",
]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_CONVS = (nn.Conv1d, nn.Conv2d)


def is_supported(module: nn.Module) -> bool:
    # Circular, reflect and replicate padding put input entries in the patches that unfold's zero
    # padding does not.
    if isinstance(module, _CONVS):
        return module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def find_layers(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], List[str]]:
    """The supported layers with a trainable parameter, and the names of the other modules with
    trainable parameters of their own, which K-FAC does not cover. Frozen modules are neither.

    The nn.Linear inside an nn.MultiheadAttention (``out_proj``) is not covered: the attention
    applies its weight functionally, so the layer never runs as a module and no hook would see it.
    """
    layers, unsupported, functional = [], [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            functional.append(name + ".")
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        inside = next((prefix for prefix in functional if name.startswith(prefix)), None)
        if inside is not None:
            unsupported.append(f"{name} ({type(module).__name__}, applied functionally by the "
                               f"nn.MultiheadAttention {inside[:-1] or '<root>'!r})")
        elif is_supported(module):
            layers.append((name, module))
        else:
            unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
    return layers, unsupported


def _batched(module_name: str, t: Tensor, min_dim: int, what: str) -> None:
    if t.dim() < min_dim:
        raise ValueError(f"layer {module_name!r}: K-FAC needs a batched {what}, got shape {tuple(t.shape)}")


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


def input_rows(name: str, module: nn.Module, x: Tensor, kfac_approx: str):
    """Rows for A from the layer input x, and the scale of their outer products (before 1/N).

    Convolutions with expand: when the unfold would be larger than the input (kernel taps > stride
    area, e.g. every 3x3 stride-1 conv), the rows stay an ``ops.ConvPatches`` description, which
    ``ops.factor_update_`` accumulates without materialising them on the native paths.
    """
    x = x.detach()
    if isinstance(module, nn.Linear):
        _batched(name, x, 2, "input (B, ..., in_features)")
        x = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])  # (B, S, d_in)
        if kfac_approx == "expand":
            return x.reshape(-1, x.shape[-1]), 1.0 / x.shape[1]
        return x.mean(1), 1.0
    _batched(name, x, module.weight.dim(), "input (B, C_in, *spatial)")
    patches = conv_patches(module, x)
    positions = math.prod(patches.output_size)
    if kfac_approx == "expand":
        (kh, kw), (sh, sw) = patches.kernel, patches.stride
        return (patches if kh * kw > sh * sw else patches.unfold()), 1.0 / positions
    rows = patches.unfold()
    return rows.reshape(x.shape[0], positions, rows.shape[1]).mean(1), 1.0


def positions(module: nn.Module, output: Tensor) -> int:
    """S, the weight-sharing positions of one call of the layer, from its output."""
    if isinstance(module, nn.Linear):
        return math.prod(output.shape[1:-1])
    return math.prod(output.shape[2:])


def grad_rows(module: nn.Module, g: Tensor, kfac_approx: str) -> Tensor:
    """Rows for G from the gradient g with respect to the layer output."""
    g = g.detach()
    if isinstance(module, nn.Linear):
        g = g.reshape(g.shape[0], math.prod(g.shape[1:-1]), g.shape[-1])  # (B, S, d_out)
    else:
        g = g.flatten(2).transpose(1, 2)  # (B, C_out, *spatial) -> (B, S, d_out)
    if kfac_approx == "expand":
        return g.reshape(-1, g.shape[-1])
    return g.sum(1)


# ---- dense layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSlot:
    """Where one layer's parameters sit in the flattened model.parameters() vector."""

    weight: int  # offset of weight.flatten()
    out_features: int
    in_features: int  # d_in = weight.numel() / out_features
    bias: Optional[int]  # offset of bias, None without one


def parameter_slots(model: nn.Module, layers: List[Tuple[str, nn.Module]]) -> Tuple[Dict[str, ParamSlot], int]:
    """Offsets of every layer's weight and bias in model.parameters() order, and the total size P."""
    offsets, total = {}, 0
    for p in model.parameters():
        offsets[id(p)] = total
        total += p.numel()
    slots = {}
    for name, module in layers:
        w = module.weight
        slots[name] = ParamSlot(
            weight=offsets[id(w)],
            out_features=w.shape[0],
            in_features=w[0].numel(),
            bias=offsets[id(module.bias)] if module.bias is not None else None,
        )
    return slots, total


def write_dense_blocks(out: Tensor, slot: ParamSlot, A: Tensor, G: Tensor, joint: bool) -> None:
    """Write one layer's K-FAC blocks into the dense matrix ``out`` (layout: docs/curvature.md).

    With joint weight and bias, A carries the bias as its last entry: the bias block is A[-1, -1] G
    and the weight-bias block kron(G, A[:d, -1:]), i.e. kron(G, A) with the bias entries moved after
    all weight entries.
    """
    d = slot.in_features
    w = slice(slot.weight, slot.weight + slot.out_features * d)
    out[w, w] = torch.kron(G, A[:d, :d])
    if slot.bias is None:
        return
    b = slice(slot.bias, slot.bias + slot.out_features)
    if joint:
        out[b, b] = A[d, d] * G
        cross = torch.kron(G, A[:d, d:])
        out[w, b] = cross
        out[b, w] = cross.T
    else:
        out[b, b] = G
