"""The phases of a method, read from its pieces: the functions every driver calls.

``ascend``, ``combine``, ``reuse``, ``decide``, ``advance`` and
``evaluation_point`` are each one piece of a ``samfunc.Pieces`` record
applied to a ``MethodState``; ``kind_of_step`` reads the clock;
``call_whole`` runs a bare ``Method(init, grad)``.

Examples:
    >>> import torch
    >>> import samfunc
    >>> pieces = samfunc.sam(0.5).pieces
    >>> params = {"w": torch.tensor([3.0, 4.0])}
    >>> state = init_state(pieces, params)
    >>> e, _ = ascend(pieces, params, state, params)
    >>> e["w"]
    tensor([0.3000, 0.4000])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional

import torch

from . import _tree
from ._base import (
    Combiner,
    EmptyState,
    LossFn,
    Method,
    MethodState,
    OptState,
    Params,
    Pieces,
    StateMismatchError,
    check_state,
)
from ._combine import takes_count, update_with_count
from ._finite import raise_if_nonfinite, refuse_raise_under_compile
from ._options import (
    ENGINE_OPTIONS,
    FIRST_PASS,
    SECOND_PASS,
    RunOptions,
    check_params,
    checked_loss_fn,
    mean_of_samples,
)
from ._passes import refuse_choice_under_compile
from ._tree import PyTree

__all__ = [
    "IDENTITY",
    "pieces_of",
    "ascent_pieces",
    "is_whole",
    "two_pass",
    "init_state",
    "kind_of_step",
    "ascend",
    "combine",
    "reuse",
    "decide",
    "advance",
    "evaluation_point",
    "reads_gradient",
    "per_sample",
    "aux_of",
    "checked",
    "check_method_state",
    "check_pass",
    "check_step",
    "accepted_options",
    "call_whole",
]


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
IDENTITY = Combiner(_no_state, _first_gradient, reads_first_gradient=False, state_type=EmptyState)


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


def two_pass(pieces: Pieces) -> bool:
    """Whether the method takes a second pass on its full steps (a one-pass one never does)."""
    return pieces.ascent is not None or pieces.whole is not None


def kind_of_step(pieces: Pieces, state: MethodState) -> Optional[bool]:
    """Whether the next step is full (True), cheap (False), or the gradient decides (None).

    Read in Python from the clock (a CPU tensor: no device sync).
    """
    if not two_pass(pieces):
        return False
    if pieces.policy is None:
        return True
    refuse_choice_under_compile(pieces.name)
    return pieces.policy.plan(int(state.steps))


def ascend(pieces: Pieces, grads: PyTree, state: MethodState, params: Params) -> tuple[Any, Any]:
    """The ascent phase: ``(e, new ascent state)`` from ``g``, at the clock's count."""
    assert pieces.ascent is not None
    try:
        return update_with_count(
            pieces.ascent, pieces.ascent_takes_count, grads, state.ascent, params, state.steps
        )
    except StateMismatchError as error:
        raise _foreign(pieces, _unfit("ascent", error)) from None


def combine(
    pieces: Pieces, grads: PyTree, perturbed_grads: PyTree, state: MethodState, params: Params
) -> tuple[PyTree, Any]:
    """The combine phase of a full step: ``(gradient, new combiner state)``."""
    try:
        return pieces.combiner.update(grads, perturbed_grads, state.combine, params)
    except StateMismatchError as error:
        raise _foreign(pieces, _unfit("combine", error)) from None


def reuse(pieces: Pieces, grads: PyTree, state: MethodState, point: Params) -> tuple[PyTree, Any]:
    """A cheap or one-pass step's gradient from ``g``: ``combiner.reuse``, or ``g`` itself."""
    if pieces.combiner.reuse is None:
        return grads, state.combine
    try:
        return pieces.combiner.reuse(grads, state.combine, point)
    except StateMismatchError as error:
        raise _foreign(pieces, _unfit("combine", error)) from None


def decide(pieces: Pieces, grads: PyTree, state: MethodState) -> tuple[torch.Tensor, Any]:
    """A policy that reads the gradient: ``(full, new policy state)`` from ``||g||^2``."""
    assert pieces.policy is not None and pieces.policy.decide is not None
    try:
        return pieces.policy.decide(_tree.vdot(grads, grads), state.policy, state.steps)
    except StateMismatchError as error:
        raise _foreign(pieces, _unfit("policy", error)) from None


def _is_empty(part: Any) -> bool:
    return type(part) is tuple and not part


def _unfit(part: str, error: StateMismatchError) -> str:
    """A piece's own error, as what is wrong with the method state's ``part``."""
    return f"its {part} part does not fit ({error})"


def _foreign(pieces: Pieces, what: str) -> StateMismatchError:
    """The method's error for a state another method made; ``what`` says which part is wrong."""
    return StateMismatchError(
        f"{pieces.name} got a method state made by another method's init: {what}. Build it "
        f"with the same method: {pieces.name}'s init(params), or init_train_state(..., "
        "method=the same method)"
    )


