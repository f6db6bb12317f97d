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
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
from torch.func import vmap
from typing_extensions import Unpack

from . import _batch, _distributed, _rng, _tree
from ._base import (
    Combiner,
    EmptyState,
    EngineOptions,
    LossFn,
    Method,
    MethodState,
    OptState,
    Params,
    Pieces,
    check_state,
)
from ._combine import takes_count, update_with_count
from ._distributed import DataParallel, check_data_parallel
from ._finite import NonFinitePolicy, check_policy, raise_if_nonfinite, refuse_raise_under_compile
from ._grad import grad_and_value
from ._loss_scale import LossScaleState, unscale_grads
from ._module import RunningStatsGuard
from ._tree import PyTree
from ._validate import check_bool, check_positive_int

__all__ = [
    "FIRST_PASS",
    "SECOND_PASS",
    "ONE_PASS",
    "ENGINE_POLICIES",
    "RunOptions",
    "run_options",
    "Pass",
    "FirstPass",
    "LossPasses",
    "pieces_of",
    "init_state",
    "kind_of_step",
    "ascend",
    "combine",
    "reuse",
    "decide",
    "advance",
    "evaluation_point",
    "interpret",
    "run_step",
    "is_whole",
    "reads_gradient",
    "ascent_pieces",
    "IDENTITY",
    "first_phase",
    "finish_phase",
    "refuse_choice_under_compile",
    "check_params",
    "checked_loss_fn",
    "Interpreted",
]

FIRST_PASS = "the first pass, at w"
SECOND_PASS = "the second pass, at w + e"
ONE_PASS = "the gradient pass"

#: The policies the engine applies itself; the train steps and ``SAM`` add ``"skip"``.
ENGINE_POLICIES = ("propagate", "raise")

Batch = PyTree


class RunOptions(NamedTuple):
    """``EngineOptions`` checked, with every default filled in."""

    has_aux: bool = False
    num_chunks: int = 1
    accum_steps: int = 1
    vectorize_chunks: bool = True
    reuse_rng: bool = False
    nonfinite: NonFinitePolicy = "propagate"
    data_parallel: Optional[DataParallel] = None

    @property
    def local(self) -> bool:
        """Data-parallel in ``"local"`` mode: each process perturbs with its own gradient."""
        return self.data_parallel is not None and not self.data_parallel.is_global

    @property
    def reduces_each_pass(self) -> bool:
        """Data-parallel in ``"global"`` mode: each pass's gradient is averaged."""
        return self.data_parallel is not None and self.data_parallel.is_global


def run_options(options: EngineOptions) -> RunOptions:
    """Checks the engine's options (unknown names included) once; fills in defaults."""
    unknown = sorted(set(options) - set(RunOptions._fields))
    if unknown:
        raise TypeError(
            f"unexpected option {unknown[0]!r}; the engine's options are {RunOptions._fields}"
        )
    merged = RunOptions()._replace(**options)
    num_chunks = check_positive_int("num_chunks", merged.num_chunks)
    accum_steps = check_positive_int("accum_steps", merged.accum_steps)
    if num_chunks > 1 and accum_steps > 1:
        raise ValueError(
            "num_chunks and accum_steps cannot both be > 1, "
            f"got num_chunks={num_chunks} and accum_steps={accum_steps}"
        )
    data_parallel = check_data_parallel(merged.data_parallel)
    if data_parallel is not None and data_parallel.is_global and num_chunks > 1:
        raise ValueError(
            "data_parallel='global' averages the whole batch's gradient before the ascent, "
            f"which num_chunks > 1 (one ascent per chunk) contradicts; got num_chunks={num_chunks}"
        )
    return RunOptions(
        has_aux=check_bool("has_aux", merged.has_aux),
        num_chunks=num_chunks,
        accum_steps=accum_steps,
        vectorize_chunks=check_bool("vectorize_chunks", merged.vectorize_chunks),
        reuse_rng=check_bool("reuse_rng", merged.reuse_rng),
        nonfinite=check_policy("nonfinite", merged.nonfinite, ENGINE_POLICIES),
        data_parallel=data_parallel,
    )


