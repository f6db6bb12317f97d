"""The gradient passes of one step over a loss: parts, replayed draws, one BatchNorm update.

Examples:
    >>> import torch
    >>> from samfunc._options import RunOptions
    >>> passes = LossPasses(lambda p, b: (p["w"] * b).sum(), RunOptions(), aux=False)
    >>> passes.first({"w": torch.ones(2)}, torch.ones(2), reduce=False).grads["w"]
    tensor([1., 1.])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
from torch.func import vmap

from . import _batch, _distributed, _rng, _tree
from ._base import LossFn, Params
from ._distributed import DataParallel
from ._grad import grad_and_value
from ._loss_scale import LossScaleState, scale_loss, unscaled
from ._module import RunningStatsGuard
from ._options import RunOptions
from ._tree import PyTree

__all__ = [
    "Pass",
    "FirstPass",
    "LossPasses",
    "chunk_mean",
    "mean_pass",
    "refuse_choice_under_compile",
]

Batch = PyTree


class Pass(NamedTuple):
    """One pass's gradient and value (the loss, or ``(loss, aux)``)."""

    grads: PyTree
    value: Any


class FirstPass(NamedTuple):
    """A step's first pass and the policy's verdict on it (for a policy that reads ``g``).

    ``first_phase`` returns it and ``finish_phase`` takes it, so a train step
    can choose the rest of the step in Python between the two.

    Attributes:
        grads: ``g``, the gradient at ``w``.
        value: the first pass's loss (and aux).
        full: a 0-d bool tensor: whether the policy wants the full step.
        policy: the policy's new state.
        replay: the random generators' states of each part of the first pass
            (``reuse_rng``), for the second pass to replay; None otherwise.
    """

    grads: PyTree
    value: Any
    full: torch.Tensor
    policy: Any
    replay: Any = None


def refuse_choice_under_compile(name: str) -> None:
    """A method that chooses its step in Python cannot choose inside a compiled graph."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"{name} chooses each step's kind (full or cheap) in Python, which a compiled graph "
            "cannot do: pass full=True or full=False to its grad, or build a train step and "
            "compile it with samfunc.compile_step(step), which compiles one graph per kind"
        )


def chunk_mean(grads: PyTree, value: Any, aux: bool) -> Pass:
    """Chunk-stacked gradients and loss averaged; aux keeps its leading chunk axis."""
    grads = _tree.tree_map(lambda g: g.mean(0), grads)
    return Pass(grads, (value[0].mean(0), value[1]) if aux else value.mean(0))


def mean_pass(done: Pass, data_parallel: Optional[DataParallel], aux: bool) -> Pass:
    """A pass's gradient and loss averaged over the data-parallel processes (one all-reduce)."""
    if data_parallel is None:
        return done
    loss = done.value[0] if aux else done.value
    grads, loss, _ = _distributed.mean_with_loss(done.grads, loss, (), data_parallel.group)
    return Pass(grads, (loss, done.value[1]) if aux else loss)


