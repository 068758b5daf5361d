"""Which layers K-FAC covers and where their parameters sit in the dense (P, P) matrix; the rows
of each layer's factors come from its rule (``rules.py``). Conventions: ``docs/curvature.md``.

A layer's input x and output gradient g become rows: A accumulates sum(rows^T rows) * scale / N and
G accumulates sum(rows^T rows) / Z.
- expand: one row per data point and weight-sharing position (scale 1/S for A);
- reduce: one row per data point, the mean of x over positions (scale 1) and the sum of g.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .attention import attention_layers, unsupported_reason
from .rules import rule_for

__all__ = [
    "find_layers",
    "input_rows",
    "ParamSlot",
    "parameter_slots",
    "write_dense_blocks",
    "write_unit_blocks",
    "unit_indices",
]


def find_layers(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], List[str]]:
    """The layers with a rule (``rules.py``) and a trainable parameter, and the names of the other
    modules with trainable parameters of their own, which K-FAC does not cover. Frozen modules are
    neither.

    An nn.MultiheadAttention is four layers: its q, k and v projections (``attention.py``, named
    ``<attention>.q_proj`` and so on) and its ``out_proj`` nn.Linear, whose rows its forward gives;
    one that K-FAC cannot cover (``add_bias_kv``) is reported with its out_proj.

    Tied parameters (one Parameter held by several modules, an embedding shared with the output
    layer, say) are preconditioned once: by the first covered layer that holds them, in model
    order, whose factors see its own use of them; the other holders' uses only add to their
    gradient, and a later covered layer holding one of them is not covered (both are reported).
    """
    holders: dict = {}  # id(parameter) -> the names of the modules holding it
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name or "<root>")
    functional, claimed, verdicts = [], {}, []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        inside = next((prefix for prefix in functional if name.startswith(prefix)), None)
        attention_why = None
        if isinstance(module, nn.MultiheadAttention) and inside is None:
            attention_why = unsupported_reason(module)
            if attention_why is None and not any(id(p) in claimed for p in own):
                for p in own:  # its q, k and v projections share them
                    claimed[id(p)] = name
                verdicts += [(part, layer, own, None, None, True) for part, layer in attention_layers(name, module)]
                continue
            functional.append(name + ".")  # out_proj too: the attention applies it functionally
        if not own:
            continue
        rule = rule_for(module)
        why = attention_why or (rule.check(module) if rule is not None else None)
        covered = inside is None and rule is not None and why is None and not any(id(p) in claimed for p in own)
        if covered:
            for p in own:
                claimed[id(p)] = name
        verdicts.append((name, module, own, inside, why, covered))
    layers, unsupported = [], []
    for name, module, own, inside, why, covered in verdicts:
        if covered:
            layers.append((name, module))
            continue
        label = name or "<root>"
        tied = sorted({h for p in own for h in holders[id(p)] if h != label})
        owners = sorted({claimed[id(p)] for p in own if id(p) in claimed})
        if inside is not None:
            detail = f", applied functionally by the nn.MultiheadAttention {inside[:-1] or '<root>'!r}"
        elif why:
            detail = f": {why}"
        else:
            detail = ""
        if owners:
            detail += (f"; its parameters tied to {', '.join(map(repr, owners))} are preconditioned by that layer's "
                       "factors, this module's use only adding to their gradient")
        elif tied:
            detail += f"; parameters tied to {', '.join(map(repr, tied))}"
        unsupported.append(f"{label} ({type(module).__name__}{detail})")
    return layers, unsupported


def input_rows(name: str, module: nn.Module, x: Tensor, kfac_approx: str):
    """Rows for A from the layer input x, and the scale of their outer products (before 1/N)."""
    return rule_for(module).input_rows(name, module, x, kfac_approx)


# ---- dense layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSlot:
    """Where one layer's parameters sit in the flattened model.parameters() vector."""

    weight: int  # offset of weight.flatten()
    out_features: int
    in_features: int  # d_in = weight.numel() / out_features
    bias: Optional[int]  # offset of bias, None without one
    # Where each entry of the rule's (out, d_in) matrix (row-major) sits in weight.flatten(); None
    # when they are in the same order.
    order: Optional[Tensor] = None


def parameter_slots(model: nn.Module, layers: List[Tuple[str, nn.Module]]) -> Tuple[Dict[str, ParamSlot], int]:
    """Offsets of every layer's weight and bias in model.parameters() order, and the total size P."""
    offsets, total = {}, 0
    for p in model.parameters():
        offsets[id(p)] = total
        total += p.numel()
    slots = {}
    for name, module in layers:
        rule = rule_for(module)
        w, b = rule.weight(module), rule.bias(module)
        order = rule.to_matrix(module, torch.arange(w.numel(), device=w.device).reshape(w.shape))
        identity = bool(torch.equal(order.reshape(-1), torch.arange(w.numel(), device=w.device)))
        slots[name] = ParamSlot(
            weight=offsets[id(w)],
            out_features=order.shape[0],
            in_features=order.shape[1],
            # the block's bias entries: a contiguous run of the bias (all of it but for an attention's q, k, v)
            bias=offsets[id(b)] + int(rule.bias_vector(module, torch.arange(b.numel()).reshape(b.shape))[0])
            if b is not None else None,
            order=None if identity else order.reshape(-1),
        )
    return slots, total


def write_dense_blocks(out: Tensor, slot: ParamSlot, A: Tensor, G: Tensor, joint: bool) -> None:
    """Write one layer's K-FAC blocks into the dense matrix ``out`` (layout: docs/curvature.md).

    With joint weight and bias, A carries the bias as its last entry: the bias block is A[-1, -1] G
    and the weight-bias block kron(G, A[:d, -1:]), i.e. kron(G, A) with the bias entries moved after
    all weight entries.
    """
    d = slot.in_features
    if A.dim() == 1:  # a diagonal A, kept as a vector
        A = torch.diag(A)
    if slot.order is None:
        w = slice(slot.weight, slot.weight + slot.out_features * d)
        rows, cols = w, w
    else:  # the matrix's entries sit elsewhere in the weight
        w = slot.weight + slot.order.to(out.device)
        rows, cols = w[:, None], w[None, :]
    out[rows, cols] = torch.kron(G, A[:d, :d])
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


def unit_indices(slot: ParamSlot, k: int, device: torch.device) -> Tensor:
    """(out, k): where each output unit's incoming weights (the row of the rule's matrix), then its
    bias entry when k = d_in + 1, sit in the flattened model.parameters()."""
    d = slot.in_features
    w = torch.arange(slot.out_features * d, device=device) if slot.order is None else slot.order.to(device)
    idx = (slot.weight + w).reshape(slot.out_features, d)
    if k == d + 1:
        bias = slot.bias + torch.arange(slot.out_features, device=device)
        idx = torch.cat([idx, bias.unsqueeze(1)], 1)
    return idx


def write_unit_blocks(out: Tensor, slot: ParamSlot, F: Tensor) -> None:
    """Write per-unit blocks F (out, k, k) into ``out``: unit o's block couples its incoming weights
    and, with k = d_in + 1, its bias entry (a scale-and-shift layer: d_in = 1, a unit per entry)."""
    idx = unit_indices(slot, F.shape[-1], out.device)
    out[idx[:, :, None], idx[:, None, :]] = F
