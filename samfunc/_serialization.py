"""Every state samfunc defines loads with plain ``torch.load`` (``weights_only=True``).

Since torch 2.6, ``torch.load`` unpickles only allow-listed types by default.
samfunc's states are NamedTuples of tensors; importing samfunc adds them to
the allow-list (``torch.serialization.add_safe_globals``), so a checkpoint of
a ``TrainState`` or an optimizer state loads without ``weights_only=False``.

Examples:
    >>> import io, torch, samfunc
    >>> state = samfunc.sgd(0.1, momentum=0.9).init({"w": torch.zeros(2)})
    >>> buffer = io.BytesIO()
    >>> torch.save(state, buffer)
    >>> _ = buffer.seek(0)
    >>> type(torch.load(buffer)[0]).__name__
    'TraceState'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["register_safe_globals"]


def register_safe_globals(types: Sequence[type]) -> None:
    """Allow-lists ``types`` for ``torch.load(weights_only=True)`` (torch >= 2.4)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(list(types))
