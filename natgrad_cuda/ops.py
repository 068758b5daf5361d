"""One Python function per native op; ``impl=`` chooses the implementation.

impl:
  None         native for the tensors' device when it was compiled, else the reference
  "reference"  the pure-PyTorch twin in ``natgrad_cuda.reference``
  "native"     the compiled kernel for the tensors' device (C++ on CPU, CUDA on GPU)
  "emulated"   the CUDA kernel source run on the CPU (CPU tensors); needs the emulated backend

Every op checks its arguments here, once, so that bad input gets an error naming the argument
whichever implementation runs: scalars are range-checked (TypeError for the wrong kind, ValueError
out of range), and tensors that require grad are refused while grad mode is on (the ops have no
derivatives, and the in-place ones would modify autograd leaves). ``_trusted=True`` (the
optimizer's own calls, whose arguments it built and which run every step) skips those checks; the
kernels' own checks still guard them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf

from . import _ext, emulation, reference
from ._checks import check_bool, check_number

__all__ = ["factor_update_", "ConvPatches", "eigh_batched", "eigh_lowrank", "eigh_refine", "damped_inverse", "precondition",
           "ekfac_precondition", "kron_matmul", "kfac_update_", "IMPLS", "GEMM_PRECISIONS", "AUTO_MIN_MACS", "library_gemms",
           "set_library_gemms", "using_library_gemms"]

IMPLS = (None, "reference", "native", "emulated")
_FACTOR_DTYPES = (torch.float32, torch.float64)
_INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---- products handed to cuBLAS by the CUDA ops (csrc/library_gemms.h) ----
GEMM_PRECISIONS = ("torch", "ieee", "tf32", "bf16")
AUTO_MIN_MACS = {"ieee": 1 << 28, "tensor cores": 1 << 26}  # min_macs="auto", by the arithmetic
_library_fallback = {"min_macs": "auto", "precision": "torch"}  # the setting without the compiled extension


def library_gemms() -> dict:
    """Which products the CUDA ops (native on a GPU, and emulated) give to cuBLAS, and how.

    ``min_macs``: a product of m x n x k multiply-adds goes to cuBLAS when m n k >= min_macs; "auto"
    (the default) takes 2**28 (about 645**3) for IEEE float32 and float64 products and 2**26 (about
    406**3) where the library gets tensor cores (TF32, BF16, bf16 or fp16 inputs): from there the
    GPU cost model (bench/gpu_cost_model.py) finds one library call faster than the grouped kernels,
    which run many layers per launch; an estimate until scripts/gpu_check.sh measures both paths.
    ``precision`` for float32 factors (float64 factors always multiply in float64): "torch" follows
    torch's own float32 matmul setting (``torch.backends.cuda.matmul.allow_tf32``: TF32 when
    allowed, the default being IEEE), "ieee" full float32, "tf32" TF32 tensor cores (operands
    rounded to 10 mantissa bits), "bf16" BF16 tensor cores (7 bits); sums are float32 in every case.
    CPU kernels and the reference ignore it.
    """
    if not _ext.loaded():
        return dict(_library_fallback)
    min_macs, code = _ext._C.library_gemms()
    return {"min_macs": "auto" if min_macs < 0 else int(min_macs), "precision": GEMM_PRECISIONS[code]}


def set_library_gemms(min_macs=None, precision: Optional[str] = None) -> None:
    """Sets what ``library_gemms()`` returns (process-wide); arguments left None keep their value.
    ``min_macs``: an int (0 sends every product to cuBLAS, a huge value none) or "auto"."""
    now = library_gemms()
    min_macs = now["min_macs"] if min_macs is None else min_macs
    precision = now["precision"] if precision is None else precision
    if min_macs != "auto" and (isinstance(min_macs, bool) or not isinstance(min_macs, int)
                               or not 0 <= min_macs < 2 ** 63):
        raise ValueError(f"min_macs must be \"auto\" or an int in [0, 2**63), got {min_macs!r}")
    if precision not in GEMM_PRECISIONS:
        raise ValueError(f"precision must be one of {GEMM_PRECISIONS}, got {precision!r}")
    if _ext.loaded():
        _ext._C.set_library_gemms(-1 if min_macs == "auto" else min_macs, GEMM_PRECISIONS.index(precision))
    else:
        _library_fallback.update(min_macs=min_macs, precision=precision)


@contextlib.contextmanager
def using_library_gemms(min_macs: Optional[int] = None, precision: Optional[str] = None):
    """``set_library_gemms`` inside the block; the previous setting comes back on exit."""
    before = library_gemms()
    set_library_gemms(min_macs, precision)
    try:
        yield
    finally:
        set_library_gemms(**before)


def _resolve_impl(impl: Optional[str], device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl is None:
        return "native" if _ext.native_available(device) else "reference"
    if impl == "native" and not _ext.native_available(device):
        raise RuntimeError(
            f"impl='native' asked for, but natgrad_cuda has no compiled kernels for device "
            f"{device.type!r} (build_info()['backends'] = {_ext.backends()})"
        )
    if impl == "emulated":
        if not emulation.available():
            raise RuntimeError(
                "impl='emulated' asked for, but the CUDA emulation backend is not compiled "
                f"(build_info()['backends'] = {_ext.backends()})"
            )
        if device.type != "cpu":
            raise ValueError(f"impl='emulated' runs on CPU tensors, got tensors on {device}")
    return impl


def _refuse_capture(op: str, device: torch.device) -> None:
    """eigh_batched and damped_inverse wait for the GPU on the host (to redo failed factorisations in
    float64), which a CUDA graph cannot hold: a clear error instead of the driver's. Their schemas
    carry torch.Tag.cudagraph_unsafe, so torch.compile's CUDA graphs leave them out."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{op} synchronises with the host on CUDA and cannot be captured in a CUDA graph: "
                           "call it outside the capture (the other ops can be captured)")