def check_params(params: Params) -> None:
    """A non-empty tree of detached floating-point tensors, or an error naming the leaf."""
    leaves = _tree.leaves(params)
    if not leaves:
        raise ValueError("params must hold at least one tensor, got an empty tree")
    found = _tree.find_leaf(params, lambda leaf: not isinstance(leaf, torch.Tensor))
    if found is not None:
        raise TypeError(
            f"params must be a pytree of tensors, got {type(found[1]).__name__} at {found[0]}"
        )
    found = _tree.find_leaf(params, lambda leaf: not leaf.is_floating_point())
    if found is not None:
        raise TypeError(
            f"params must hold floating-point tensors, got {found[1].dtype} at {found[0]}"
        )
    _tree.check_detached(params, "params")


def _check_loss(loss: Any, has_aux: bool, per_sample: bool) -> None:
    want = 1 if per_sample else 0
    if not isinstance(loss, torch.Tensor) or loss.ndim != want:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        if per_sample:
            raise ValueError(
                "this method ranks samples by their loss, so loss_fn must return one loss per "
                f"sample (a 1-d tensor, e.g. reduction='none'), got {shape}"
            )
        hint = "" if has_aux else " (pass has_aux=True if it returns (loss, aux))"
        raise ValueError(f"loss_fn must return a scalar (0-d) tensor loss, got {shape}{hint}")
    if not loss.is_floating_point():
        raise TypeError(
            f"loss_fn must return a floating-point loss, got {loss.dtype}: an integer or "
            "boolean loss has no gradient (compute it from the model's float outputs)"
        )


def checked_loss_fn(loss_fn: LossFn, has_aux: bool, per_sample: bool = False) -> LossFn:
    """Wraps ``loss_fn`` to check that it returns a scalar loss (a 1-d one with ``per_sample``)."""

    def checked(params: Params, batch: Batch) -> Any:
        out = loss_fn(params, batch)
        if has_aux and (not isinstance(out, tuple) or len(out) != 2):
            raise ValueError(
                "with has_aux=True, loss_fn must return a (loss, aux) pair, "
                f"got {type(out).__name__}"
            )
        _check_loss(out[0] if has_aux else out, has_aux, per_sample)
        return out

    return checked


def _mean_of_samples(loss_fn: LossFn, has_aux: bool) -> LossFn:
    """``loss_fn`` returning per-sample losses, as ``(mean, (per-sample, aux))``."""

    def mean_loss(params: Params, batch: Batch) -> tuple[torch.Tensor, Any]:
        out = loss_fn(params, batch)
        losses, aux = out if has_aux else (out, ())  # () not None: no leaf for torch.func
        return losses.mean(), (losses.detach(), aux)

    return mean_loss


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


def _chunk_mean(grads: PyTree, value: Any, aux: bool) -> Pass:
    """Chunk-stacked gradients and loss averaged; aux keeps its leading chunk axis."""
    grads = _tree.tree_map(lambda g: g.mean(0), grads)
    return Pass(grads, (value[0].mean(0), value[1]) if aux else value.mean(0))


def _mean_pass(done: Pass, data_parallel: Optional[DataParallel], aux: bool) -> Pass:
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
        self.grad_fn = grad_and_value(loss_fn, has_aux=aux)
        self.replay: Optional[list[_rng.RngStates]] = replay
        self.unscale = unscale

    def _unscaled(self, done: Pass) -> Pass:
        """With dynamic loss scaling, the pass's gradient divided by the scale (GradScaler's)."""
        if self.unscale is None:
            return done
        return Pass(unscale_grads(done.grads, self.unscale)[0], done.value)

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
            done = _chunk_mean(grads, value, self.aux)
        else:
            done = self._over_parts(params, self._parts(batch), note=run.reuse_rng)
        done = self._unscaled(done)
        return _mean_pass(done, run.data_parallel, self.aux) if reduce else done

    def second(self, point: Params, batch: Batch) -> Pass:
        """The pass at ``w + e`` on the first pass's parts and draws, one BatchNorm update kept."""
        with RunningStatsGuard().held():
            done = self._unscaled(self._over_parts(point, self._parts(batch), note=False))
        if self.run.reduces_each_pass:
            assert self.run.data_parallel is not None
            grads = _distributed.all_mean(done.grads, self.run.data_parallel.group)
            done = Pass(grads, done.value)
        return done

    def losses(self, point: Params, batch: Batch) -> Any:
        """``loss_fn``'s value at ``point`` without a gradient, on the first part's draws."""
        with torch.no_grad(), RunningStatsGuard().held():
            return self._replayed(0, lambda: self.loss_fn(point, batch))

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


