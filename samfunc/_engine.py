"""The engine: a sharpness-aware method's passes, written once for every method.

One step of a method built from an ascent and a combiner::

    g, loss = grad L(w)                     first pass, at w
    e, s_a  = ascent.update(g, s_a, w)      the perturbation
    g_s     = grad L(w + e)                 second pass (ESAM: on the sharpest samples)
    out, s_c = combiner.update(g, g_s, s_c, w)

around which the engine adds m-sharpness (``num_chunks``: one ``e`` per chunk
of the batch, in parallel with ``torch.func.vmap`` or in a loop), gradient
accumulation (``accum_steps``), replayed random draws (``reuse_rng``) and the
non-finite check (``nonfinite="raise"``). ``samfunc.sharpness_aware`` turns an
ascent and a combiner into a ``Method`` whose ``grad`` is a ``MethodGrad``.

Examples:
    >>> import torch
    >>> import samfunc
    >>> method = samfunc.sam(rho=0.05)
    >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
    >>> params = {"w": torch.ones(3)}
    >>> state = method.init(params)
    >>> grads, loss, state = method.grad(loss_fn, params, torch.eye(3), state)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
from torch.func import vmap
from typing_extensions import Unpack

from . import _batch, _distributed, _rng, _tree
from ._base import (
    Combiner,
    EngineOptions,
    GradientTransformation,
    LossFn,
    MethodState,
    OptState,
    Params,
    StepPolicy,
    check_state,
)
from ._distributed import DataParallel, check_data_parallel
from ._finite import NonFinitePolicy, check_policy, raise_if_nonfinite, refuse_raise_under_compile
from ._grad import grad_and_value
from ._tree import PyTree
from ._validate import check_bool, check_positive_int

__all__ = [
    "FIRST_PASS",
    "SECOND_PASS",
    "ONE_PASS",
    "ENGINE_POLICIES",
    "RunOptions",
    "run_options",
    "MethodGrad",
    "FirstPass",
    "one_pass",
    "counted",
    "refuse_choice_under_compile",
    "check_params",
    "checked_loss_fn",
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
    """The first pass of a step whose policy reads the gradient (AE-SAM), and its verdict.

    ``MethodGrad.first`` returns it and ``MethodGrad.finish`` takes it, so a
    train step can choose the rest of the step in Python between the two.

    Attributes:
        grads: ``g``, the gradient at ``w``.
        value: the first pass's loss (and aux).
        full: a 0-d bool tensor: whether the policy wants the full step.
        policy: the policy's new state (statistics updated, counters not).
    """

    grads: PyTree
    value: Any
    full: torch.Tensor
    policy: Any


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


def mean_pass(done: Pass, data_parallel: Optional[DataParallel], aux: bool) -> Pass:
    """A pass's gradient and loss averaged over the data-parallel processes (one all-reduce)."""
    if data_parallel is None:
        return done
    loss = done.value[0] if aux else done.value
    grads, loss, _ = _distributed.mean_with_loss(done.grads, loss, (), data_parallel.group)
    return Pass(grads, (loss, done.value[1]) if aux else loss)


def one_pass(
    grad_fn: Callable[..., tuple[PyTree, Any]],
    params: Params,
    batch: Batch,
    run: RunOptions,
    aux: bool,
) -> Pass:
    """One gradient over the whole batch, cut into parts as ``run`` says.

    Chunks (``num_chunks``) run with ``vmap`` or in a loop, as a method's
    passes do, so ``aux`` has the same leading axis whichever kind of step
    made it; ``accum_steps`` accumulates. The gradient is the parts' mean, and
    with ``data_parallel`` (either mode) the mean over every process's batch.
    """
    if run.num_chunks > 1 and run.vectorize_chunks:
        stacked, in_dims = _batch.stack_chunks(batch, run.num_chunks, "num_chunks")
        grads, value = vmap(
            lambda chunk: grad_fn(params, chunk), in_dims=(in_dims,), randomness="different"
        )(stacked)
        return mean_pass(_chunk_mean(grads, value, aux), run.data_parallel, aux)
    parts = run.num_chunks * run.accum_steps
    if parts > 1:
        name = "num_chunks" if run.num_chunks > 1 else "accum_steps"
        grads, values = _batch.accumulate(grad_fn, params, _batch.split_batch(batch, parts, name))
        return mean_pass(Pass(grads, _batch.mean_values(values, aux)), run.data_parallel, aux)
    return mean_pass(Pass(*grad_fn(params, batch)), run.data_parallel, aux)


