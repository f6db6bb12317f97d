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

Example:
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

from . import _batch, _rng, _tree
from ._base import (
    Combiner,
    EngineOptions,
    GradientTransformation,
    LossFn,
    MethodState,
    OptState,
    Params,
    check_state,
)
from ._finite import NonFinitePolicy, check_policy, raise_if_nonfinite, refuse_raise_under_compile
from ._grad import grad_and_value
from ._tree import PyTree
from ._validate import check_bool, check_positive_int

__all__ = [
    "FIRST_PASS",
    "SECOND_PASS",
    "ENGINE_POLICIES",
    "RunOptions",
    "run_options",
    "MethodGrad",
    "check_params",
    "checked_loss_fn",
]

FIRST_PASS = "the first pass, at w"
SECOND_PASS = "the second pass, at w + e"

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
    return RunOptions(
        has_aux=check_bool("has_aux", merged.has_aux),
        num_chunks=num_chunks,
        accum_steps=accum_steps,
        vectorize_chunks=check_bool("vectorize_chunks", merged.vectorize_chunks),
        reuse_rng=check_bool("reuse_rng", merged.reuse_rng),
        nonfinite=check_policy("nonfinite", merged.nonfinite, ENGINE_POLICIES),
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


class _Pass(NamedTuple):
    grads: PyTree
    value: Any


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
    """

    def __init__(
        self,
        ascent: GradientTransformation,
        combiner: Combiner,
        select_fraction: Optional[float] = None,
        name: str = "sharpness_aware",
        uses_first_gradient: bool = True,
    ) -> None:
        self.ascent = ascent
        self.combiner = combiner
        self.select_fraction = select_fraction
        self.name = name
        #: Whether the combiner reads ``g`` (the ``SAM`` class then keeps a copy).
        self.uses_first_gradient = uses_first_gradient

    @property
    def per_sample(self) -> bool:
        """Whether ``loss_fn`` must return one loss per sample."""
        return self.select_fraction is not None

    def init(self, params: Params) -> MethodState:
        """The method's first state."""
        return MethodState(self.ascent.init(params), self.combiner.init(params))

    def __call__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: OptState,
        **options: Unpack[EngineOptions],
    ) -> tuple[PyTree, Any, MethodState]:
        """``(grads, loss, new_state)``; ``(grads, (loss, aux), new_state)`` with ``has_aux``."""
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        return self.run(loss_fn, params, batch, state, run_options(options))

    def run(
        self, loss_fn: LossFn, params: Params, batch: Any, state: OptState, run: RunOptions
    ) -> tuple[PyTree, Any, MethodState]:
        """``__call__`` with options checked beforehand (the train steps call this)."""
        check_params(params)
        check_state(self.name, state, MethodState)
        if run.nonfinite == "raise":
            refuse_raise_under_compile()
        if self.per_sample and run.accum_steps > 1:
            raise ValueError(
                f"{self.name} ranks the samples of the whole batch, which accum_steps > 1 "
                f"never sees at once; use num_chunks or no accumulation, got {run.accum_steps}"
            )
        loss = checked_loss_fn(loss_fn, run.has_aux, self.per_sample)
        if self.per_sample:
            loss = _mean_of_samples(loss, run.has_aux)
        if run.num_chunks > 1:
            grads, value, new_state = self._chunked(loss, params, batch, state, run)
        elif run.accum_steps > 1:
            grads, value, new_state = self._accumulated(loss, params, batch, state, run)
        else:
            grads, value, new_state = self._single(loss, params, batch, state, run, check=True)
        return grads, self._reported(value, run.has_aux), new_state

    def _reported(self, value: Any, has_aux: bool) -> Any:
        """The loss (and aux) to return, without the per-sample losses kept for ESAM."""
        if not self.per_sample:
            return value
        loss, (_, aux) = value
        return (loss, aux) if has_aux else loss

    def _grad_fn(self, loss_fn: LossFn, run: RunOptions) -> Callable[..., tuple[PyTree, Any]]:
        return grad_and_value(loss_fn, has_aux=run.has_aux or self.per_sample)

    def _check(self, grads: PyTree, where: str, value: Any, run: RunOptions) -> None:
        if run.nonfinite == "raise":
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
            grads, value = grad_fn(params, batch)
            if check:
                self._check(grads, FIRST_PASS, value, run)
            e, ascent_state = self.ascent.update(grads, state.ascent, params)
            perturbed = _tree.add_scaled(params, e, 1.0)
            second = self._second_pass(loss_fn, grad_fn, perturbed, batch, value, replay)
        if check:
            self._check(second.grads, SECOND_PASS, second.value, run)
        out, combine_state = self.combiner.update(grads, second.grads, state.combine, params)
        return out, value, MethodState(ascent_state, combine_state)

    def _second_pass(
        self,
        loss_fn: LossFn,
        grad_fn: Callable[..., tuple[PyTree, Any]],
        perturbed: Params,
        batch: Batch,
        first_value: Any,
        replay: Optional[_rng.RngStates],
    ) -> _Pass:
        """The pass at ``w + e``, on the first pass's random draws with ``replay``."""

        def at(fn: Callable[[], Any]) -> Any:
            return fn() if replay is None else _rng.replayed(replay, fn)

        selected = batch
        if self.select_fraction is not None:
            selected = self._sharpest(loss_fn, perturbed, batch, first_value, at)
        return _Pass(*at(lambda: grad_fn(perturbed, selected)))

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
        value = _batch.mean_values(values, aux)
        self._check(grads, FIRST_PASS, value, run)
        e, ascent_state = self.ascent.update(grads, state.ascent, params)
        perturbed = _tree.add_scaled(params, e, 1.0)
        sam_grads, perturbed_values = _batch.accumulate(grad_fn, perturbed, parts)
        self._check(sam_grads, SECOND_PASS, _batch.mean_values(perturbed_values, aux), run)
        out, combine_state = self.combiner.update(grads, sam_grads, state.combine, params)
        return out, value, MethodState(ascent_state, combine_state)

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
            grads = _tree.tree_map(lambda g: g.mean(0), grads)
            value = (value[0].mean(0), value[1]) if aux else value.mean(0)
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