# --- the method as data -----------------------------------------------------------------


def pieces_of(method: Method) -> Pieces:
    """The pieces a driver interprets: the method's own, or its ``grad`` as a whole."""
    if not isinstance(method, Method):
        raise TypeError(
            "method must be a samfunc.Method (samfunc.sam(), gsam(), ... or "
            f"Method(init, grad)), got {type(method).__name__}"
        )
    if method.pieces is not None:
        return method.pieces
    return Pieces(name=_name_of(method), ascent=None, combiner=IDENTITY, whole=method)


def _name_of(method: Method) -> str:
    name = getattr(method.grad, "__qualname__", None) or type(method.grad).__name__
    return f"Method(grad={name})"


def _no_state(params: Params) -> EmptyState:
    del params
    return EmptyState()


def _first_gradient(
    grads: PyTree, perturbed_grads: PyTree, state: OptState, params: Params
) -> tuple[PyTree, OptState]:
    del grads, params
    return perturbed_grads, state


#: The combiner of a method with nothing to combine: ``g_s`` on full steps, ``g`` otherwise.
IDENTITY = Combiner(_no_state, _first_gradient, reads_first_gradient=False)


def ascent_pieces(name: str, ascent: Any) -> Pieces:
    """The pieces of a method that is an ascent alone (SAM's shape): ``g_s`` is its gradient."""
    return Pieces(name, ascent, IDENTITY, ascent_takes_count=takes_count(ascent))


def _counter() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def is_whole(pieces: Pieces) -> bool:
    """A bare method without a policy: its ``grad`` runs as it is, on its own state."""
    return pieces.whole is not None and pieces.policy is None


def init_state(pieces: Pieces, params: Params) -> Any:
    """A method's first state (a bare method's own ``init`` for a whole one)."""
    if pieces.whole is not None and pieces.policy is None:
        return pieces.whole.init(params)
    combine = pieces.whole.init(params) if pieces.whole is not None else None
    return MethodState(
        ascent=() if pieces.ascent is None else pieces.ascent.init(params),
        combine=pieces.combiner.init(params) if combine is None else combine,
        policy=() if pieces.policy is None else pieces.policy.init(params),
        steps=_counter(),
        full_steps=_counter(),
    )


def _two_pass(pieces: Pieces) -> bool:
    return pieces.ascent is not None or pieces.whole is not None


def kind_of_step(pieces: Pieces, state: MethodState) -> Optional[bool]:
    """Whether the next step is full (True), cheap (False), or the gradient decides (None).

    Read in Python from the clock (a CPU tensor: no device sync).
    """
    if not _two_pass(pieces):
        return False
    if pieces.policy is None:
        return True
    refuse_choice_under_compile(pieces.name)
    return pieces.policy.plan(int(state.steps))


def ascend(pieces: Pieces, grads: PyTree, state: MethodState, params: Params) -> tuple[Any, Any]:
    """The ascent phase: ``(e, new ascent state)`` from ``g``, at the clock's count."""
    assert pieces.ascent is not None
    return update_with_count(
        pieces.ascent, pieces.ascent_takes_count, grads, state.ascent, params, state.steps
    )


def combine(
    pieces: Pieces, grads: PyTree, perturbed_grads: PyTree, state: MethodState, params: Params
) -> tuple[PyTree, Any]:
    """The combine phase of a full step: ``(gradient, new combiner state)``."""
    return pieces.combiner.update(grads, perturbed_grads, state.combine, params)


def reuse(pieces: Pieces, grads: PyTree, state: MethodState, point: Params) -> tuple[PyTree, Any]:
    """A cheap or one-pass step's gradient from ``g``: ``combiner.reuse``, or ``g`` itself."""
    if pieces.combiner.reuse is None:
        return grads, state.combine
    return pieces.combiner.reuse(grads, state.combine, point)


def decide(pieces: Pieces, grads: PyTree, state: MethodState) -> tuple[torch.Tensor, Any]:
    """A policy that reads the gradient: ``(full, new policy state)`` from ``||g||^2``."""
    assert pieces.policy is not None and pieces.policy.decide is not None
    return pieces.policy.decide(_tree.vdot(grads, grads), state.policy, state.steps)


def advance(state: MethodState, full: bool) -> MethodState:
    """The clock after one more update (``full`` a Python bool)."""
    return state._replace(steps=state.steps + 1, full_steps=state.full_steps + int(full))


