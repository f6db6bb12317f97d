"""The passes of a ``samfunc.SAM`` step: a closure evaluated with the parameters moved to a point.

``samfunc.SAM.step(closure)`` hands the interpreter (``samfunc._engine.run_step``)
a ``ClosurePasses`` where the functional drivers hand it ``LossPasses``: the
gradient at a point is the closure's backward pass with the parameters
temporarily at that point, read from ``.grad``. So the class runs every
method through the same phases as ``method.grad`` and the train steps.

Examples:
    >>> import torch
    >>> import samfunc
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> opt = samfunc.SAM([w], torch.optim.SGD, lr=0.1)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = (w**2).sum()
    ...     loss.backward()
    ...     return loss
    >>> float(opt.step(closure))
    5.0
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from . import _rng, _tree
from ._module import RunningStatsGuard
from ._options import RunOptions
from ._passes import Pass
from ._tree import PyTree
from .integrations import lightning

__all__ = ["ClosurePasses", "Moved", "grads_of", "write_grads"]


def grads_of(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's ``.grad``, zeros where it has none (what a method sees)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for index, grad in enumerate(grads):
        if grad.layout != torch.strided:
            raise TypeError(
                f"SAM needs dense gradients; parameter {index} of this optimizer has a "
                f"{grad.layout} one (e.g. from nn.Embedding(sparse=True)): use sparse=False"
            )
    return grads


def write_grads(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], had: Sequence[bool]
) -> None:
    """Puts a method's gradient into ``.grad``, only where the pass left one (``had``).

    A parameter that took no part in the loss keeps ``.grad = None``, so the
    base optimizer leaves it alone (no weight decay, no momentum), as
    ``torch.optim`` does.
    """
    for p, new, has in zip(params, grads, had):
        if not has:
            p.grad = None
        elif p.grad is None:
            p.grad = new
        elif new is not p.grad:
            p.grad.copy_(new)


class Moved:
    """The parameters moved to a point and back, ``w`` kept meanwhile.

    ``storage`` holds ``w`` while the parameters are elsewhere: one buffer per
    parameter, reused from step to step (as the seed's ``old_p``).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> moved = Moved([w], {})
        >>> moved.move_to([torch.tensor([5.0])])
        >>> w.detach()
        tensor([5.])
        >>> moved.restore()
        >>> w.detach()
        tensor([1.])
    """

    def __init__(
        self, params: Sequence[torch.Tensor], storage: dict[torch.Tensor, torch.Tensor]
    ) -> None:
        self.params = list(params)
        self.storage = storage
        self._backup: Optional[list[torch.Tensor]] = None

    @torch.no_grad()
    def move_to(self, values: Sequence[torch.Tensor]) -> None:
        """Copies ``values`` into the parameters, ``w`` into storage first."""
        for p in self.params:
            if p not in self.storage:
                self.storage[p] = torch.empty_like(p)
        self._backup = [self.storage[p] for p in self.params]
        _tree.copy_into(self._backup, self.params)
        _tree.copy_into(self.params, list(values))

    @torch.no_grad()
    def restore(self) -> None:
        """Puts ``w`` back if the parameters were moved (a no-op otherwise)."""
        if self._backup is not None:
            _tree.copy_into(self.params, self._backup)
            self._backup = None


class ClosurePasses:
    """``first`` and ``second`` passes of one step, each a call of ``closure`` at a point.

    Args:
        closure: runs a forward-backward pass (it may zero the gradients).
        keys: the names of ``params`` in the trees the interpreter sees.
        params: the parameters the method sees.
        fresh: the caller already ran the first pass (the seed's pattern):
            ``first`` at ``w`` reads ``.grad`` instead of calling the closure.
        run: ``reuse_rng`` and ``nonfinite`` (the engine's policies).
        zero_grad: clears the gradients before each call (set to None).
        storage: where ``w`` is kept while the parameters are elsewhere, one
            buffer per parameter, reused from step to step (as the seed's ``old_p``).

    Attributes:
        loss: the last loss the closure returned (None if it never ran).
        had: which parameters the last pass gave a gradient.
    """

    aux = False

    def __init__(
        self,
        closure: Callable[[], Any],
        keys: Sequence[str],
        params: Sequence[torch.Tensor],
        fresh: bool,
        run: RunOptions,
        zero_grad: Callable[[], None],
        storage: dict[torch.Tensor, torch.Tensor],
    ) -> None:
        self.closure = closure
        self.keys = list(keys)
        self.params = list(params)
        self.fresh = fresh
        self.run = run
        self.zero_grad = zero_grad
        self.replay: Optional[list[_rng.RngStates]] = None
        self.loss: Any = None
        self.had = [p.grad is not None for p in self.params]
        self.moved = Moved(self.params, storage)
        self.calls = 0  # of the closure as a bare method's loss_fn

    @property
    def loss_fn(self) -> Callable[[PyTree, Any], torch.Tensor]:
        """The closure as ``loss_fn(params, batch)``, for a bare ``Method(init, grad)``."""
        return self._loss_at

    def tree(self, values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``values`` keyed like the parameters."""
        return dict(zip(self.keys, values))

    def first(self, point: PyTree, batch: Any, reduce: bool) -> Pass:
        """The pass at ``point`` (``w``, or a one-pass method's point)."""
        del batch, reduce
        if self.fresh and self._is_params(point):
            self.fresh = False
            self.had = [p.grad is not None for p in self.params]
            return Pass(self.tree(grads_of(self.params)), None)
        if self.run.reuse_rng:
            self.replay = [_rng.capture(self.params)]
        return self._evaluate(point)

    def second(self, point: PyTree, batch: Any) -> Pass:
        """The pass at ``w + e`` (``in_second_pass``): the first draws replayed, BatchNorm kept."""
        del batch
        with RunningStatsGuard().held(), lightning.second_pass():
            if self.replay is None:
                return self._evaluate(point)
            return _rng.replayed(self.replay[0], lambda: self._evaluate(point))

    def losses(self, point: PyTree, batch: Any) -> Any:
        """Per-sample losses: a closure has none (``samfunc.SAM`` refuses ESAM's selection)."""
        raise TypeError("samfunc.SAM's closure returns one loss, not one per sample")

    def _is_params(self, point: PyTree) -> bool:
        return all(a is b for a, b in zip(_tree.leaves(point), self.params))

    def _evaluate(self, point: PyTree) -> Pass:
        self.zero_grad()
        if self._is_params(point):
            loss = self.closure()
        else:
            self.moved.move_to(_tree.leaves(point))
            try:
                loss = self.closure()
            finally:
                self.restore()
        self.loss = loss
        self.had = [p.grad is not None for p in self.params]
        value = loss.detach() if isinstance(loss, torch.Tensor) else loss
        return Pass(self.tree(grads_of(self.params)), value)

    def restore(self) -> None:
        """Puts ``w`` back if a pass moved the parameters (a no-op otherwise)."""
        self.moved.restore()

    def _loss_at(self, params: PyTree, batch: Any) -> torch.Tensor:
        del batch
        leaves = _tree.leaves(params)
        outputs = _ClosureLoss.apply(self, *leaves)  # type: ignore[no-untyped-call]
        loss: torch.Tensor = outputs[0]
        return loss


class _ClosureLoss(torch.autograd.Function):
    """The closure's loss as a function of the parameters' values: its backward is ``.grad``."""

    @staticmethod
    def forward(passes: ClosurePasses, *values: torch.Tensor) -> Any:
        point = passes.tree(list(values))
        # A bare method's first call is its pass at w; each later one is an extra
        # pass: it keeps BatchNorm's statistics and is marked as in_second_pass().
        extra = passes.calls > 0
        passes.calls += 1
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            if extra:
                stack.enter_context(RunningStatsGuard().held())
                stack.enter_context(lightning.second_pass())
            done = passes._evaluate(point)
        loss = done.value if isinstance(done.value, torch.Tensor) else torch.tensor(done.value)
        return (loss.detach().clone(), *[g.detach().clone() for g in _tree.leaves(done.grads)])

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(*output[1:])
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        upstream = grad_outputs[0]
        return (None, *[upstream * g for g in ctx.saved_tensors])
