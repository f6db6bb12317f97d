"""Hyperparameter checks, run once when a transform is built.

Each check raises ``ValueError`` (or ``TypeError``) naming the argument and
the value it got, e.g. ``ValueError("rho must be >= 0, got -0.1")``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "check_number",
    "check_nonnegative",
    "check_positive",
    "check_in_interval",
    "check_positive_int",
    "check_rho",
]


def check_number(name: str, value: Any) -> float:
    """Returns ``value`` as a float; raises if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    # Comparisons rather than math.isfinite: under torch.compile a float can be
    # symbolic, and comparisons on it are traceable.
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return value if torch.compiler.is_compiling() else float(value)


def check_nonnegative(name: str, value: Any) -> float:
    """Checks ``value >= 0``."""
    number = check_number(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return number


def check_positive(name: str, value: Any) -> float:
    """Checks ``value > 0``."""
    number = check_number(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return number


def check_in_interval(name: str, value: Any, low: float, high: float) -> float:
    """Checks ``low <= value < high``."""
    number = check_number(name, value)
    if not low <= number < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return number


def check_positive_int(name: str, value: Any) -> int:
    """Checks that ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_rho(value: Any, name: str = "rho") -> float | torch.Tensor:
    """Checks a perturbation radius: a finite float >= 0 or a floating 0-d tensor.

    A tensor's value is not read (that would synchronize with the device and
    break ``torch.compile`` graphs); only its shape and dtype are checked.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a float or a floating-point 0-d tensor, "
                f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        return value
    return check_nonnegative(name, value)