def advance(state: MethodState, full: bool) -> MethodState:
    """The clock after one more update (``full`` a Python bool)."""
    if not full:
        return state._replace(steps=state.steps + 1)
    if state.steps.device == state.full_steps.device and _tree.fused_ops():  # one op
        steps, full_steps = torch._foreach_add([state.steps, state.full_steps], 1)
        return state._replace(steps=steps, full_steps=full_steps)
    return state._replace(steps=state.steps + 1, full_steps=state.full_steps + 1)


def evaluation_point(pieces: Pieces, params: Params, state: MethodState) -> Params:
    """Where a one-pass step takes its gradient: ``w``, or the method's ``point``."""
    return params if pieces.point is None else pieces.point(params, state.combine)


def reads_gradient(pieces: Pieces) -> bool:
    """Whether the policy decides from the first pass's gradient (AE-SAM)."""
    return pieces.policy is not None and pieces.policy.decide is not None


def per_sample(pieces: Pieces) -> bool:
    """Whether ``loss_fn`` must return one loss per sample (ESAM's data selection)."""
    return pieces.select_fraction is not None


def aux_of(pieces: Pieces, run: RunOptions) -> bool:
    """Whether the passes' loss returns ``(loss, aux)``: asked for, or the method needs it."""
    return run.has_aux or per_sample(pieces) or pieces.objective is not None


def checked(pieces: Pieces, loss_fn: LossFn, params: Params, state: Any, run: RunOptions) -> LossFn:
    """Checks the arguments; ``loss_fn`` wrapped to check its loss (and give ESAM's)."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    check_params(params)
    check_method_state(pieces, state)
    if run.nonfinite == "raise":
        refuse_raise_under_compile()
    if per_sample(pieces) and run.accum_steps > 1:
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
    loss = checked_loss_fn(loss_fn, run.has_aux, per_sample(pieces))
    return mean_of_samples(loss, run.has_aux) if per_sample(pieces) else loss


def check_method_state(pieces: Pieces, state: Any) -> None:
    """A ``MethodState`` whose parts this method's pieces made, or an error naming the method.

    The combine part's type (``Combiner.state_type``) and whether there is a
    policy part are checked here; each piece checks the rest of its own part
    when it runs (``ascend``, ``decide`` restate its error for the method).
    """
    if pieces.whole is not None and pieces.policy is None:
        return  # a bare method's own state, whatever it is
    check_state(pieces.name, state, MethodState)
    expected = pieces.combiner.state_type
    if expected is not None and pieces.whole is None and not isinstance(state.combine, expected):
        found = type(state.combine).__name__
        raise _foreign(
            pieces, f"its combine part is {found}, where {pieces.name} keeps {expected.__name__}"
        )
    if pieces.policy is None and pieces.whole is None and not _is_empty(state.policy):
        found = type(state.policy).__name__
        raise _foreign(pieces, f"its policy part does not fit ({found}, where there is no policy)")


def check_pass(
    grads: PyTree, where: str, value: Any, run: RunOptions, aux: bool, now: bool
) -> None:
    # Data-parallel "local": one process's NaN must not raise on that process
    # alone (the others would wait in the all-reduce): a pass not yet averaged
    # over the processes is checked after the step's all-reduce instead.
    if run.nonfinite == "raise" and (now or not run.local):
        raise_if_nonfinite(grads, where, value[0] if aux else value)


def check_step(out: PyTree, passes: tuple[Any, Any], run: RunOptions, aux: bool) -> None:
    """The full step's one non-finite check, on its gradient ``out`` (``"raise"`` only).

    A NaN or inf in either pass reaches ``out`` (the ascent's norm is global);
    when ``out`` is not finite the error names the pass it came from. As
    ``check_pass``, data-parallel ``"local"`` checks after the step's all-reduce.
    """
    if run.nonfinite != "raise" or run.local or _tree.norm_is_finite(out):
        return
    first, second = passes
    check_pass(first.grads, FIRST_PASS, first.value, run, aux, True)
    check_pass(second.grads, SECOND_PASS, second.value, run, aux, True)
    raise_if_nonfinite(out, "the method's combination of both passes")


def accepted_options(grad: Callable[..., Any]) -> Optional[frozenset[str]]:
    """The keyword options a bare method's ``grad`` takes (None: any, it has ``**``)."""
    try:
        parameters = inspect.signature(grad).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def call_whole(
    method: Method, loss_fn: LossFn, params: Params, batch: Any, state: Any, run: RunOptions
) -> tuple[PyTree, Any, Any]:
    """A bare method's own ``grad``, given the options that differ from their defaults.

    The non-finite policy is the driver's, applied here to what the method
    returns: a ``grad`` need not take ``nonfinite``.
    """
    defaults = RunOptions()
    options = {
        name: value
        for name, value in run._asdict().items()
        if value != getattr(defaults, name) and name in ENGINE_OPTIONS and name != "nonfinite"
    }
    accepted = accepted_options(method.grad)
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
    if run.nonfinite == "raise":
        refuse_raise_under_compile()
        value = result[1]
        raise_if_nonfinite(result[0], "the method's gradient", value[0] if run.has_aux else value)
    return result
