"""``samfunc.SAM``'s two-step API: ``first_step`` moves to ``w + e``, ``second_step`` descends.

The seed's pattern, for a loop that runs its own backward passes::

    loss_fn(model(x), y).backward()        # first pass, at w
    optimizer.first_step(zero_grad=True)   # the ascent phase: w -> w + e
    loss_fn(model(x), y).backward()        # second pass, at w + e
    optimizer.second_step(zero_grad=True)  # back to w; the combine phase; the base step

Each half runs the interpreter's phases (``ascend``, then ``combine`` and
``advance``) on the gradients the passes left in ``.grad``; between them
BatchNorm's running statistics are held at the first pass's.

Examples:
    >>> import torch
    >>> import samfunc
    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> opt = samfunc.SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
    >>> (w**2).sum().backward()
    >>> first_step(opt, True, None)
    >>> w.detach()
    tensor([3.3000, 4.4000])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch

from . import _tree
from ._base import Pieces
from ._closure import Moved, grads_of, write_grads
from ._finite import raise_if_nonfinite
from ._groups import Leaves
from ._options import FIRST_PASS, SECOND_PASS
from ._phases import advance, ascend, check_method_state, combine, is_whole
from ._schedule import group_learning_rates

if TYPE_CHECKING:
    from ._stateful import SAM

__all__ = ["Perturbed", "first_step", "second_step"]


class Perturbed(NamedTuple):
    """What ``first_step`` leaves for ``second_step``."""

    pieces: Pieces
    state: Any
    first_grads: Optional[list[torch.Tensor]]
    ascent_state: Any
    leaves: Leaves


def first_step(opt: SAM, zero_grad: bool, scaler: Optional[torch.amp.GradScaler]) -> None:
    """The ascent phase on ``.grad``, and the parameters moved to ``w + e``."""
    if opt._perturbed is not None or opt._skip_second:
        raise RuntimeError("first_step called twice without second_step in between")
    leaves = opt._leaves()
    pieces = _two_step_pieces(opt, leaves, "first_step")
    if scaler is not None and pieces.combiner.reads_first_gradient:
        raise ValueError(
            f"{pieces.name} mixes the gradients at w and at w + e, which a GradScaler "
            "scales differently; for float16, use make_train_step(..., "
            "loss_scale=samfunc.dynamic_loss_scale()), or bfloat16 autocast"
        )
    opt._watch.reset()
    if scaler is not None:
        scaler.unscale_(opt)
    grads = grads_of(leaves.params)
    if not _finite_or_skip(opt, leaves.tree(grads), FIRST_PASS, scaled=scaler is not None):
        opt._skip_second = True
    else:
        with group_learning_rates(opt.param_groups):
            _perturb(opt, pieces, leaves, grads)
    if zero_grad:
        opt.zero_grad()


def second_step(opt: SAM, zero_grad: bool, scaler: Optional[torch.amp.GradScaler]) -> None:
    """Back to ``w``; the combine phase and the base optimizer's step (unless skipped)."""
    if opt._perturbed is None and not opt._skip_second:
        raise RuntimeError(
            "second_step called without first_step: call first_step() after the first "
            "backward pass (or use step(closure), which runs both)"
        )
    opt.restore()
    perturbed, opt._perturbed = opt._perturbed, None
    skipped, opt._skip_second = opt._skip_second, False
    opt._watch.reset()
    if not skipped and perturbed is not None:
        _descend(opt, perturbed, scaler)
    # torch.optim.lr_scheduler wraps SAM.step to note that the optimizer
    # stepped; the two-step API goes around it, so note it here.
    opt._opt_called = True
    if zero_grad:
        opt.zero_grad()


def _two_step_pieces(opt: SAM, leaves: Leaves, action: str) -> Pieces:
    pieces = opt._pieces(leaves)
    if pieces.policy is not None or pieces.ascent is None or is_whole(pieces):
        raise RuntimeError(
            f"{pieces.name} chooses its passes itself (a step policy, one pass per step, or "
            f"its own grad), which {action} cannot tell you: use step(closure), which runs "
            "the closure once or twice as it chooses"
        )
    return pieces


def _finite_or_skip(opt: SAM, grads: dict[str, torch.Tensor], where: str, scaled: bool) -> bool:
    """Applies the non-finite policy to one gradient; returns whether to go on."""
    if opt.nonfinite == "propagate" and not scaled:
        return True
    if not grads or _tree.norm_is_finite(grads):
        return True
    if opt.nonfinite == "raise" and not scaled:
        raise_if_nonfinite(grads, where)
    opt.skipped_steps += 1
    return False


def _perturb(opt: SAM, pieces: Pieces, leaves: Leaves, grads: list[torch.Tensor]) -> None:
    state = opt._state(pieces, leaves)
    check_method_state(pieces, state)
    e, ascent_state = ascend(pieces, leaves.tree(grads), state, leaves.tree(leaves.params))
    first = [g.clone() for g in grads] if pieces.combiner.reads_first_gradient else None
    opt._moved = Moved(leaves.params, opt._storage)
    opt._moved.move_to(_tree.add_leaves(leaves.params, _tree.leaves(e)))
    opt._perturbed = Perturbed(pieces, state, first, ascent_state, leaves)
    opt._guard.start()


def _descend(opt: SAM, perturbed: Perturbed, scaler: Optional[torch.amp.GradScaler]) -> None:
    """The combine phase and the base optimizer's step, if the gradients are usable."""
    leaves = perturbed.leaves
    had = [p.grad is not None for p in leaves.params]
    second = grads_of(leaves.params)
    if scaler is None and not _finite_or_skip(opt, leaves.tree(second), SECOND_PASS, False):
        return
    first = perturbed.first_grads if perturbed.first_grads is not None else second
    state = perturbed.state
    params = leaves.tree(leaves.params)
    out, combine_state = combine(
        perturbed.pieces, leaves.tree(first), leaves.tree(second), state, params
    )
    write_grads(leaves.params, _tree.leaves(out), had)
    new_state = advance(state._replace(ascent=perturbed.ascent_state, combine=combine_state), True)
    if scaler is not None:
        scaler.step(opt.base_optimizer)
        if _tree.norm_is_finite(leaves.tree(second)):
            opt._commit(new_state)
        else:
            opt.skipped_steps += 1  # scaler.step skipped it
        return
    opt.base_optimizer.step()
    opt._commit(new_state)
