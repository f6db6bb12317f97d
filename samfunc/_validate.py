"""Hyperparameter checks, run once when a transform is built.

Each check raises ``ValueError`` (or ``TypeError``) naming the argument and
the value it got, e.g. ``ValueError("rho must be >= 0, got -0.1")``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "check_bool",
    "check_number",
    "check_nonnegative",
    "check_positive",
    "check_in_interval",
    "check_positive_int",
    "check_fraction",
    "check_rho",
    "guard_radius",
]


def _shown(value: Any) -> str:
    """``value`` for an error message, except inside ``torch.compile``.

    A float that the compiler made symbolic cannot be formatted there.
    """
    return "a value outside that range" if torch.compiler.is_compiling() else repr(value)


def check_bool(name: str, value: Any) -> bool:
    """Returns ``value`` if it is a bool; a truthy string such as ``"False"`` is an error.

    Examples:
        >>> check_bool("adaptive", True)
        True
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_number(name: str, value: Any) -> float:
    """Returns ``value`` as a float; raises if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    # Comparisons rather than math.isfinite: under torch.compile a float can be
    # symbolic, and comparisons on it are traceable. (A symbolic +inf compares
    # equal to nothing in torch 2.13; the tensor guard in check_rho covers rho.)
    if value != value or value - value != 0:
        raise ValueError(f"{name} must be finite, got {_shown(value)}")
    return value if torch.compiler.is_compiling() else float(value)


def check_nonnegative(name: str, value: Any) -> float:
    """Checks ``value >= 0``."""
    number = check_number(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {_shown(value)}")
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


def check_fraction(name: str, value: Any) -> float:
    """Checks ``0 < value <= 1`` (a probability or a share of something).

    Examples:
        >>> check_fraction("beta", 0.5)
        0.5
    """
    number = check_number(name, value)
    if not 0.0 < number <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {_shown(value)}")
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

    A tensor is read and checked like a float where the method is built, on
    any device (one read, when built, never per step), so the same rho is
    refused on the CPU and on a GPU, before a step is compiled. Only a method
    built inside a function that ``torch.compile`` traces cannot read it: there
    a negative or non-finite value becomes NaN instead (the step's gradient is
    NaN and the non-finite policy, ``nonfinite=``, catches it), as it does at
    every step for a tensor changed in place later, rather than a negative
    radius silently descending.

    Examples:
        >>> check_rho(0.05)
        0.05
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a float or a floating-point 0-d tensor, "
                f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        if not torch.compiler.is_compiling():
            check_nonnegative(name, float(value.detach()))
        return value  # scale_by_radius guards it (guard_radius) at every step
    return check_nonnegative(name, value)


def guard_radius(value: torch.Tensor) -> torch.Tensor:
    """``value`` where it is finite and >= 0, NaN elsewhere; no device sync.

    Examples:
        >>> guard_radius(torch.tensor(-0.5))
        tensor(nan)
    """
    usable = torch.isfinite(value) & (value >= 0)
    return torch.where(usable, value, torch.full_like(value, math.nan))
