"""Random numbers for samfunc: replaying a pass's draws, and draws from a key in state.

Two needs, one module:

* ``reuse_rng``: the pass at ``w + e`` can replay the random draws (dropout
  masks) of the pass at ``w``. ``capture`` notes the global generators' states
  and ``replayed`` runs a function on them again.
* Methods with randomness of their own (ESAM's choice of leaves) keep an
  explicit key and step count in their state, so a run is reproducible, can be
  saved and resumed bitwise, and compiles: ``uniform(key, step, n)`` is a pure
  function of its inputs, a counter-based hash computed with integer tensor ops
  (no ``torch.Generator``, which ``torch.compile`` cannot carry in a state).

Examples:
    >>> import torch
    >>> u = uniform(torch.tensor(0), torch.tensor(3), 4)
    >>> bool(((u >= 0) & (u < 1)).all())
    True
    >>> torch.equal(u, uniform(torch.tensor(0), torch.tensor(3), 4))
    True
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["RNG_LOCK", "RngStates", "capture", "replayed", "uniform"]

T = TypeVar("T")

# reuse_rng replays the global generator's state between the two passes; a
# second thread drawing from it in between would change the masks. Calls that
# reuse the RNG hold this lock from the first draw to the replay.
RNG_LOCK = threading.RLock()

#: The CUDA devices whose generators were captured, and the generators' states.
RngStates = tuple[list[int], tuple[torch.Tensor, list[torch.Tensor]]]

_MASK32 = 0xFFFFFFFF


def capture(tensors: list[torch.Tensor]) -> RngStates:
    """The states, now, of the generators that ``tensors``' devices draw from."""
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return devices, (torch.get_rng_state(), cuda)


def replayed(states: RngStates, fn: Callable[[], T]) -> T:
    """``fn()`` run on the random draws captured in ``states``.

    The generators are left where they were before the call (``fork_rng``).
    """
    devices, (cpu, cuda) = states
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for device, state in zip(devices, cuda):
            torch.cuda.set_rng_state(state, device)
        return fn()


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for ``x < 2**32`` in int64, without overflowing."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(key: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` float64 draws in ``[0, 1)``, a pure function of ``(key, step)``.

    Each draw hashes the key, the step and its own index together, so draws of
    different steps, keys or indices are independent for all practical
    purposes (32 bits each). The same inputs give the same numbers on every
    device, eagerly or compiled.

    Args:
        key: an integer 0-d tensor (the seed).
        step: an integer 0-d tensor (a counter in the caller's state).
        n: how many draws.

    Examples:
        >>> import torch
        >>> uniform(torch.tensor(7), torch.tensor(0), 2).shape
        torch.Size([2])
    """
    index = torch.arange(n, dtype=torch.int64, device=step.device)
    x = _mix32((key.to(torch.int64) & _MASK32) ^ 0x9E3779B9)
    x = _mix32(x ^ (step.to(torch.int64) & _MASK32))
    x = _mix32(x ^ index)
    return x.to(torch.float64) / float(2**32)