def evaluation_point(pieces: Pieces, params: Params, state: MethodState) -> Params:
    """Where a one-pass step takes its gradient: ``w``, or the method's ``point``."""
    return params if pieces.point is None else pieces.point(params, state.combine)


def reads_gradient(pieces: Pieces) -> bool:
    """Whether the policy decides from the first pass's gradient (AE-SAM)."""
    return pieces.policy is not None and pieces.policy.decide is not None


# --- checks -----------------------------------------------------------------------------


def _per_sample(pieces: Pieces) -> bool:
    return pieces.select_fraction is not None


def _aux(pieces: Pieces, run: RunOptions) -> bool:
    return run.has_aux or _per_sample(pieces) or pieces.objective is not None


def _checked(
    pieces: Pieces, loss_fn: LossFn, params: Params, state: Any, run: RunOptions
) -> LossFn:
    """Checks the arguments; ``loss_fn`` wrapped to check its loss (and give ESAM's)."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    check_params(params)
    check_state(pieces.name, state, MethodState)
    if run.nonfinite == "raise":
        refuse_raise_under_compile()
    if _per_sample(pieces) and run.accum_steps > 1:
        raise ValueError(
            f"{pieces.name} ranks the samples of the whole batch, which accum_steps > 1 "
            f"never sees at once; use num_chunks or no accumulation, got {run.accum_steps}"
        )
    if reads_gradient(pieces) and run.num_chunks > 1:
        raise ValueError(
            f"{pieces.name} decides each step from the whole batch's gradient, so it cannot "
            f"cut the batch into chunks with their own ascents; got num_chunks={run.num_chunks}"
        )
    if reads_gradient(pieces) and run.local:
        raise ValueError(
            f"{pieces.name} decides each step from the whole batch's gradient, which "
            "data_parallel mode 'local' never forms: use samfunc.data_parallel('global')"
        )
    if pieces.objective is not None and not run.has_aux:
        raise ValueError(
            f"{pieces.name} needs the model's outputs: pass has_aux=True with a loss_fn that "
            "returns (loss, logits), or use make_module_train_step"
        )
    loss = checked_loss_fn(loss_fn, run.has_aux, _per_sample(pieces))
    return _mean_of_samples(loss, run.has_aux) if _per_sample(pieces) else loss


def _check(grads: PyTree, where: str, value: Any, run: RunOptions, aux: bool, now: bool) -> None:
    # Data-parallel "local": one process's NaN must not raise on that process
    # alone (the others would wait in the all-reduce): a pass not yet averaged
    # over the processes is checked after the step's all-reduce instead.
    if run.nonfinite == "raise" and (now or not run.local):
        raise_if_nonfinite(grads, where, value[0] if aux else value)


# --- one step ---------------------------------------------------------------------------


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
    if is_whole(pieces):
        assert pieces.whole is not None
        return _call_whole(pieces.whole, loss_fn, params, batch, state, run)
    if unscale is not None and is_whole(pieces):
        raise ValueError(f"{pieces.name} takes its own passes, which a loss scale cannot reach")
    loss = _checked(pieces, loss_fn, params, state, run)
    passes = LossPasses(loss, run, _aux(pieces, run), unscale=unscale)
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
    if not full or not _two_pass(pieces):
        return _one_pass(pieces, passes, params, batch, state)
    if run.num_chunks > 1:
        unscale = getattr(passes, "unscale", None)
        grads, value, new_state = _chunked(
            pieces, passes.loss_fn, params, batch, state, run, unscale
        )
    else:
        first_pass = passes.first(params, batch, reduce=run.reduces_each_pass)
        _check(first_pass.grads, FIRST_PASS, first_pass.value, run, passes.aux, False)
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
    loss = _checked(pieces, loss_fn, params, state, run)
    passes = LossPasses(loss, run, _aux(pieces, run), unscale=unscale)
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
    loss = _checked(pieces, loss_fn, params, state, run)
    passes = LossPasses(loss, run, _aux(pieces, run), first.replay, unscale)
    return _finish(pieces, passes, params, batch, state, first, full)


def _first(
    pieces: Pieces, passes: Any, params: Params, batch: Any, state: MethodState
) -> FirstPass:
    done = passes.first(params, batch, reduce=True)
    _check(done.grads, FIRST_PASS, done.value, passes.run, passes.aux, True)
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
    """After the first pass: the ascent, the pass at ``w + e``, and the combiner."""
    if pieces.whole is not None:  # a bare method given a policy: its own grad makes the step
        grads, value, inner = _call_whole(
            pieces.whole, passes.loss_fn, params, batch, state.combine, passes.run
        )
        return grads, value, state._replace(combine=inner)
    e, ascent_state = ascend(pieces, first.grads, state, params)
    perturbed = _tree.add_scaled(params, e, 1.0)
    selected = batch
    if pieces.select_fraction is not None and pieces.select_fraction < 1.0:
        selected = _sharpest(pieces.select_fraction, passes, perturbed, batch, first.value)
    second = passes.second(perturbed, selected)
    if check:
        _check(second.grads, SECOND_PASS, second.value, passes.run, passes.aux, False)
    out, combine_state = combine(pieces, first.grads, second.grads, state, params)
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
    _check(done.grads, ONE_PASS, value, run, True if pieces.objective else passes.aux, True)
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
    if not _per_sample(pieces) or not passes.aux:
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
    aux = _aux(pieces, run)
    single = run._replace(num_chunks=1)

    def one_chunk(chunk: Batch, check: bool) -> tuple[PyTree, Any, MethodState]:
        passes = LossPasses(loss_fn, single, aux, unscale=unscale)
        first = passes.first(params, chunk, reduce=False)
        if check:
            _check(first.grads, FIRST_PASS, first.value, run, aux, False)
        return _full(pieces, passes, params, chunk, state, first, check)

    if run.vectorize_chunks:
        stacked, in_dims = _batch.stack_chunks(batch, run.num_chunks, "num_chunks")
        grads, value, states = vmap(
            lambda chunk: one_chunk(chunk, False), in_dims=(in_dims,), randomness="different"
        )(stacked)
        grads, value = _chunk_mean(grads, value, aux)
        _check(grads, "either pass (in some chunk)", value, run, aux, False)
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
    aux = _aux(pieces, run)
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


# --- a bare method ----------------------------------------------------------------------


def _accepted_options(grad: Callable[..., Any]) -> Optional[frozenset[str]]:
    """The keyword options a bare method's ``grad`` takes (None: any, it has ``**``)."""
    try:
        parameters = inspect.signature(grad).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def _call_whole(
    method: Method, loss_fn: LossFn, params: Params, batch: Any, state: Any, run: RunOptions
) -> tuple[PyTree, Any, Any]:
    """A bare method's own ``grad``, given the options that differ from their defaults."""
    defaults = RunOptions()
    options = {
        name: value for name, value in run._asdict().items() if value != getattr(defaults, name)
    }
    accepted = _accepted_options(method.grad)
    if accepted is not None:
        missing = sorted(set(options) - accepted)
        if missing:
            raise TypeError(
                f"this driver runs the method with {missing[0]}={options[missing[0]]!r}, which "
                f"its grad does not take (its parameters: {sorted(accepted)}): add "
                f"{missing[0]} (or **options) to the grad's signature"
            )
    result = method.grad(loss_fn, params, batch, state, **options)
    if not isinstance(result, tuple) or len(result) != 3:
        raise TypeError(
            "a method's grad must return (grads, loss, new_state), got "
            f"{type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple) else "")
        )
    return result


# --- the built-in methods' grad ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interpreted:
    """A method's ``grad`` and ``init``: the interpreter running its ``pieces``.

    Plain data (it pickles when the pieces do), so a method object travels
    with ``pickle``, ``copy.deepcopy`` and ``torch.save``.
    """

    pieces: Pieces

    def init(self, params: Params) -> Any:
        """The method's first state."""
        return init_state(self.pieces, params)

    def __call__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: OptState,
        *,
        full: Optional[bool] = None,
        **options: Unpack[EngineOptions],
    ) -> tuple[PyTree, Any, Any]:
        """``(grads, loss, new_state)``; ``(grads, (loss, aux), new_state)`` with ``has_aux``.

        ``full`` forces the kind of step (True: both passes; False: one pass at
        ``w``, the gradient from the combiner's ``reuse``); None lets the
        method's policy choose (every step is full without one).
        """
        if full is not None:
            full = check_bool("full", full)
        return interpret(self.pieces, loss_fn, params, batch, state, run_options(options), full)