def _refuse_autograd(op: str, **named) -> None:
    """No tensor that requires grad while grad mode is on: the ops have no derivatives (a silent zero
    or wrong gradient otherwise), and the in-place ones would write into autograd's leaves."""
    if not torch.is_grad_enabled():
        return
    for name, tensors in named.items():
        for i, t in enumerate(tensors):
            t = t.image if isinstance(t, ConvPatches) else t
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"{op}: {name}[{i}] requires grad, and {op} has no derivative: pass detached "
                                 "tensors or call it under torch.no_grad()")


def _pair(name: str, value, count: int, low: int) -> Tuple[int, ...]:
    """An int or a sequence of ``count`` ints, each >= low, as a tuple (as torch's conv arguments)."""
    items = (value,) * count if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        if isinstance(items, (str, bytes)):
            raise TypeError
        items = tuple(items)
    except TypeError:
        raise TypeError(f"ConvPatches: {name} must be an int or {count} ints, got {value!r}") from None
    if len(items) != count:
        raise ValueError(f"ConvPatches: {name} must be an int or {count} ints, got {value!r}")
    return tuple(check_number(f"ConvPatches: {name}", v, low=low, integer=True) for v in items)


@dataclass(frozen=True)
class ConvPatches:
    """The rows of a convolution's unfolded input, described instead of materialised.

    image (B, C, H, W); kernel, stride, dilation: (rows, columns); padding: (top, bottom, left,
    right) zeros; the rows are the patches at every output position of every image, in F.unfold's
    order (rows b, then output positions), columns (channel, kernel row, kernel column). As an input
    of ``factor_update_`` it costs the native kernels no unfold in memory (CUDA reads the patches
    straight from the image; the CPU writes the patch rows of a bounded slice of the batch at a time).
    """

    image: torch.Tensor
    kernel: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self):  # ints allowed where pairs are meant, as for torch's convolutions
        if not isinstance(self.image, torch.Tensor):
            raise TypeError(f"ConvPatches: image must be a tensor, got {type(self.image).__name__}")
        object.__setattr__(self, "kernel", _pair("kernel", self.kernel, 2, 1))
        object.__setattr__(self, "stride", _pair("stride", self.stride, 2, 1))
        object.__setattr__(self, "dilation", _pair("dilation", self.dilation, 2, 1))
        object.__setattr__(self, "padding", _pair("padding", self.padding, 4, 0))

    @property
    def output_size(self) -> Tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        top, bottom, left, right = self.padding
        H, W = self.image.shape[2] + top + bottom, self.image.shape[3] + left + right
        return max(0, (H - dh * (kh - 1) - 1) // sh + 1), max(0, (W - dw * (kw - 1) - 1) // sw + 1)

    @property
    def shape(self) -> Tuple[int, int]:
        """(rows, columns) of the unfold it stands for."""
        oh, ow = self.output_size
        return self.image.shape[0] * oh * ow, self.image.shape[1] * self.kernel[0] * self.kernel[1]

    def dim(self) -> int:
        return 2

    @property
    def dtype(self) -> torch.dtype:
        return self.image.dtype

    @property
    def device(self) -> torch.device:
        return self.image.device

    def geometry(self) -> List[int]:
        """The 10 ints of the native op: kernel, stride, dilation, top and left padding, output size."""
        return [*self.kernel, *self.stride, *self.dilation, self.padding[0], self.padding[2], *self.output_size]

    def unfold(self) -> torch.Tensor:
        """The rows themselves, (B * positions, C * kh * kw): what the reference path uses."""
        top, bottom, left, right = self.padding
        x = nnf.pad(self.image, [left, right, top, bottom])
        cols = nnf.unfold(x, self.kernel, dilation=self.dilation, stride=self.stride)  # (B, d, positions)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _check_factor_update_args(factors, inputs, decay, scales, append_ones):
    factors, inputs = list(factors), list(inputs)
    n = len(factors)
    for name, seq in (("inputs", inputs), ("scales", scales), ("append_ones", append_ones)):
        if len(seq) != n:
            raise ValueError(f"factor_update_: {name} has {len(seq)} entries but factors has {n}")
    decay = check_number("decay", decay, low=0.0, high=1.0)
    scales = [check_number(f"scales[{i}]", s, low=0.0) for i, s in enumerate(scales)]
    append_ones = [check_bool(f"append_ones[{i}]", a) for i, a in enumerate(append_ones)]
    _refuse_autograd("factor_update_", factors=factors, inputs=inputs)
    device = None
    for i, (F, X, ones) in enumerate(zip(factors, inputs, append_ones)):
        if not isinstance(F, torch.Tensor) or not isinstance(X, (torch.Tensor, ConvPatches)):
            raise TypeError(f"factor_update_: factors[{i}] must be a tensor and inputs[{i}] a tensor or ConvPatches")
        if isinstance(X, ConvPatches) and X.image.dim() != 4:
            raise ValueError(f"factor_update_: inputs[{i}] (ConvPatches) needs a (B, C, H, W) image, got shape "
                             f"{tuple(X.image.shape)}")
        if X.dim() != 2:
            raise ValueError(f"factor_update_: inputs[{i}] must be 2-D (rows, features), got shape {tuple(X.shape)}")
        d = X.shape[1] + int(ones)
        if F.shape != (d, d):
            raise ValueError(
                f"factor_update_: factors[{i}] must have shape ({d}, {d}) for inputs[{i}] of shape "
                f"{tuple(X.shape)} with append_ones={ones}, got {tuple(F.shape)}"
            )
        if F.dtype not in _FACTOR_DTYPES:
            raise ValueError(f"factor_update_: factors[{i}] must be float32 or float64, got {F.dtype}")
        if X.dtype not in _INPUT_DTYPES:
            raise ValueError(f"factor_update_: inputs[{i}] must be fp32, fp64, bf16 or fp16, got {X.dtype}")
        if device is None:
            device = F.device
        if F.device != device or X.device != device:
            raise ValueError(f"factor_update_: factors[{i}] and inputs[{i}] must be on {device}")
    return factors, inputs, decay, scales, append_ones, device


def factor_update_(
    factors: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    decay: float,
    scales: Sequence[float],
    append_ones: Sequence[bool],
    impl: Optional[str] = None,
    *,
    _trusted: bool = False,
) -> None:
    """For every layer i at once: F_i <- decay * F_i + scales[i] * X~_i^T X~_i, in place.

    X~_i = [X_i, 1] when append_ones[i] (the ones column carries the bias; it is never materialised
    on the native paths). decay 0 does not read F_i (as BLAS's beta = 0), so F_i may start
    uninitialised. X_i has shape (n_i, d_i) and F_i shape (d_i + append_ones[i],) * 2; factors
    are fp32 or fp64, inputs fp32, fp64, bf16 or fp16; the product accumulates in fp32 at least.
    """
    if _trusted:
        device = factors[0].device if factors else None
    else:
        factors, inputs, decay, scales, append_ones, device = _check_factor_update_args(
            factors, inputs, decay, scales, append_ones
        )
    if not factors:
        return
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        inputs = [X.unfold() if isinstance(X, ConvPatches) else X for X in inputs]
        reference.factor_update_(factors, inputs, decay, scales, append_ones)
        return
    ns = torch.ops.natgrad if impl == "native" else torch.ops.natgrad_emu
    # Row matrices in one call, convolution patches in another (each one launch on CUDA).
    for conv in (False, True):
        idx = [i for i, X in enumerate(inputs) if isinstance(X, ConvPatches) == conv]
        if not idx:
            continue
        args = ([factors[i] for i in idx], [inputs[i].image if conv else inputs[i] for i in idx])
        rest = (decay, [scales[i] for i in idx], [append_ones[i] for i in idx])
        if conv:
            ns.conv_factor_update_(*args, [g for i in idx for g in inputs[i].geometry()], *rest)
        else:
            ns.factor_update_(*args, *rest)


def _check_eigh_args(mats):
    return _check_square_list("eigh_batched", "mats", mats)


def eigh_batched(mats: Sequence[torch.Tensor], impl: Optional[str] = None, *, _trusted: bool = False):
    """[(eigenvalues ascending, eigenvectors as columns)] of every symmetric matrix, one call for all.

    Like torch.linalg.eigh (only the lower triangle is read). Matrices are float32 or float64, of any
    sizes, on one device. A decomposition that fails or is not finite is redone in float64; one that
    still fails comes back as NaN. Rank-deficient and zero matrices are fine.
    """
    mats = list(mats)
    if _trusted:
        device = mats[0].device if mats else None
    else:
        device = _check_eigh_args(mats)
    if not mats:
        return []
    _refuse_capture("eigh_batched", device)
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        return reference.eigh_batched(mats)
    op = torch.ops.natgrad.eigh_batched if impl == "native" else torch.ops.natgrad_emu.eigh_batched
    evals, evecs = op(mats)
    return list(zip(evals, evecs))


def eigh_lowrank(mats: Sequence[torch.Tensor], ranks: Sequence[int], bases: Optional[Sequence] = None,
                 impl: Optional[str] = None, *, _trusted: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """[(eigenvalues ascending (r,), eigenvectors (n, r))]: the ``ranks[i]`` leading eigenpairs of every
    symmetric positive semi-definite matrix (lower triangle read), one call for all, without a full
    decomposition.

    The reference is exact (the top of ``eigh_batched``). The other backends are the randomized
    Nystrom approximation (Tropp, Yurtsever, Udell and Cevher 2017, with the stabilising shift)
    from a sketch of r + 10 columns: ``bases[i]`` (n, q), the previous eigenvectors, when given
    (warm start), filled up with Gaussian columns of a fixed seed, so that results are a function
    of the inputs. Its cost is one (n, n) x (n, r + 10) product per matrix in float64 (torch's GEMM:
    cuBLAS on a GPU) plus O(n r^2); the small eigendecompositions go through ``eigh_batched`` with
    this ``impl``.
    The approximation F_r = Q diag(d) Q^T satisfies 0 <= F_r <= F, so that
    tr(F) - sum(d) >= 0 bounds every eigenvalue it leaves out: the caller's certificate. A matrix of
    rank <= r is recovered to rounding. Non-finite input gives NaN.
    """
    mats, ranks = list(mats), list(ranks)
    bases = [None] * len(mats) if bases is None else list(bases)
    if _trusted:
        device = mats[0].device if mats else None
    else:
        device = _check_square_list("eigh_lowrank", "mats", mats)
        if len(ranks) != len(mats) or len(bases) != len(mats):
            raise ValueError(f"eigh_lowrank: ranks and bases must have {len(mats)} entries (one per matrix)")
        ranks = [check_number(f"ranks[{i}]", r, low=0, high=M.shape[0], integer=True)
                 for i, (r, M) in enumerate(zip(ranks, mats))]
        for i, (B, M) in enumerate(zip(bases, mats)):
            if B is not None and (not isinstance(B, torch.Tensor) or B.dim() != 2 or B.shape[0] != M.shape[0]
                                  or B.shape[1] > M.shape[0] or B.device != M.device):
                raise ValueError(f"eigh_lowrank: bases[{i}] must be None or an (n, q) tensor with q <= n = "
                                 f"{M.shape[0]} on {M.device}")
    if not mats:
        return []
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        return reference.eigh_lowrank(mats, ranks)
    return _nystrom(mats, ranks, bases, impl)


def _nystrom(mats, ranks, bases, impl) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The randomized Nystrom approximation of ``eigh_lowrank``, in float64: Y = F Omega (the only
    O(n^2) work), then (n, s) and (s, s) matrices. The core
    Omega^T Y is inverted through its eigendecomposition, so that a rank below s (a factor that
    has seen few rows) drops out instead of failing a Cholesky factorisation."""
    parts = []
    for F, r, B in zip(mats, ranks, bases):
        n = F.shape[0]
        s = min(n, r + 10)
        gen = torch.Generator(device=F.device).manual_seed(n)
        omega = torch.randn(n, s, dtype=torch.float64, device=F.device, generator=gen)
        if B is not None and B.shape[1]:
            q = min(B.shape[1], s)
            omega[:, :q] = B[:, B.shape[1] - q:].to(torch.float64)  # the leading ones (ascending order)
        omega = torch.linalg.qr(omega).Q
        # in float64 whatever F's dtype: a float32 sketch's rounding (about s eps sqrt(n) |F| in the
        # trace) would hide the tail the caller's certificate measures
        Fs = F.to(torch.float64).tril()
        Fs += Fs.tril(-1).mT
        Y = Fs @ omega
        # the shift keeps the core positive definite whatever the rounding (Tropp et al., algorithm 3)
        nu = torch.finfo(torch.float64).eps * torch.linalg.matrix_norm(Y)  # the sketch's own precision
        Y = Y + nu * omega
        core = omega.T @ Y
        parts.append((F, r, Y, nu, (core + core.T) / 2))
    # B = Y core^-1/2 (its columns of a core eigenvalue at rounding level dropped), then B's singular pairs
    Bs = []
    for (F, r, Y, nu, _), (m, V) in zip(parts, eigh_batched([p[4] for p in parts], impl=impl, _trusted=True)):
        keep = m > m.max().clamp_min(0) * torch.finfo(torch.float64).eps * m.shape[0]
        Bs.append((Y @ V) * torch.where(keep, m.clamp_min(1e-300).rsqrt(), 0.0))
    out = []
    for (F, r, Y, nu, _), Bm, (w, W) in zip(parts, Bs, eigh_batched([B.T @ B for B in Bs], impl=impl, _trusted=True)):
        sigma = w.clamp_min(0).sqrt()
        U = (Bm @ W) / torch.where(sigma > 0, sigma, 1.0)
        d = (w - nu).clamp_min(0)
        if not bool(torch.isfinite(d).all()):
            out.append((F.new_full((r,), float("nan")), F.new_full((F.shape[0], r), float("nan"))))
            continue
        keep = slice(d.shape[0] - r, d.shape[0])  # ascending: the r largest are last
        d, U = d[keep], U[:, keep]
        # Columns of a zero eigenvalue (rank below r) are noise: orthonormalise, the largest first, so
        # that those span the rest (any orthonormal vectors are eigenvectors of a zero eigenvalue).
        Qr, R = torch.linalg.qr(U.flip(1))
        U = (Qr * torch.where(R.diagonal() < 0, -1.0, 1.0)).flip(1)
        out.append((d.to(F.dtype), U.to(F.dtype)))
    return out


def eigh_refine(mats: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], shifts: Sequence[float],
                tol: float = 0.05, iterations: int = 2, impl: Optional[str] = None, *, _trusted: bool = False
                ) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[(eigenvalues ascending, eigenvectors as columns, certificate)] of every symmetric positive
    semi-definite matrix (lower triangle read), refined from ``bases[i]``, an orthonormal (n, n)
    basis close to its eigenvectors (the previous decomposition of a slowly changing factor),
    instead of decomposed from scratch. One call for all.

    With V the basis and S = V^T F V, the eigenvalues returned are diag(S) and the certificate is
    kappa = || (D + tau)^-1/2 (S - D) (D + tau)^-1/2 ||_F, D = diag(S), tau = ``shifts[i]`` > 0:
    it bounds the relative error of the approximation in the Loewner order,
    (1 - kappa) (V D V^T + tau I) <= F + tau I <= (1 + kappa) (V D V^T + tau I), so the damped
    inverse (F + tau I)^-1 applied to any vector is within kappa / (1 - kappa) of the approximation's,
    in the approximation's norm. A basis is refined while its certificate exceeds ``tol``, at most
    ``iterations`` times: every pair of columns is turned by its Jacobi angle, all pairs at once
    (V <- V (I + E), E skew-symmetric, E_ij the tangent of the angle that diagonalises the 2 x 2 block
    of S), and V is orthonormalised again by a Cholesky QR. Near the eigenvectors this converges
    quadratically. Each iteration is about five (n, n) products and a Cholesky factorisation (torch's
    BLAS, cuBLAS and cuSOLVER on a GPU), against the tridiagonal reduction and back-transformation of a
    full decomposition; it is the same composition on every backend (``impl`` only chooses the
    device checks), and its oracle in the tests is the certificate recomputed in float64.
    ``iterations=0`` only measures the certificate of the basis given. A certificate that is not finite
    (a non-finite matrix, a rounding-negative diagonal below -tau) is infinity.
    """
    mats, bases, shifts = list(mats), list(bases), list(shifts)
    if _trusted:
        device = mats[0].device if mats else None
    else:
        device = _check_square_list("eigh_refine", "mats", mats)
        _check_square_list("eigh_refine", "bases", bases)
        if len(bases) != len(mats) or len(shifts) != len(mats):
            raise ValueError(f"eigh_refine: bases and shifts must have {len(mats)} entries (one per matrix)")
        for i, (B, M) in enumerate(zip(bases, mats)):
            if B.shape != M.shape or B.dtype != M.dtype or B.device != M.device:
                raise ValueError(f"eigh_refine: bases[{i}] must have mats[{i}]'s shape, dtype and device "
                                 f"({tuple(M.shape)}, {M.dtype}, {M.device}), got {tuple(B.shape)}, {B.dtype}, "
                                 f"{B.device}")
        shifts = [check_number(f"shifts[{i}]", s, low=0.0, low_open=True) for i, s in enumerate(shifts)]
        tol = check_number("tol", tol, low=0.0)
        iterations = check_number("iterations", iterations, low=0, integer=True)
    if not mats:
        return []
    _resolve_impl(impl, device)
    return _refine(mats, bases, shifts, tol, iterations)


def _refine(mats, bases, shifts, tol, iterations) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``eigh_refine``'s iteration, all matrices together (one host synchronisation per iteration)."""
    sym = []
    for F in mats:
        L = F.tril()
        sym.append(L + L.tril(-1).mT)
    V = [B.clone() for B in bases]
    S = [None] * len(mats)
    kappa = [None] * len(mats)
    todo = list(range(len(mats)))
    for it in range(iterations + 1):
        for i in todo:
            P = V[i].mT @ (sym[i] @ V[i])
            S[i] = (P + P.mT) / 2
            kappa[i] = _refine_certificate(S[i], shifts[i])
        if it == iterations or not todo:
            break
        over = torch.stack([kappa[i] > tol for i in todo]).tolist()  # one host sync per iteration
        todo = [i for i, o in zip(todo, over) if o]
        for i in todo:
            V[i] = _jacobi_step(V[i], S[i])
    out = []
    for i in range(len(mats)):
        d = S[i].diagonal()
        order = torch.argsort(d)
        out.append((d[order], V[i][:, order], kappa[i]))
    return out


def _refine_certificate(S: torch.Tensor, tau: float) -> torch.Tensor:
    """|| (D + tau)^-1/2 (S - D) (D + tau)^-1/2 ||_F in float64, D = diag(S); infinity when D + tau has
    an entry <= 0 or S is not finite."""
    S = S.to(torch.float64)
    w = S.diagonal() + tau
    scale = w.clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
    K = S * scale[:, None] * scale[None, :]
    K.diagonal().zero_()
    k = torch.linalg.matrix_norm(K)
    bad = (w <= 0).any() | ~torch.isfinite(k)
    return torch.where(bad, torch.full_like(k, float("inf")), k)


def _jacobi_step(V: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """V (I + E), E_ij (i < j) the tangent of the Jacobi angle of S's (i, j) block (|E_ij| <= 1),
    E_ji = -E_ij, orthonormalised by a Cholesky QR. I + E with E skew-symmetric has every singular value
    >= 1, so the factorisation cannot fail on a finite S."""
    d = S.diagonal()
    half = (d[None, :] - d[:, None]) / 2
    root = torch.sqrt(half * half + S * S)
    t = S / (half + torch.where(half >= 0, root, -root))  # the smaller root of t^2 + 2 t half / S - 1 = 0
    E = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).triu(1)  # 0 / 0: a zero entry needs no turn
    X = V + V @ (E - E.mT)
    L = torch.linalg.cholesky(X.mT @ X)
    return torch.linalg.solve_triangular(L, X.mT, upper=False).mT


def _check_square_list(op: str, name: str, mats) -> Optional[torch.device]:
    """float32/float64 square matrices on one device, none requiring grad; their device."""
    _refuse_autograd(op, **{name: mats})
    device = None
    for i, M in enumerate(mats):
        if not isinstance(M, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(M).__name__}")
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"{op}: {name}[{i}] must be a square matrix, got shape {tuple(M.shape)}")
        if M.dtype not in _FACTOR_DTYPES:
            raise ValueError(f"{op}: {name}[{i}] must be float32 or float64, got {M.dtype}")
        device = M.device if device is None else device
        if M.device != device:
            raise ValueError(f"{op}: {name}[{i}] is on {M.device}, {name}[0] on {device}")
    return device


def damped_inverse(mats: Sequence[torch.Tensor], shifts: Sequence[float], impl: Optional[str] = None, *,
                   _trusted: bool = False) -> List[torch.Tensor]:
    """(F_i + shifts[i] I)^-1 of every symmetric positive semi-definite matrix by Cholesky, one call for
    all (only the lower triangle is read; the result is symmetric, in F_i's dtype).

    Shifts are finite and > 0. A factorisation that fails (rounding can make a factor with a tiny
    shift indefinite) or gives a non-finite inverse is redone in float64; one that still fails comes
    back as NaN, for the caller to fall back on an eigendecomposition.
    """
    mats, shifts = list(mats), list(shifts)
    if _trusted:
        device = mats[0].device if mats else None
    else:
        if len(shifts) != len(mats):
            raise ValueError(f"damped_inverse: shifts has {len(shifts)} entries but mats has {len(mats)}")
        shifts = [check_number(f"shifts[{i}]", s, low=0.0, low_open=True) for i, s in enumerate(shifts)]
        device = _check_square_list("damped_inverse", "mats", mats)
    if not mats:
        return []
    _refuse_capture("damped_inverse", device)
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        return reference.damped_inverse(mats, shifts)
    op = torch.ops.natgrad.damped_inverse if impl == "native" else torch.ops.natgrad_emu.damped_inverse
    return list(op(mats, [float(s) for s in shifts]))


def kron_matmul(grads, IA, IG, impl: Optional[str] = None, *, _trusted: bool = False) -> List[torch.Tensor]:
    """IG_i M_i IA_i for every layer's (out, in) matrix M_i = grads[i] at once: the Kronecker product
    IG (x) IA applied to it, two GEMMs per layer (the factored damping's preconditioning with the
    explicit inverses of ``damped_inverse``). IA (in, in) and IG (out, out) share one dtype, float32
    or float64, which sets the accumulation dtype; the results are in the gradients' dtypes."""
    grads, IA, IG = list(grads), list(IA), list(IG)
    if _trusted:
        device = grads[0].device if grads else None
    else:
        device = _check_kron_matmul_args(grads, IA, IG)
    if not grads:
        return []
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        return reference.kron_matmul(grads, IA, IG)
    op = torch.ops.natgrad.kron_matmul if impl == "native" else torch.ops.natgrad_emu.kron_matmul
    return list(op(grads, IA, IG))


def _check_layer_lists(op: str, grads, named: dict) -> Optional[torch.device]:
    """The checks every per-layer op shares: one entry per layer in each list of ``named``, tensors
    only, (out, in) gradients of an input dtype, each layer's tensors on the first one's device, none
    requiring grad; that device."""
    n = len(grads)
    for name, seq in named.items():
        if len(seq) != n:
            raise ValueError(f"{op}: {name} has {len(seq)} entries but grads has {n}")
    device = None
    for i, M in enumerate(grads):
        layer = {"grads": M, **{name: seq[i] for name, seq in named.items()}}
        for name, t in layer.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
        if M.dim() != 2:
            raise ValueError(f"{op}: grads[{i}] must be 2-D (out, in), got shape {tuple(M.shape)}")
        if M.dtype not in _INPUT_DTYPES:
            raise ValueError(f"{op}: grads[{i}] must be fp32, fp64, bf16 or fp16, got {M.dtype}")
        device = M.device if device is None else device
        if any(t.device != device for t in layer.values()):
            raise ValueError(f"{op}: the tensors of layer {i} must all be on {device}")
    _refuse_autograd(op, grads=grads, **named)
    return device


def _check_kron_matmul_args(grads, IA, IG):
    device = _check_layer_lists("kron_matmul", grads, {"IA": IA, "IG": IG})
    for i, (M, ia, ig) in enumerate(zip(grads, IA, IG)):
        o, k = M.shape
        if tuple(ia.shape) != (k, k) or tuple(ig.shape) != (o, o):
            raise ValueError(f"kron_matmul: IA[{i}] must be {(k, k)} and IG[{i}] {(o, o)} for grads[{i}] of shape "
                             f"{(o, k)}, got {tuple(ia.shape)} and {tuple(ig.shape)}")
        if ia.dtype not in _FACTOR_DTYPES or ig.dtype != ia.dtype:
            raise ValueError(f"kron_matmul: IA[{i}] and IG[{i}] must share one dtype, float32 or float64")
    return device


def _check_precondition_args(grads, QA, dA, QG, dG, damping, inverse):
    device = _check_layer_lists("precondition", grads, {"QA": QA, "dA": dA, "QG": QG, "dG": dG})
    damping = check_number("damping", damping, low=0.0, low_open=True)
    if inverse not in reference.INVERSES:
        raise ValueError(f"inverse must be one of {reference.INVERSES}, got {inverse!r}")
    for i, M in enumerate(grads):
        o, k = M.shape
        for q, d, ev, Q, n in (("QA", "dA", dA[i], QA[i], k), ("QG", "dG", dG[i], QG[i], o)):  # (n, r), r <= n: low rank
            if Q.dim() != 2 or Q.shape[0] != n or Q.shape[1] > n or ev.shape != (Q.shape[1],):
                raise ValueError(f"precondition: {q}[{i}] must have shape ({n}, r) with r <= {n} and {d}[{i}] shape "
                                 f"(r,) for grads[{i}] of shape {(o, k)}, got {tuple(Q.shape)} and {tuple(ev.shape)}")
        if QA[i].dtype not in _FACTOR_DTYPES or any(t.dtype != QA[i].dtype for t in (dA[i], QG[i], dG[i])):
            raise ValueError(f"precondition: QA[{i}], dA[{i}], QG[{i}], dG[{i}] must share one dtype, float32 or "
                             "float64")
    return device, damping


def precondition(grads, QA, dA, QG, dG, damping: float, inverse: str = "eigen", impl: Optional[str] = None, *,
                 _trusted: bool = False):
    """For every layer i at once, the damped inverse of G_i (x) A_i applied to the (out, in) matrix
    grads[i], from the eigendecompositions A = QA diag(dA) QA^T, G = QG diag(dG) QG^T:
    QG [(QG^T M QA) / D] QA^T with D = dG dA^T + damping (inverse="eigen": exact damping) or
    D = (dG + sqrt(damping)/pi)(dA + pi sqrt(damping))^T with pi = sqrt(mean dA / mean dG)
    (inverse="factored": Tikhonov damping split between the factors). Returns new tensors in the
    gradients' dtypes; QA, dA, QG, dG are float32 or float64 and set the accumulation dtype.

    Low rank: QA (in, r) with r < in (or QG (out, r)) holds the leading eigenpairs of a factor whose
    other eigenvalues are zero (``eigh_lowrank``); the result is that factor's exact damped inverse
    (``reference.precondition`` gives the formulas).
    """
    grads, QA, dA, QG, dG = (list(x) for x in (grads, QA, dA, QG, dG))
    n = len(grads)
    if _trusted:
        device = grads[0].device if grads else None
    else:
        device, damping = _check_precondition_args(grads, QA, dA, QG, dG, damping, inverse)
    if n == 0:
        return []
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        return reference.precondition(grads, QA, dA, QG, dG, damping, inverse)
    op = torch.ops.natgrad.precondition if impl == "native" else torch.ops.natgrad_emu.precondition
    return list(op(grads, QA, dA, QG, dG, damping, inverse == "factored"))


def _check_ekfac_precondition_args(grads, QA, QG, S, damping):
    device = _check_layer_lists("ekfac_precondition", grads, {"QA": QA, "QG": QG, "S": S})
    damping = check_number("damping", damping, low=0.0, low_open=True)
    for i, M in enumerate(grads):
        o, k = M.shape
        for q, Q, d in (("QA", QA[i], k), ("QG", QG[i], o)):  # the scaling S covers the whole rotated space: no low rank
            if tuple(Q.shape) != (d, d):
                raise ValueError(f"ekfac_precondition: {q}[{i}] must be a full ({d}, {d}) eigenbasis for grads[{i}] "
                                 f"of shape {(o, k)} (low-rank bases are not supported), got {tuple(Q.shape)}")
        if tuple(S[i].shape) != (o, k):
            raise ValueError(f"ekfac_precondition: S[{i}] must have grads[{i}]'s shape {(o, k)}, got "
                             f"{tuple(S[i].shape)}")
        if QA[i].dtype not in _FACTOR_DTYPES or any(t.dtype != QA[i].dtype for t in (QG[i], S[i])):
            raise ValueError(f"ekfac_precondition: QA[{i}], QG[{i}] and S[{i}] must share one dtype, float32 or "
                             f"float64, got {QA[i].dtype}, {QG[i].dtype} and {S[i].dtype}")
    return device, damping


def ekfac_precondition(grads, QA, QG, S, damping: float, impl: Optional[str] = None, *,
                       _trusted: bool = False) -> List[torch.Tensor]:
    """EKFAC (George et al. 2018) for every layer i at once: the (out, in) matrix M = grads[i] rescaled
    in the eigenbases of the Kronecker factors, QG [(QG^T M QA) / (S + damping)] QA^T (elementwise
    division). QA (in, in) and QG (out, out) are full orthonormal eigenbases; S (out, in), of any
    strides, holds the scaling of every eigendirection (entries >= 0, e.g. running second moments of
    QG^T M QA). QA, QG, S share one dtype, float32 or float64, which sets the accumulation dtype;
    damping is finite and > 0. Returns new tensors in the gradients' dtypes.
    """
    grads, QA, QG, S = (list(x) for x in (grads, QA, QG, S))
    if _trusted:
        device = grads[0].device if grads else None
    else:
        device, damping = _check_ekfac_precondition_args(grads, QA, QG, S, damping)
    if not grads:
        return []
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        return reference.ekfac_precondition(grads, QA, QG, S, damping)
    op = torch.ops.natgrad.ekfac_precondition if impl == "native" else torch.ops.natgrad_emu.ekfac_precondition
    return list(op(grads, QA, QG, S, float(damping)))


def _check_kfac_update_args(params, directions, grads, momentum_buffers, clipped, lr, momentum, weight_decay,
                            kl_clip):
    n = len(params)
    for name, seq in (("directions", directions), ("grads", grads), ("clipped", clipped)):
        if len(seq) != n:
            raise ValueError(f"kfac_update_: {name} has {len(seq)} entries but params has {n}")
    lr = check_number("lr", lr, low=0.0)
    momentum = check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
    weight_decay = check_number("weight_decay", weight_decay, low=0.0)
    kl_clip = check_number("kl_clip", kl_clip, low=0.0)
    clipped = [check_bool(f"clipped[{i}]", c) for i, c in enumerate(clipped)]
    if momentum_buffers and len(momentum_buffers) != n:
        raise ValueError(f"kfac_update_: momentum_buffers has {len(momentum_buffers)} entries but params has {n}")
    if not momentum_buffers and momentum != 0:
        raise ValueError("kfac_update_: momentum != 0 needs momentum_buffers")
    device = None
    for i, p in enumerate(params):
        group = [("params", p), ("directions", directions[i]), ("grads", grads[i])]
        if momentum_buffers:
            group.append(("momentum_buffers", momentum_buffers[i]))
        for name, t in group:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"kfac_update_: {name}[{i}] must be a tensor, got {type(t).__name__}")
            if t.shape != p.shape or t.dtype != p.dtype:
                raise ValueError(f"kfac_update_: {name}[{i}] must have params[{i}]'s shape {tuple(p.shape)} and dtype "
                                 f"{p.dtype}, got {tuple(t.shape)} and {t.dtype}")
        if p.dtype not in _INPUT_DTYPES:
            raise ValueError(f"kfac_update_: params[{i}] must be fp32, fp64, bf16 or fp16, got {p.dtype}")
        if not p.is_contiguous() or (momentum_buffers and not momentum_buffers[i].is_contiguous()):
            raise ValueError(f"kfac_update_: params[{i}] and momentum_buffers[{i}] must be contiguous (they are "
                             "updated in place)")
        device = p.device if device is None else device
        if any(t.device != device for _, t in group):
            raise ValueError(f"kfac_update_: the tensors of parameter {i} must all be on {device}")
    _refuse_autograd("kfac_update_", params=params, directions=directions, grads=grads,
                     momentum_buffers=momentum_buffers)
    return lr, momentum, weight_decay, kl_clip, clipped, device


