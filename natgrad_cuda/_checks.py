"""What the user is told: scalar argument checks shared by the ops and the optimizers (one rule,
one wording), warnings attributed to the user's own line, and the refusal to copy an optimizer.

A number may be a Python int or float, a NumPy scalar or a 0-d tensor (as torch.optim accepts); it
comes back as a Python float (or int). A value of the wrong kind raises TypeError, one out of range
ValueError; both name the argument.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import Optional

import torch

__all__ = ["check_number", "check_bool", "warn_user", "refuse_copy"]

_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def warn_user(message: str, category=RuntimeWarning) -> None:
    """A warning attributed to the first caller outside natgrad_cuda and torch (the user's
    ``opt.step()``), however many wrappers (no_grad, torch.optim's hooks, GradScaler) lie between."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level - 1 if frame is None else level)


def refuse_copy(obj, *args):
    """``__deepcopy__``, ``__copy__`` and pickling of an object bound to its model by hooks."""
    raise TypeError(
        f"{type(obj).__name__} cannot be copied or pickled: it is bound to its model through hooks. Save "
        "opt.state_dict() and load it into an optimizer built for the (copied) model")


def _as_python_number(value):
    """value as a Python int or float, or None when it is not a real number (bools are not)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value)


def check_number(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 allow_none: bool = False):
    """Validate one scalar argument and return it as a Python number (None passes when allowed)."""
    if value is None and allow_none:
        return None
    number = value if type(value) in (float, int) else _as_python_number(value)  # the usual case, fast
    if number is None:
        kind = "an int" if integer else "a real number"
        raise TypeError(f"{name} must be {kind}{' or None' if allow_none else ''}, got {value!r}")
    if integer:
        if not isinstance(number, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    elif not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (number > high or (high_open and number == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return float(number) if not integer else number


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value
