"""``samfunc.SAM.step(closure)``: a closure evaluated with the parameters moved to a point.

``closure_step`` hands the interpreter (``samfunc._engine.run_step``) a
``ClosurePasses`` where the functional drivers hand it ``LossPasses``: the
gradient at a point is the closure's backward pass with the parameters
temporarily at that point, read from ``.grad``. So the class runs every
method through the same phases as ``method.grad`` and the train steps.
Whether ``.grad`` already holds this step's first pass (the seed's pattern,
``loss.backward()`` then ``step(closure)``) comes from a ``BackwardWatch``.

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
import functools
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch

from . import _rng, _tree
from ._engine import run_step
from ._module import RunningStatsGuard
from ._options import RunOptions
from ._passes import Pass
from ._phases import call_whole, check_method_state, is_whole
from ._schedule import group_learning_rates
from ._tree import PyTree
from .integrations import lightning

if TYPE_CHECKING:
    from ._stateful import SAM

__all__ = [
    "BackwardWatch",
    "ClosurePasses",
    "Moved",
    "clear_grads",
    "closure_step",
    "grads_of",
    "write_grads",
]


def closure_step(opt: SAM, closure: Callable[[], Any]) -> Any:
    """``opt.step(closure)``: the method's whole step, the closure doing each pass.

    The first pass is the closure at ``w``, or, when a backward pass since the
    last step left gradients (``opt``'s ``BackwardWatch``), those gradients.
    Whatever happens, the parameters are back at ``w`` before this returns or
    raises; the base optimizer steps only on a finite gradient (``"skip"``).
    """
    opt._refuse_mid_step("call step")
    opt._watch.watch(opt.param_groups)
    leaves = opt._leaves()
    pieces = opt._pieces(leaves)
    fresh = opt._watch.seen and any(p.grad is not None for p in leaves.params)
    if fresh and ((pieces.ascent is None and pieces.whole is None) or is_whole(pieces)):
        raise RuntimeError(
            f"{pieces.name} takes its own passes, so the backward pass before step(closure) "
            "cannot be used: let the closure do the whole pass"
        )
    state = opt._state(pieces, leaves)
    check_method_state(pieces, state)
    groups = opt.param_groups
    passes = ClosurePasses(
        torch.enable_grad()(closure),
        leaves.keys,
        leaves.params,
        fresh,
        opt._run(),
        lambda: clear_grads(groups),
        opt._storage,
    )
    tree = leaves.tree(leaves.params)
    locked = _rng.RNG_LOCK if opt.reuse_rng else contextlib.nullcontext()
    with locked, group_learning_rates(groups):
        try:
            if is_whole(pieces):
                assert pieces.whole is not None
                grads, loss, new_state = call_whole(
                    pieces.whole, passes.loss_fn, tree, None, state, passes.run
                )
            else:
                grads, loss, new_state = run_step(pieces, passes, tree, None, state)
        finally:
            passes.restore()
            opt._watch.reset()
    opt._opt_called = True  # what torch.optim.lr_scheduler checks
    if loss is None:  # the seed's pattern: the closure's loss, at w + e
        loss = passes.loss
    if opt.nonfinite == "skip" and not _tree.norm_is_finite(grads):
        opt.skipped_steps += 1
        return loss
    write_grads(leaves.params, _tree.leaves(grads), passes.had)
    opt.base_optimizer.step()
    opt._commit(new_state)
    return loss


class BackwardWatch:
    """Notes that a backward pass accumulated a gradient into a watched parameter.

    ``step(closure)`` asks it whether ``.grad`` holds a fresh first pass (the
    seed's pattern) or what the previous step left (the PyTorch pattern). Its
    hook is C code (``operator.setitem`` into a one-slot list), so a backward
    pass runs no Python per parameter; the hooks go when the watch does.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> watch = BackwardWatch()
        >>> watch.watch([{"params": [w]}])
        >>> watch.seen
        False
        >>> w.sum().backward()
        >>> watch.seen
        True
    """

    __slots__ = ("__weakref__", "_handles", "_hook", "_hooked", "_slot")

    def __init__(self) -> None:
        self._slot: list[Any] = [None]  # the last parameter a backward pass reached
        self._hook = functools.partial(operator.setitem, self._slot, 0)
        self._hooked: set[int] = set()
        self._handles: list[Any] = []
        weakref.finalize(self, _remove_hooks, self._handles)

    def watch(self, groups: list[dict[str, Any]]) -> None:
        """Hooks every parameter of ``groups`` that can get a gradient (again after an unfreeze)."""
        for group in groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in self._hooked:
                    self._hooked.add(id(p))
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @property
    def seen(self) -> bool:
        """Whether a backward pass reached a watched parameter since ``reset``."""
        return self._slot[0] is not None

    def reset(self) -> None:
        """Forgets the backward passes so far."""
        self._slot[0] = None


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def clear_grads(groups: list[dict[str, Any]]) -> None:
    """``p.grad = None`` for each parameter of ``groups`` (no ``zero_grad`` profiler record)."""
    for group in groups:
        for p in group["params"]:
            p.grad = None


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
        self._keep()
        _tree.copy_into(self.params, list(values))

    @torch.no_grad()
    def shift(self, steps: Sequence[torch.Tensor]) -> None:
        """Adds ``steps`` to the parameters in place, ``w`` into storage first."""
        self._keep()
        _tree.add_into(self.params, list(steps))

    def _keep(self) -> None:
        for p in self.params:
            if p not in self.storage:
                self.storage[p] = torch.empty_like(p)
        self._backup = [self.storage[p] for p in self.params]
        _tree.copy_into(self._backup, self.params)

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

    def point_at(self, params: PyTree, e: PyTree) -> PyTree:
        """``w + e``: the parameters themselves, moved there in place until ``second`` ends."""
        self.moved.shift(_tree.leaves(e))
        return params

    def second(self, point: PyTree, batch: Any) -> Pass:
        """The pass at ``w + e`` (``in_second_pass``): the first draws replayed, BatchNorm kept."""
        del batch
        try:
            with RunningStatsGuard().held(), lightning.second_pass():
                if self.replay is None:
                    return self._evaluate(point)
                return _rng.replayed(self.replay[0], lambda: self._evaluate(point))
        finally:
            self.restore()  # back to w before the combiner reads params

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