def kfac_update_(params, directions, grads, momentum_buffers, clipped, lr: float, momentum: float,
                 weight_decay: float, kl_clip: float, impl: Optional[str] = None, *,
                 _trusted: bool = False) -> torch.Tensor:
    """The end of a K-FAC step for every parameter in one call (two launches on CUDA), in place:
    nu = min(1, sqrt(kl_clip / (lr^2 sum over clipped i of <directions_i, grads_i>))) (1 when
    kl_clip <= 0), then as torch.optim.SGD: d = directions_i (* nu if clipped_i) + weight_decay p_i,
    buf_i = momentum buf_i + d, p_i -= lr buf_i (p_i -= lr d without buffers: pass [] for
    momentum_buffers when momentum is 0). Buffers start at zero. Returns nu, a 0-d float64 tensor
    on the parameters' device (no host synchronisation)."""
    params, directions, grads, momentum_buffers = (list(x) for x in (params, directions, grads, momentum_buffers))
    clipped = list(clipped)
    n = len(params)
    if _trusted:
        device = params[0].device if params else None
    else:
        lr, momentum, weight_decay, kl_clip, clipped, device = _check_kfac_update_args(
            params, directions, grads, momentum_buffers, clipped, lr, momentum, weight_decay, kl_clip)
    if n == 0:
        return torch.ones((), dtype=torch.float64)
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        return reference.kfac_update_(params, directions, grads, momentum_buffers, clipped, lr, momentum,
                                      weight_decay, kl_clip)
    directions = [d.contiguous() for d in directions]
    grads = [g.contiguous() for g in grads]
    op = torch.ops.natgrad.kfac_update_ if impl == "native" else torch.ops.natgrad_emu.kfac_update_
    return op(params, directions, grads, momentum_buffers, clipped, lr, momentum, weight_decay, kl_clip)


