"""Exact dense curvature of small models, the oracle for K-FAC: the GGN and the empirical Fisher.

Both are (P, P) over all of model.parameters() (flattened row-major, in that order), built from the
full Jacobian of the flattened outputs (terms, C) with respect to the parameters; the per-term loss
Hessians and gradients come from autograd, independently of the closed forms K-FAC uses.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from ._losses import LossSpec
from .kfac import iter_batches

__all__ = ["ggn", "empirical_fisher"]


def load_forward_ad() -> None:
    """torch loads its forward-AD decompositions on first use through torch.jit.script, which then
    warns of its own deprecation: torch's internals, nothing a caller can change. Load them here
    with that one warning filtered (a no-op once loaded)."""
    with warnings.catch_warnings():
        # FutureWarning in torch 2.14, DeprecationWarning in 2.13
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")
        try:
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        except ImportError:  # a torch without it: nothing to load
            pass


def ggn(model: nn.Module, loss_fn: nn.Module, data) -> Tensor:
    """GGN = 1/Z sum over terms r of J_r^T H_r J_r, H_r the Hessian of l_r with respect to f_r."""
    return _exact(model, loss_fn, data, "ggn")


def empirical_fisher(model: nn.Module, loss_fn: nn.Module, data) -> Tensor:
    """Empirical Fisher = 1/Z sum over terms r of grad l_r grad l_r^T (true targets)."""
    return _exact(model, loss_fn, data, "empirical")


def _exact(model: nn.Module, loss_fn: nn.Module, data, kind: str) -> Tensor:
    spec = LossSpec.from_module(loss_fn)
    load_forward_ad()
    names, params = zip(*model.named_parameters())
    ps = tuple(p.detach() for p in params)
    buffers = dict(model.named_buffers())

    def term_loss(f_r: Tensor, y_r: Tensor) -> Tensor:  # one term: f_r (C,), y_r () or (C,)
        return spec.term_losses(f_r.unsqueeze(0), y_r.unsqueeze(0)).squeeze(0)

    total, num_data, z = None, 0, 0
    for inputs, targets in iter_batches(data):

        def model_outputs(*values: Tensor) -> Tensor:
            # Copies of the buffers: a BatchNorm in training mode may update them, which a function
            # transform does not allow on captured tensors, and the model stays as it was.
            state = {**dict(zip(names, values)), **{n: b.clone() for n, b in buffers.items()}}
            return functional_call(model, state, (inputs,))

        outputs = model_outputs(*ps)
        spec.check(outputs, targets)
        num_data += outputs.shape[0]
        f = spec.flatten_outputs(outputs)
        jac = jacrev(lambda *ps: spec.flatten_outputs(model_outputs(*ps)), argnums=tuple(range(len(ps))))(*ps)
        J = torch.cat([j.reshape(*f.shape, p.numel()) for j, p in zip(jac, ps)], dim=-1)  # (terms, C, P)
        y = spec.flatten_targets(targets, outputs)
        z += spec.normalizer(*f.shape)
        if kind == "ggn":
            H = vmap(hessian(term_loss))(f, y)  # (terms, C, C)
            batch = torch.einsum("tcp,tcd,tdq->pq", J, H, J)
        else:
            term_grads = torch.einsum("tcp,tc->tp", J, vmap(grad(term_loss))(f, y))
            batch = term_grads.T @ term_grads
        total = batch if total is None else total + batch
    if num_data == 0:
        raise ValueError("data is empty: it holds no (inputs, targets) batch with a data point")
    return total / z if spec.reduction == "mean" else total
