"""The interpreter: one set of phase functions that runs every sharpness-aware method.

A method is data (``samfunc.Pieces``); one step of it is, in phases::

    g, loss   = first pass at w            (at point(w) for a one-pass method)
    full?     = the policy's plan(count), or decide(||g||^2) (AE-SAM)
    e         = ascent(g, count)           full steps
    g_s       = second pass at w + e       (on ESAM's sharpest samples)
    out       = combiner(g, g_s)           full steps; combiner.reuse(g) otherwise
    count    += 1                          the one clock (full_steps too on full steps)

``method.grad``, ``sam_grad``, both train steps and ``samfunc.SAM`` run these
same functions; none writes a formula of its own. Around them the interpreter
adds m-sharpness (``num_chunks``: one ``e`` per chunk, with ``vmap`` or in a
loop), gradient accumulation (``accum_steps``), replayed random draws
(``reuse_rng``, per micro-batch), one BatchNorm update per step (the second
pass runs under ``RunningStatsGuard``), data parallelism and the non-finite
check. A bare ``Method(init, grad)`` runs as a whole through its own ``grad``.

Examples:
    >>> import torch
    >>> import samfunc
    >>> method = samfunc.sam(rho=0.05)
    >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
    >>> params = {"w": torch.ones(3)}
    >>> state = method.init(params)
    >>> grads, loss, state = method.grad(loss_fn, params, torch.eye(3), state)
    >>> int(state.steps)
    1
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch.func import vmap

from . import _batch, _distributed, _rng, _tree
from ._base import LossFn, MethodState, Params, Pieces
from ._finite import raise_if_nonfinite
from ._loss_scale import LossScaleState
from ._options import FIRST_PASS, ONE_PASS, RunOptions
from ._passes import FirstPass, LossPasses, Pass, chunk_mean, refuse_choice_under_compile
from ._phases import (
    advance,
    ascend,
    aux_of,
    call_whole,
    check_pass,
    check_step,
    checked,
    combine,
    decide,
    evaluation_point,
    is_whole,
    kind_of_step,
    per_sample,
    reads_gradient,
    reuse,
    two_pass,
)
from ._tree import PyTree

__all__ = ["interpret", "run_step", "first_phase", "finish_phase"]

Batch = PyTree


def interpret(
    pieces: Pieces,
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    state: Any,
    run: RunOptions,
    full: Optional[bool] = None,
    unscale: Optional[LossScaleState] = None,
) -> tuple[PyTree, Any, Any]:
    """One step of the method: ``(grads, loss or (loss, aux), new_state)``.

    ``full`` forces the kind of step (True: both passes; False: one pass at
    ``w``, the gradient from ``combiner.reuse``); None lets the method's
    policy choose (every step is full without one). ``unscale``: the loss
    was multiplied by this dynamic loss scale, and every pass's gradient is
    divided by it before any piece sees it.
    """
    if unscale is not None and is_whole(pieces):
        raise ValueError(f"{pieces.name} takes its own passes, which a loss scale cannot reach")
    if is_whole(pieces):
        assert pieces.whole is not None
        return call_whole(pieces.whole, loss_fn, params, batch, state, run)
    loss = checked(pieces, loss_fn, params, state, run)
    passes = LossPasses(loss, run, aux_of(pieces, run), unscale=unscale)
    # With reuse_rng, no other thread may draw between a pass and its replay.
    with _rng.RNG_LOCK if run.reuse_rng else contextlib.nullcontext():
        return run_step(pieces, passes, params, batch, state, full)


def run_step(
    pieces: Pieces,
    passes: Any,
    params: Params,
    batch: Any,
    state: MethodState,
    full: Optional[bool] = None,
) -> tuple[PyTree, Any, MethodState]:
    """The step, phase by phase, over any ``passes`` (``LossPasses``, or ``samfunc.SAM``'s).

    ``passes`` evaluates the gradient: ``first(point, batch, reduce)`` at
    ``w`` (or a one-pass method's point), ``second(point, batch)`` at ``w + e``;
    it carries ``run``, ``aux``, ``loss_fn`` and ``replay``.
    """
    run: RunOptions = passes.run
    if full is None:
        full = kind_of_step(pieces, state)
    if full is None:
        first = _first(pieces, passes, params, batch, state)
        refuse_choice_under_compile(pieces.name)
        return _finish(pieces, passes, params, batch, state, first, bool(first.full))
    if not full or not two_pass(pieces):
        return _one_pass(pieces, passes, params, batch, state)
    if pieces.whole is not None:  # a bare method given a policy: its own grad takes the passes
        grads, value, inner = call_whole(
            pieces.whole, passes.loss_fn, params, batch, state.combine, run
        )
        return grads, value, advance(state._replace(combine=inner), True)
    if run.num_chunks > 1:
        unscale = getattr(passes, "unscale", None)
        grads, value, new_state = _chunked(
            pieces, passes.loss_fn, params, batch, state, run, unscale
        )
    else:
        first_pass = passes.first(params, batch, reduce=run.reduces_each_pass)
        grads, value, new_state = _full(pieces, passes, params, batch, state, first_pass, True)
    if run.local:
        grads, value, new_state = _mean_of_processes(pieces, grads, value, new_state, run)
    return grads, _reported(pieces, value, passes), advance(new_state, True)


def first_phase(
    pieces: Pieces,
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    state: Any,
    run: RunOptions,
    unscale: Optional[LossScaleState] = None,
) -> FirstPass:
    """The first pass and the policy's verdict on it (for a policy that reads ``g``)."""
    if not reads_gradient(pieces):
        raise TypeError(f"{pieces.name}'s policy does not read the gradient: call it whole")
    loss = checked(pieces, loss_fn, params, state, run)
    passes = LossPasses(loss, run, aux_of(pieces, run), unscale=unscale)
    return _first(pieces, passes, params, batch, state)


def finish_phase(
    pieces: Pieces,
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    state: Any,
    first: FirstPass,
    run: RunOptions,
    full: bool,
    unscale: Optional[LossScaleState] = None,
) -> tuple[PyTree, Any, MethodState]:
    """The rest of the step after ``first_phase``: the full step if ``full``, else the cheap one."""
    loss = checked(pieces, loss_fn, params, state, run)
    passes = LossPasses(loss, run, aux_of(pieces, run), first.replay, unscale)
    return _finish(pieces, passes, params, batch, state, first, full)


def _first(
    pieces: Pieces, passes: Any, params: Params, batch: Any, state: MethodState
) -> FirstPass:
    done = passes.first(params, batch, reduce=True)
    check_pass(done.grads, FIRST_PASS, done.value, passes.run, passes.aux, True)
    full, policy = decide(pieces, done.grads, state)
    return FirstPass(done.grads, done.value, full, policy, passes.replay)


def _finish(
    pieces: Pieces,
    passes: Any,
    params: Params,
    batch: Any,
    state: MethodState,
    first: FirstPass,
    full: bool,
) -> tuple[PyTree, Any, MethodState]:
    state = state._replace(policy=first.policy)
    if full:
        done = Pass(first.grads, first.value)
        grads, _, new_state = _full(pieces, passes, params, batch, state, done, True)
    else:
        grads, combine_state = reuse(pieces, first.grads, state, params)
        new_state = state._replace(combine=combine_state)
    return grads, _reported(pieces, first.value, passes), advance(new_state, full)


def _full(
    pieces: Pieces,
    passes: Any,
    params: Params,
    batch: Any,
    state: MethodState,
    first: Pass,
    check: bool,
) -> tuple[PyTree, Any, MethodState]:
    """After the first pass: the ascent, the pass at ``w + e``, and the combiner.

    ``check``: the non-finite check of the step, once, on the gradient the
    combiner returns (a NaN or inf in either pass reaches it); only when it
    fails are the passes read to say which one it came from.
    """
    e, ascent_state = ascend(pieces, first.grads, state, params)
    perturbed = passes.point_at(params, e)
    selected = batch
    if pieces.select_fraction is not None and pieces.select_fraction < 1.0:
        selected = _sharpest(pieces.select_fraction, passes, perturbed, batch, first.value)
    second = passes.second(perturbed, selected)
    out, combine_state = combine(pieces, first.grads, second.grads, state, params)
    if check:
        check_step(out, (first, second), passes.run, passes.aux)
    return out, first.value, state._replace(ascent=ascent_state, combine=combine_state)


def _sharpest(
    fraction: float, passes: Any, perturbed: Params, batch: Batch, first_value: Any
) -> Batch:
    """ESAM's data selection: the samples whose loss rose most from ``w`` to ``w + e``."""
    before = first_value[1][0]
    count = before.shape[0]
    keep = max(1, int(count * fraction))
    if keep >= count:
        return batch
    after = passes.losses(perturbed, batch)[1][0]
    index = torch.topk(after - before, keep, sorted=False).indices
    return _batch.select_samples(batch, index)


def _one_pass(
    pieces: Pieces, passes: Any, params: Params, batch: Any, state: MethodState
) -> tuple[PyTree, Any, MethodState]:
    """A step of one pass: a cheap step of a two-pass method, or a one-pass method's step."""
    run: RunOptions = passes.run
    combine_state = state.combine
    if pieces.objective is not None:
        loss_fn, combine_state = pieces.objective(passes.loss_fn, params, state)
        passes = LossPasses(loss_fn, run, True, unscale=getattr(passes, "unscale", None))
    point = evaluation_point(pieces, params, state)
    done = passes.first(point, batch, reduce=True)
    value = done.value
    if pieces.objective is not None:
        value = _objective_value(value[1], run)
    check_pass(done.grads, ONE_PASS, value, run, True if pieces.objective else passes.aux, True)
    grads, combine_state = reuse(pieces, done.grads, state._replace(combine=combine_state), point)
    new_state = advance(state._replace(combine=combine_state), False)
    return grads, _reported(pieces, value, passes), new_state


def _objective_value(value: Any, run: RunOptions) -> Any:
    """The loss an objective reports (not the objective), averaged over parts and processes."""
    loss, aux = value
    loss = loss.mean() if loss.ndim else loss
    if run.data_parallel is not None:  # the pass averaged the objective, not this loss
        loss = _distributed.all_mean(loss, run.data_parallel.group)
    return loss, aux


def _reported(pieces: Pieces, value: Any, passes: Any) -> Any:
    """The loss (and aux) to return, without the per-sample losses kept for ESAM."""
    if not per_sample(pieces) or not passes.aux:
        return value
    loss, (_, aux) = value
    return (loss, aux) if passes.run.has_aux else loss


def _chunked(
    pieces: Pieces,
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    state: MethodState,
    run: RunOptions,
    unscale: Optional[LossScaleState],
) -> tuple[PyTree, Any, MethodState]:
    """m-sharpness: one ``e`` per chunk, the gradients averaged.

    Each chunk starts from ``state``; the new state is the mean of the
    chunks' floating-point states (for a moving average of gradients, the
    average of the whole batch's gradient) and the first chunk's counters.
    """
    aux = aux_of(pieces, run)
    single = run._replace(num_chunks=1)

    def one_chunk(chunk: Batch, check: bool) -> tuple[PyTree, Any, MethodState]:
        passes = LossPasses(loss_fn, single, aux, unscale=unscale)
        first = passes.first(params, chunk, reduce=False)
        return _full(pieces, passes, params, chunk, state, first, check)

    if run.vectorize_chunks:
        stacked, in_dims = _batch.stack_chunks(batch, run.num_chunks, "num_chunks")
        grads, value, states = vmap(
            lambda chunk: one_chunk(chunk, False), in_dims=(in_dims,), randomness="different"
        )(stacked)
        grads, value = chunk_mean(grads, value, aux)
        check_pass(grads, "either pass (in some chunk)", value, run, aux, False)
    else:
        results = [
            one_chunk(chunk, True)
            for chunk in _batch.split_batch(batch, run.num_chunks, "num_chunks")
        ]
        grads = _batch.mean_trees([result[0] for result in results])
        value = _batch.mean_values([result[1] for result in results], aux)
        states = _batch.stack_trees([result[2] for result in results])
    return grads, value, _tree.tree_map(_merge_chunks, states)


def _merge_chunks(stacked: torch.Tensor) -> torch.Tensor:
    """One chunk-stacked state leaf back to one: the mean if floating, else the first."""
    return stacked.mean(0) if stacked.is_floating_point() else stacked[0]


def _mean_of_processes(
    pieces: Pieces, grads: PyTree, value: Any, state: MethodState, run: RunOptions
) -> tuple[PyTree, Any, MethodState]:
    """Data-parallel ``"local"``: the step's results averaged over the processes.

    The method's output, the loss and the state's floating-point leaves on
    the gradient's device go in one all-reduce, as ``num_chunks`` averages
    its chunks' results; so over ``P`` processes a step equals one process
    with ``num_chunks=P`` on the concatenated batch. Leaves elsewhere (the
    clock, on the CPU) agree on every process already.
    """
    assert run.data_parallel is not None
    aux = aux_of(pieces, run)
    loss = value[0] if aux else value
    device = _tree.leaves(grads)[0].device
    leaves, spec = _tree.flatten(state)
    shared = [i for i, leaf in enumerate(leaves) if getattr(leaf, "device", None) == device]
    grads, loss, averaged = _distributed.mean_with_loss(
        grads, loss, [leaves[i] for i in shared], run.data_parallel.group
    )
    for i, leaf in zip(shared, averaged):
        leaves[i] = leaf
    value = (loss, value[1]) if aux else loss
    if run.nonfinite == "raise":
        raise_if_nonfinite(grads, "either pass (on some process)", loss)
    return grads, value, _tree.unflatten(leaves, spec)


def __getattr__(name: str) -> Any:
    """``Interpreted`` moved to ``samfunc._interpreted``: pickles made before still load."""
    if name == "Interpreted":
        from ._interpreted import Interpreted

        return Interpreted
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