class LossPasses:
    """The gradient passes of one step over ``loss_fn``, cut into parts as ``run`` says.

    ``first`` is the pass at ``w``: chunks (``num_chunks``, with ``vmap`` or in
    a loop) or micro-batches (``accum_steps``), averaged; with ``reuse_rng``
    it notes the random generators' states before each part. ``second`` is
    the pass at ``w + e`` over the same parts, each on its part's replayed
    draws, under a ``RunningStatsGuard``. Built afresh for every step.

    Attributes:
        loss_fn: the (checked) loss.
        run: the checked options.
        aux: whether ``loss_fn`` returns ``(loss, aux)``.
        replay: the generators' states noted by ``first`` (one per part).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        run: RunOptions,
        aux: bool,
        replay: Any = None,
        unscale: Optional[LossScaleState] = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.run = run
        self.aux = aux
        self.grad_fn: Callable[[Params, Any], tuple[PyTree, Any]] = grad_and_value(
            loss_fn, has_aux=aux
        )
        if unscale is not None:
            self.grad_fn = _ScaledGrad(loss_fn, aux, unscale)
        self.replay: Optional[list[_rng.RngStates]] = replay
        self.unscale = unscale

    def _parts(self, batch: Batch) -> list[Batch]:
        parts = self.run.num_chunks * self.run.accum_steps
        if parts == 1:
            return [batch]
        name = "num_chunks" if self.run.num_chunks > 1 else "accum_steps"
        return _batch.split_batch(batch, parts, name)

    def first(self, params: Params, batch: Batch, reduce: bool) -> Pass:
        """The pass at ``w`` (averaged over the processes when ``reduce``)."""
        run = self.run
        if run.num_chunks > 1 and run.vectorize_chunks:
            stacked, in_dims = _batch.stack_chunks(batch, run.num_chunks, "num_chunks")
            grads, value = vmap(
                lambda chunk: self.grad_fn(params, chunk),
                in_dims=(in_dims,),
                randomness="different",
            )(stacked)
            done = chunk_mean(grads, value, self.aux)
        else:
            done = self._over_parts(params, self._parts(batch), note=run.reuse_rng)
        return mean_pass(done, run.data_parallel, self.aux) if reduce else done

    def point_at(self, params: Params, e: PyTree) -> Params:
        """``w + e``, out of place."""
        return _tree.add_scaled(params, e, 1.0)

    def second(self, point: Params, batch: Batch) -> Pass:
        """The pass at ``w + e`` on the first pass's parts and draws, one BatchNorm update kept."""
        with self._guard():
            done = self._over_parts(point, self._parts(batch), note=False)
        if self.run.reduces_each_pass:
            assert self.run.data_parallel is not None
            grads = _distributed.all_mean(done.grads, self.run.data_parallel.group)
            done = Pass(grads, done.value)
        return done

    def losses(self, point: Params, batch: Batch) -> Any:
        """``loss_fn``'s value at ``point`` without a gradient, on the first part's draws."""
        with torch.no_grad(), self._guard():
            return self._replayed(0, lambda: self.loss_fn(point, batch))

    def _guard(self) -> contextlib.AbstractContextManager[None]:
        """BatchNorm's statistics held, unless the loss threads its buffers itself."""
        if self.run.guard_running_stats:
            return RunningStatsGuard().held()
        return contextlib.nullcontext()

    def _replayed(self, index: int, fn: Callable[[], Any]) -> Any:
        if self.replay is None:
            return fn()
        return _rng.replayed(self.replay[index], fn)

    def _over_parts(self, params: Params, parts: list[Batch], note: bool) -> Pass:
        if note:
            self.replay = []
        results = []
        for index, part in enumerate(parts):
            if note:
                assert self.replay is not None
                self.replay.append(_rng.capture(_tree.leaves(params)))
                results.append(self.grad_fn(params, part))
            else:
                results.append(self._replayed(index, lambda: self.grad_fn(params, part)))  # noqa: B023
        if len(results) == 1:
            return Pass(*results[0])
        grads = _batch.mean_trees([r[0] for r in results])
        return Pass(grads, _batch.mean_values([r[1] for r in results], self.aux))


class _ScaledGrad:
    """A pass with dynamic loss scaling: the gradient of ``loss * scale``, divided by the scale.

    The loss is scaled last, after any method's change of it (MESA's), and
    the gradient is unscaled (GradScaler's float32 reciprocal) before any
    piece sees it; the value is ``loss_fn``'s own, unscaled.
    """

    def __init__(self, loss_fn: LossFn, aux: bool, scale: LossScaleState) -> None:
        self.loss_fn = loss_fn
        self.aux = aux
        self.scale = scale
        self.inner = grad_and_value(self._scaled, has_aux=True)

    def _scaled(self, params: Params, batch: Any) -> tuple[torch.Tensor, Any]:
        out = self.loss_fn(params, batch)
        loss, rest = out if self.aux else (out, None)
        return scale_loss(loss, self.scale), (loss.detach(), rest)

    def __call__(self, params: Params, batch: Any) -> tuple[PyTree, Any]:
        grads, (_, (loss, rest)) = self.inner(params, batch)
        return unscaled(grads, self.scale), ((loss, rest) if self.aux else loss)
