"""nn.MultiheadAttention under K-FAC: its q, k, v and output projections as four linear layers.

The attention applies its projections inside ``F.multi_head_attention_forward``, where no module
hook sees them. While a recorded forward of a covered attention runs, ``Watch`` (a
TorchFunctionMode) runs that call as ``attention_forward``: an equivalent forward built from the
same weights with the same torch ops, equal to torch's bit for bit (tested), which hands each
projection's input and output to the recorder as if the projection were an nn.Linear module. The
inputs there are (L, N, E) (sequence first, whatever ``batch_first`` says), the output
projection's (L * N, E); the recorder gets views in the attention's own layout, (N, L, E) with
``batch_first``, as the model's other layers see their inputs. A forward that did not show every
projection raises: a projection is never silently left without curvature. Forwards that are not
recorded (between factor updates, under no_grad) run torch's own code untouched.

The q, k and v projections are rows of one parameter (``in_proj_weight``, ``in_proj_bias``) unless
the key and value dimensions differ from the embedding's (``q_proj_weight`` and friends); each is a
layer of its own, ``AttentionProjection``, with its own Kronecker factors (A from its input: the
query, key or value; G from the gradient at its output), named ``<attention>.q_proj``,
``.k_proj``, ``.v_proj``. The output projection is the attention's ``out_proj`` nn.Linear, covered
by the linear rule under its own name.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .rules import LinearRule, register_rule

__all__ = ["AttentionProjection", "AttentionProjectionRule", "attention_layers", "unsupported_reason", "Watch",
           "attention_forward"]

_QKV = ("q", "k", "v")


class AttentionProjection(nn.Module):
    """The q (0), k (1) or v (2) projection of an nn.MultiheadAttention, as a layer. It is never
    called: its rows come from the attention's forward (``Watch``)."""

    def __init__(self, attention: nn.MultiheadAttention, index: int):
        super().__init__()
        object.__setattr__(self, "attention", attention)  # not a submodule: its parameters stay the attention's
        self.index = index

    def extra_repr(self) -> str:
        return f"{_QKV[self.index]}_proj of an nn.MultiheadAttention"


class AttentionProjectionRule(LinearRule):
    """A projection's weight is its rows of ``in_proj_weight`` (or its own ``{q,k,v}_proj_weight``),
    its bias its entries of ``in_proj_bias``; its inputs and outputs are batch-first views."""

    partial = True

    def weight(self, module):
        a = module.attention
        if a.in_proj_weight is not None:
            return a.in_proj_weight
        return (a.q_proj_weight, a.k_proj_weight, a.v_proj_weight)[module.index]

    def bias(self, module):
        return module.attention.in_proj_bias

    def _rows(self, module, packed: bool) -> slice:
        E = module.attention.embed_dim
        return slice(module.index * E, (module.index + 1) * E) if packed else slice(None)

    def to_matrix(self, module, t):
        return t[self._rows(module, module.attention.in_proj_weight is not None)]

    def from_matrix(self, module, M):
        packed = module.attention.in_proj_weight is not None
        if not packed:
            return M
        full = M.new_zeros(self.weight(module).shape)  # the other projections' rows: zero
        full[self._rows(module, True)] = M
        return full

    def bias_vector(self, module, t):
        return t[self._rows(module, True)]

    def bias_from_vector(self, module, v):
        full = v.new_zeros(self.bias(module).shape)
        full[self._rows(module, True)] = v
        return full


register_rule(AttentionProjection, AttentionProjectionRule())


def unsupported_reason(attention: nn.MultiheadAttention) -> Optional[str]:
    """Why K-FAC cannot cover this attention, or None."""
    if attention.bias_k is not None:
        return "add_bias_kv=True (its bias_k and bias_v have no rule)"
    return None


def attention_layers(name: str, attention: nn.MultiheadAttention) -> List[Tuple[str, nn.Module]]:
    """The q, k and v projections of an attention as (name, layer); its out_proj is an nn.Linear
    found on its own."""
    prefix = f"{name}." if name else ""
    return [(f"{prefix}{which}_proj", AttentionProjection(attention, i)) for i, which in enumerate(_QKV)]