if _ext.loaded():

    @torch.library.register_fake("natgrad::factor_update_")
    def _factor_update_fake(factors, inputs, decay, scales, append_ones):
        return None

    @torch.library.register_fake("natgrad_emu::factor_update_")
    def _factor_update_emu_fake(factors, inputs, decay, scales, append_ones):
        return None

    def _eigh_batched_fake(mats):
        # eigenvectors column-major, as LAPACK, cuSOLVER and torch.linalg.eigh give them
        return ([M.new_empty(M.shape[:1]) for M in mats],
                [M.new_empty_strided(M.shape, (1, max(M.shape[0], 1))) for M in mats])

    torch.library.register_fake("natgrad::eigh_batched")(_eigh_batched_fake)
    torch.library.register_fake("natgrad_emu::eigh_batched")(_eigh_batched_fake)

    def _precondition_fake(grads, QA, dA, QG, dG, damping, factored):
        return [M.new_empty(M.shape) for M in grads]

    torch.library.register_fake("natgrad::precondition")(_precondition_fake)
    torch.library.register_fake("natgrad_emu::precondition")(_precondition_fake)

    def _ekfac_precondition_fake(grads, QA, QG, S, damping):
        return [M.new_empty(M.shape) for M in grads]

    torch.library.register_fake("natgrad::ekfac_precondition")(_ekfac_precondition_fake)
    torch.library.register_fake("natgrad_emu::ekfac_precondition")(_ekfac_precondition_fake)

    def _damped_inverse_fake(mats, shifts):
        return [M.new_empty(M.shape) for M in mats]

    torch.library.register_fake("natgrad::damped_inverse")(_damped_inverse_fake)
    torch.library.register_fake("natgrad_emu::damped_inverse")(_damped_inverse_fake)

    def _kron_matmul_fake(grads, IA, IG):
        return [M.new_empty(M.shape) for M in grads]

    torch.library.register_fake("natgrad::kron_matmul")(_kron_matmul_fake)
    torch.library.register_fake("natgrad_emu::kron_matmul")(_kron_matmul_fake)

    def _kfac_update_fake(params, directions, grads, momentum_buffers, clipped, lr, momentum, weight_decay, kl_clip):
        return params[0].new_empty((), dtype=torch.float64) if params else torch.empty((), dtype=torch.float64)

    torch.library.register_fake("natgrad::kfac_update_")(_kfac_update_fake)
    torch.library.register_fake("natgrad_emu::kfac_update_")(_kfac_update_fake)

    def _conv_factor_update_fake(factors, images, geometry, decay, scales, append_ones):
        return None

    torch.library.register_fake("natgrad::conv_factor_update_")(_conv_factor_update_fake)
    torch.library.register_fake("natgrad_emu::conv_factor_update_")(_conv_factor_update_fake)