def counted(policy_state: Any, full: bool) -> Any:
    """The policy's counters after one more step (``full`` a Python bool)."""
    if policy_state == ():
        return policy_state
    return policy_state._replace(
        steps=policy_state.steps + 1, full_steps=policy_state.full_steps + int(full)
    )


class MethodGrad:
    """A method's ``grad``: the engine running one ascent and one combiner.

    Built by ``samfunc.sharpness_aware``; the ``SAM`` class reads its pieces.

    Attributes:
        ascent: the transform from ``g`` to ``e``.
        combiner: how ``g`` and ``g_s`` become the method's gradient.
        select_fraction: ESAM's data selection: the second pass runs on this
            fraction of the samples with the largest ``loss(w + e) - loss(w)``
            (``loss_fn`` returns per-sample losses); None for the whole batch.
        name: the method's name, for error messages.
        policy: which steps are full (both passes) and which cheap (one pass
            at ``w``, the gradient from ``combiner.reuse``); None: all full.
    """

    def __init__(
        self,
        ascent: GradientTransformation,
        combiner: Combiner,
        select_fraction: Optional[float] = None,
        name: str = "sharpness_aware",
        uses_first_gradient: bool = True,
        policy: Optional[StepPolicy] = None,
    ) -> None:
        self.ascent = ascent
        self.combiner = combiner
        self.select_fraction = select_fraction
        self.name = name
        self.policy = policy
        #: Whether the combiner reads ``g`` (the ``SAM`` class then keeps a copy).
        self.uses_first_gradient = uses_first_gradient

    @property
    def per_sample(self) -> bool:
        """Whether ``loss_fn`` must return one loss per sample."""
        return self.select_fraction is not None

    def init(self, params: Params) -> MethodState:
        """The method's first state."""
        policy = () if self.policy is None else self.policy.init(params)
        return MethodState(self.ascent.init(params), self.combiner.init(params), policy)

    @property
    def reads_gradient(self) -> bool:
        """Whether the policy decides from the first pass's gradient (AE-SAM)."""
        return self.policy is not None and self.policy.decide is not None

    def __call__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: OptState,
        *,
        full: Optional[bool] = None,
        **options: Unpack[EngineOptions],
    ) -> tuple[PyTree, Any, MethodState]:
        """``(grads, loss, new_state)``; ``(grads, (loss, aux), new_state)`` with ``has_aux``.

        ``full`` forces the kind of step (True: both passes; False: one pass at
        ``w``, the gradient from the combiner's ``reuse``); None lets the
        method's policy choose (every step is full without one).
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if full is not None:
            full = check_bool("full", full)
        return self.run(loss_fn, params, batch, state, run_options(options), full)

    def _checked(self, loss_fn: LossFn, params: Params, state: OptState, run: RunOptions) -> LossFn:
        """Checks the arguments; ``loss_fn`` wrapped to check its loss (and give ESAM's)."""
        check_params(params)
        check_state(self.name, state, MethodState)
        if run.nonfinite == "raise":
            refuse_raise_under_compile()
        if self.per_sample and run.accum_steps > 1:
            raise ValueError(
                f"{self.name} ranks the samples of the whole batch, which accum_steps > 1 "
                f"never sees at once; use num_chunks or no accumulation, got {run.accum_steps}"
            )
        if self.reads_gradient and run.num_chunks > 1:
            raise ValueError(
                f"{self.name} decides each step from the whole batch's gradient, so it cannot "
                f"cut the batch into chunks with their own ascents; got num_chunks={run.num_chunks}"
            )
        if self.reads_gradient and run.local:
            raise ValueError(
                f"{self.name} decides each step from the whole batch's gradient, which "
                "data_parallel mode 'local' never forms: use samfunc.data_parallel('global')"
            )
        if self.policy is not None and state.policy == ():
            raise ValueError(
                f"{self.name} has a step policy, but the state has none: build the state with "
                "this method's init(params)"
            )
        loss = checked_loss_fn(loss_fn, run.has_aux, self.per_sample)
        return _mean_of_samples(loss, run.has_aux) if self.per_sample else loss

    def run(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: OptState,
        run: RunOptions,
        full: Optional[bool] = None,
    ) -> tuple[PyTree, Any, MethodState]:
        """``__call__`` with options checked beforehand (the train steps call this)."""
        loss = self._checked(loss_fn, params, state, run)
        if self.reads_gradient:
            with _rng.RNG_LOCK if run.reuse_rng else contextlib.nullcontext():
                first = self._first(loss, params, batch, state, run)
                if full is None:
                    refuse_choice_under_compile(self.name)
                    full = bool(first.full)
                return self._finish(loss, params, batch, state, first, run, full)
        if full is None:
            full = self.planned(state)
        if not full:
            grads, value, new_state = self._cheap(loss, params, batch, state, run)
        elif run.num_chunks > 1:
            grads, value, new_state = self._chunked(loss, params, batch, state, run)
        elif run.accum_steps > 1:
            grads, value, new_state = self._accumulated(loss, params, batch, state, run)
        else:
            grads, value, new_state = self._single(loss, params, batch, state, run, check=True)
        if full and run.local:
            grads, value, new_state = self._mean_of_processes(grads, value, new_state, run)
        new_state = new_state._replace(policy=counted(new_state.policy, full))
        return grads, self._reported(value, run.has_aux), new_state

    def _mean_of_processes(
        self, grads: PyTree, value: Any, state: MethodState, run: RunOptions
    ) -> tuple[PyTree, Any, MethodState]:
        """Data-parallel ``"local"``: the step's results averaged over the processes.

        The method's output, the loss and the state's floating-point leaves on
        the gradient's device go in one all-reduce, as ``num_chunks`` averages
        its chunks' results; so over ``P`` processes a step equals one process
        with ``num_chunks=P`` on the concatenated batch. Leaves elsewhere (a
        policy's CPU counters and statistics) agree on every process already.
        """
        assert run.data_parallel is not None
        aux = run.has_aux or self.per_sample
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

    def planned(self, state: MethodState) -> bool:
        """Whether the policy makes this step full, read (in Python) from ``state``."""
        if self.policy is None:
            return True
        refuse_choice_under_compile(self.name)
        planned = self.policy.plan(int(state.policy.steps))
        assert planned is not None, "a policy that reads the gradient goes through first()"
        return planned

    def first(
        self, loss_fn: LossFn, params: Params, batch: Any, state: OptState, run: RunOptions
    ) -> FirstPass:
        """The first pass and the policy's verdict on it (for a policy that reads ``g``)."""
        if not self.reads_gradient:
            raise TypeError(f"{self.name}'s policy does not read the gradient: call it whole")
        return self._first(self._checked(loss_fn, params, state, run), params, batch, state, run)

    def finish(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: OptState,
        first: FirstPass,
        run: RunOptions,
        full: bool,
    ) -> tuple[PyTree, Any, MethodState]:
        """The rest of the step after ``first``: the full step if ``full``, else the cheap one."""
        loss = self._checked(loss_fn, params, state, run)
        return self._finish(loss, params, batch, state, first, run, full)

    def _first(
        self, loss_fn: LossFn, params: Params, batch: Any, state: MethodState, run: RunOptions
    ) -> FirstPass:
        assert self.policy is not None and self.policy.decide is not None
        aux = run.has_aux or self.per_sample
        grads, value = one_pass(self._grad_fn(loss_fn, run), params, batch, run, aux)
        self._check(grads, FIRST_PASS, value, run, averaged=True)
        full, policy = self.policy.decide(_tree.vdot(grads, grads), state.policy)
        return FirstPass(grads, value, full, policy)

    def _finish(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: MethodState,
        first: FirstPass,
        run: RunOptions,
        full: bool,
    ) -> tuple[PyTree, Any, MethodState]:
        state = state._replace(policy=first.policy)
        done = Pass(first.grads, first.value)
        if not full:
            grads, new_state = self.reuse(done.grads, state, params)
        elif run.accum_steps > 1:
            parts = _batch.split_batch(batch, run.accum_steps, "accum_steps")
            grads, _, new_state = self._second_accumulated(loss_fn, params, parts, state, done, run)
        else:
            grad_fn = self._grad_fn(loss_fn, run)
            grads, _, new_state = self._second(
                loss_fn, grad_fn, params, batch, state, done, run, None, True
            )
        new_state = new_state._replace(policy=counted(new_state.policy, full))
        return grads, self._reported(first.value, run.has_aux), new_state

    def reuse(
        self, grads: PyTree, state: MethodState, params: Params
    ) -> tuple[PyTree, MethodState]:
        """A cheap step's gradient from ``g``: the combiner's ``reuse``, or ``g`` itself."""
        if self.combiner.reuse is None:
            return grads, state
        out, combine_state = self.combiner.reuse(grads, state.combine, params)
        return out, state._replace(combine=combine_state)

    def _cheap(
        self, loss_fn: LossFn, params: Params, batch: Any, state: MethodState, run: RunOptions
    ) -> tuple[PyTree, Any, MethodState]:
        """One pass at ``w`` and the combiner's ``reuse``: a cheap step."""
        aux = run.has_aux or self.per_sample
        grads, value = one_pass(self._grad_fn(loss_fn, run), params, batch, run, aux)
        self._check(grads, ONE_PASS, value, run, averaged=True)
        out, new_state = self.reuse(grads, state, params)
        return out, value, new_state

    def _reported(self, value: Any, has_aux: bool) -> Any:
        """The loss (and aux) to return, without the per-sample losses kept for ESAM."""
        if not self.per_sample:
            return value
        loss, (_, aux) = value
        return (loss, aux) if has_aux else loss

    @staticmethod
    def _process_mean(grads: PyTree, run: RunOptions) -> PyTree:
        assert run.data_parallel is not None
        return _distributed.all_mean(grads, run.data_parallel.group)

    def _grad_fn(self, loss_fn: LossFn, run: RunOptions) -> Callable[..., tuple[PyTree, Any]]:
        return grad_and_value(loss_fn, has_aux=run.has_aux or self.per_sample)

    def _check(
        self, grads: PyTree, where: str, value: Any, run: RunOptions, averaged: bool = False
    ) -> None:
        # Data-parallel "local": one process's NaN must not raise on that process
        # alone (the others would wait in the all-reduce): a pass not yet averaged
        # over the processes is checked after the step's all-reduce instead.
        if run.nonfinite == "raise" and (averaged or not run.local):
            loss = value[0] if run.has_aux or self.per_sample else value
            raise_if_nonfinite(grads, where, loss)

    def _single(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Batch,
        state: MethodState,
        run: RunOptions,
        check: bool,
    ) -> tuple[PyTree, Any, MethodState]:
        """Both passes on one batch (or one chunk: ``check`` False inside vmap)."""
        grad_fn = self._grad_fn(loss_fn, run)
        with _rng.RNG_LOCK if run.reuse_rng else contextlib.nullcontext():
            replay = _rng.capture(_tree.leaves(params)) if run.reuse_rng else None
            first = Pass(*grad_fn(params, batch))
            if run.reduces_each_pass:
                first = mean_pass(first, run.data_parallel, run.has_aux or self.per_sample)
            if check:
                self._check(first.grads, FIRST_PASS, first.value, run)
            return self._second(loss_fn, grad_fn, params, batch, state, first, run, replay, check)

    def _second(
        self,
        loss_fn: LossFn,
        grad_fn: Callable[..., tuple[PyTree, Any]],
        params: Params,
        batch: Batch,
        state: MethodState,
        first: Pass,
        run: RunOptions,
        replay: Optional[_rng.RngStates],
        check: bool,
    ) -> tuple[PyTree, Any, MethodState]:
        """The ascent from ``g``, the pass at ``w + e``, and the combiner."""
        e, ascent_state = self.ascent.update(first.grads, state.ascent, params)
        perturbed = _tree.add_scaled(params, e, 1.0)
        second = self._second_pass(loss_fn, grad_fn, perturbed, batch, first.value, replay)
        if run.reduces_each_pass:
            second = Pass(self._process_mean(second.grads, run), second.value)
        if check:
            self._check(second.grads, SECOND_PASS, second.value, run)
        out, combine_state = self.combiner.update(first.grads, second.grads, state.combine, params)
        return out, first.value, state._replace(ascent=ascent_state, combine=combine_state)

    def _second_pass(
        self,
        loss_fn: LossFn,
        grad_fn: Callable[..., tuple[PyTree, Any]],
        perturbed: Params,
        batch: Batch,
        first_value: Any,
        replay: Optional[_rng.RngStates],
    ) -> Pass:
        """The pass at ``w + e``, on the first pass's random draws with ``replay``."""

        def at(fn: Callable[[], Any]) -> Any:
            return fn() if replay is None else _rng.replayed(replay, fn)

        selected = batch
        if self.select_fraction is not None:
            selected = self._sharpest(loss_fn, perturbed, batch, first_value, at)
        return Pass(*at(lambda: grad_fn(perturbed, selected)))

    def _sharpest(
        self,
        loss_fn: LossFn,
        perturbed: Params,
        batch: Batch,
        first_value: Any,
        at: Callable[[Callable[[], Any]], Any],
    ) -> Batch:
        """ESAM's data selection: the samples whose loss rose most from ``w`` to ``w + e``."""
        assert self.select_fraction is not None
        before = first_value[1][0]
        count = before.shape[0]
        keep = max(1, int(count * self.select_fraction))
        if keep >= count:
            return batch
        with torch.no_grad():
            after = at(lambda: loss_fn(perturbed, batch))[1][0]
        index = torch.topk(after - before, keep, sorted=False).indices
        return _batch.select_samples(batch, index)

    def _accumulated(
        self, loss_fn: LossFn, params: Params, batch: Batch, state: MethodState, run: RunOptions
    ) -> tuple[PyTree, Any, MethodState]:
        """Both gradients accumulated over micro-batches, one micro-batch alive at a time."""
        parts = _batch.split_batch(batch, run.accum_steps, "accum_steps")
        grad_fn = self._grad_fn(loss_fn, run)
        aux = run.has_aux or self.per_sample
        grads, values = _batch.accumulate(grad_fn, params, parts)
        first = Pass(grads, _batch.mean_values(values, aux))
        if run.reduces_each_pass:
            first = mean_pass(first, run.data_parallel, aux)
        self._check(first.grads, FIRST_PASS, first.value, run)
        return self._second_accumulated(loss_fn, params, parts, state, first, run)

    def _second_accumulated(
        self,
        loss_fn: LossFn,
        params: Params,
        parts: list[Batch],
        state: MethodState,
        first: Pass,
        run: RunOptions,
    ) -> tuple[PyTree, Any, MethodState]:
        """The ascent, the second pass accumulated over ``parts``, and the combiner."""
        grad_fn = self._grad_fn(loss_fn, run)
        e, ascent_state = self.ascent.update(first.grads, state.ascent, params)
        perturbed = _tree.add_scaled(params, e, 1.0)
        sam_grads, perturbed_values = _batch.accumulate(grad_fn, perturbed, parts)
        if run.reduces_each_pass:
            sam_grads = self._process_mean(sam_grads, run)
        aux = run.has_aux or self.per_sample
        self._check(sam_grads, SECOND_PASS, _batch.mean_values(perturbed_values, aux), run)
        out, combine_state = self.combiner.update(first.grads, sam_grads, state.combine, params)
        return out, first.value, state._replace(ascent=ascent_state, combine=combine_state)

    def _chunked(
        self, loss_fn: LossFn, params: Params, batch: Batch, state: MethodState, run: RunOptions
    ) -> tuple[PyTree, Any, MethodState]:
        """m-sharpness: one ``e`` per chunk, the gradients averaged.

        Each chunk starts from ``state``; the new state is the mean of the
        chunks' floating-point states (for a moving average of gradients, the
        average of the whole batch's gradient) and the first chunk's counters.
        """
        aux = run.has_aux or self.per_sample
        if run.vectorize_chunks:
            stacked, in_dims = _batch.stack_chunks(batch, run.num_chunks, "num_chunks")

            def one_chunk(chunk: Batch) -> tuple[PyTree, Any, MethodState]:
                return self._single(loss_fn, params, chunk, state, run, check=False)

            grads, value, states = vmap(one_chunk, in_dims=(in_dims,), randomness="different")(
                stacked
            )
            grads, value = _chunk_mean(grads, value, aux)
            self._check(grads, "either pass (in some chunk)", value, run)
        else:
            results = [
                self._single(loss_fn, params, chunk, state, run, check=True)
                for chunk in _batch.split_batch(batch, run.num_chunks, "num_chunks")
            ]
            grads = _batch.mean_trees([result[0] for result in results])
            value = _batch.mean_values([result[1] for result in results], aux)
            states = _batch.stack_trees([result[2] for result in results])
        return grads, value, _tree.tree_map(_merge_chunks, states)


def _merge_chunks(stacked: torch.Tensor) -> torch.Tensor:
    """One chunk-stacked state leaf back to one: the mean if floating, else the first."""
    return stacked.mean(0) if stacked.is_floating_point() else stacked[0]