Saw = Callable[..., None]  # recorder.saw(layer, x, output, source=(real input, real output, grad view))
_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class Watch(TorchFunctionMode):
    """Active during one recorded forward of ``attention``: its call of F.multi_head_attention_forward
    runs ``attention_forward``, which computes the same thing with the same torch ops in the same
    order (so the same numbers) and shows each projection to ``saw`` in the attention's own layout.
    ``layers``: {"q", "k", "v", "out"} -> the recorder's layer of each projection it covers."""

    def __init__(self, attention: nn.MultiheadAttention, layers: Dict[str, object], saw: Saw):
        super().__init__()
        self.attention, self.layers, self._saw = attention, layers, saw
        self.seen: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            return attention_forward(self.see, **_SIGNATURE.bind(*args, **kwargs).arguments)
        return func(*args, **kwargs)

    def see(self, which: str, x: Tensor, out: Tensor, shape: Tuple[int, int], part: slice = slice(None)) -> None:
        """Projection ``which`` computed ``out[..., part]`` from ``x``, both (L, N, E), or (L * N, E)
        with ``shape`` = (L, N)."""
        self.seen.append(which)
        layer = self.layers.get(which)
        if layer is None:
            return

        first = self.attention.batch_first

        def view(t: Tensor) -> Tensor:  # -> the attention's own layout: (N, L, E) when batch_first
            t = t[..., part].reshape(*shape, -1)
            return t.transpose(0, 1) if first else t

        rows = x.reshape(*shape, -1)
        self._saw(layer, rows.transpose(0, 1) if first else rows, view(out.detach()), source=(x, out, view))

    def check(self) -> None:
        """After the forward: every covered projection was seen once."""
        missing = [w for w in self.layers if self.seen.count(w) != 1]
        if missing:
            raise RuntimeError(
                f"K-FAC: the forward of nn.MultiheadAttention did not go through F.multi_head_attention_forward as "
                f"K-FAC expects (projections seen: {self.seen}, expected each of {sorted(self.layers)} once), so "
                "some would get no curvature")


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True: not attended) as the additive float mask; a float mask as it is."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise ValueError("nn.MultiheadAttention: only bool and floating-point masks are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def attention_forward(see, query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k,
                      bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                      key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                      q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                      average_attn_weights=True, is_causal=False):
    """F.multi_head_attention_forward with its projections shown to ``see`` (``Watch.see``): the
    same torch ops in the same order, so the same outputs; tests/test_attention.py holds it to
    torch's, bit for bit, over the options. Not covered here (``unsupported_reason`` refuses the
    attentions that would need them): bias_k / bias_v, static_k / static_v."""
    if bias_k is not None or bias_v is not None or static_k is not None or static_v is not None:
        raise ValueError("K-FAC: nn.MultiheadAttention with bias_k/bias_v or static_k/static_v is not supported")
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = query.shape
    S = key.shape[0]
    if E != embed_dim_to_check:
        raise ValueError(f"nn.MultiheadAttention: expected embedding dimension {embed_dim_to_check}, got {E}")
    key_padding_mask = _float_mask(key_padding_mask, query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("nn.MultiheadAttention: is_causal needs attn_mask (the causal mask itself)")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention's own causal masking
    else:
        attn_mask = _float_mask(attn_mask, query.dtype)
        if key_padding_mask is not None:
            is_causal = False
    head_dim = E // num_heads

    # The projections, as torch computes them: one packed product for self-attention, q and the
    # packed kv when key is value, three products otherwise.
    if not use_separate_proj_weight:
        W, b = in_proj_weight, in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if key is value and query is key:
            proj = F.linear(query, W, b)
            for i, which in enumerate(_QKV):
                see(which, query, proj, (L, N), slice(i * E, (i + 1) * E))
            proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            q, k, v = proj[0], proj[1], proj[2]
        elif key is value:
            w_q, w_kv = W.split([E, 2 * E])
            b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
            q = F.linear(query, w_q, b_q)
            see("q", query, q, (L, N))
            kv = F.linear(key, w_kv, b_kv)
            see("k", key, kv, (S, N), slice(0, E))
            see("v", key, kv, (S, N), slice(E, 2 * E))
            kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            k, v = kv[0], kv[1]
        else:
            w_q, w_k, w_v = W.chunk(3)
            q, k, v = F.linear(query, w_q, bq), F.linear(key, w_k, bk), F.linear(value, w_v, bv)
            see("q", query, q, (L, N)), see("k", key, k, (S, N)), see("v", value, v, (S, N))
    else:
        bq, bk, bv = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q = F.linear(query, q_proj_weight, bq)
        k = F.linear(key, k_proj_weight, bk)
        v = F.linear(value, v_proj_weight, bv)
        see("q", query, q, (L, N)), see("k", key, k, (S, N)), see("v", value, v, (S, N))

    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(L, N * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], N * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], N * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = (N * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    S = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(N, 1, 1, S).expand(-1, num_heads, -1, -1).reshape(N * num_heads, 1, S)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        heads = torch.bmm(weights, v).transpose(0, 1).reshape(L * N, E)
        out = F.linear(heads, out_proj_weight, out_proj_bias)
        see("out", heads, out, (L, N))
        out = out.view(L, N, out.size(1))
        weights = weights.view(N, num_heads, L, S)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3 else \
            attn_mask.view(N, num_heads, -1, S)
    q, k, v = q.view(N, num_heads, L, head_dim), k.view(N, num_heads, S, head_dim), v.view(N, num_heads, S, head_dim)
    heads = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    heads = heads.permute(2, 0, 1, 3).reshape(N * L, E)
    out = F.linear(heads, out_proj_weight, out_proj_bias)
    see("out", heads, out, (L, N))
    out = out.view(L, N, out.size(1))
    return (out.squeeze(1) if not batched else out), None
