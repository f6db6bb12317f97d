"""The sharpness-aware gradient, as pure functions built on ``torch.func``.

SAM (Foret et al., 2021) evaluates the gradient at the worst point of a small
ball around the weights::

    g   = grad L(w)
    e   = rho * g / (||g||_2 + 1e-12)        one global L2 norm over every leaf
    g_s = grad L(w + e)                      the SAM gradient, used to update w

Adaptive SAM (ASAM, Kwon et al., 2021) rescales the ball by ``T = |w| + eta``:
``e = rho * T**2 g / (||T g||_2 + 1e-12)``.

These are the stateless shortcuts to ``samfunc.sam()``: ``sam_grad`` runs its
``grad`` with a fresh state, and ``perturbation`` is its ascent
(``samfunc.sam_ascent``), the one place in samfunc where SAM's ``e`` is
computed; the train steps and the ``SAM`` class go through the same pieces.

Examples:
    >>> import torch
    >>> import samfunc
    >>> def loss_fn(params, batch):
    ...     x, y = batch
    ...     return ((x @ params["w"] - y) ** 2).mean()
    >>> params = {"w": torch.zeros(3)}
    >>> batch = (torch.eye(3), torch.ones(3))
    >>> grads, loss = samfunc.sam_grad(loss_fn, params, batch, rho=0.05)
    >>> float(loss)
    1.0
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, overload

import torch
from typing_extensions import Unpack

from . import _tree
from ._ascent import mask_flags, sam_ascent
from ._base import (
    SAM_OPTION_NAMES,
    LossFn,
    Params,
    PassOptions,
    PerturbationOptions,
    Rho,
    SamOptions,
)
from ._interpreted import sam_method
from ._options import run_options
from ._tree import PyTree
from ._validate import check_bool, check_rho

__all__ = [
    "SamGradOptions",
    "perturbation",
    "perturbed_params",
    "sam_grad",
    "sam_grad_and_value",
]

Batch = PyTree


class SamGradOptions(SamOptions, PassOptions, total=False):
    """``sam_grad``'s options: ``SamOptions`` and ``PassOptions``.

    That is SAM's ``rho``, ``adaptive``, ``eta``, ``norm`` and ``mask``, and the
    engine's ``num_chunks``, ``accum_steps``, ``vectorize_chunks``,
    ``reuse_rng`` and ``nonfinite``.
    """


def perturbation(
    params: Params, grads: PyTree, rho: Rho = 0.05, **options: Unpack[PerturbationOptions]
) -> PyTree:
    """Returns SAM's ascent step ``e`` (a tree like ``params``); mutates nothing.

    Args:
        params: the weights ``w``, a pytree of floating-point tensors.
        grads: ``grad L(w)``, with the structure of ``params``.
        rho: the radius, a float or a 0-d tensor (a tensor can change between
            calls under ``torch.compile`` without a recompile).
        **options: ``adaptive``, ``eta``, ``norm`` and ``mask``; see
            ``samfunc.PerturbationOptions``.

    Returns:
        ``e``. For ``norm="l2"``, ``||e / T||_2 = rho`` unless ``g`` is zero, in
        which case ``e`` is zero.

    Examples:
        >>> import torch
        >>> e = perturbation({"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([3.0, 4.0])}, 0.5)
        >>> e["w"]
        tensor([0.3000, 0.4000])
    """
    _tree.check_same_structure(params, grads, "params", "grads")
    ascent = sam_ascent(rho, **options)
    e, _ = ascent.update(grads, ascent.init(params), params)
    return e


def perturbed_params(
    params: Params, grads: PyTree, rho: Rho = 0.05, **options: Unpack[PerturbationOptions]
) -> Params:
    """Returns ``params + perturbation(params, grads, ...)``; mutates nothing.

    Leaves that ``mask`` leaves out come back as they are (the same tensor
    objects); the others are new tensors.

    Examples:
        >>> import torch
        >>> w = {"w": torch.tensor([3.0, 4.0])}
        >>> perturbed_params(w, w, 5.0)["w"]
        tensor([6., 8.])
    """
    e = perturbation(params, grads, rho, **options)
    flags = mask_flags(options.get("mask"), params)
    moved = _tree.add_leaves(_tree.select(params, flags), _tree.select(e, flags))
    return _tree.merge(params, moved, flags)


def _split(options: SamGradOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(sam()'s options, the engine's)``."""
    sam_options = {k: v for k, v in options.items() if k in SAM_OPTION_NAMES}
    return sam_options, {k: v for k, v in options.items() if k not in SAM_OPTION_NAMES}


@overload
def sam_grad_and_value(
    loss_fn: LossFn, *, has_aux: Literal[False] = ..., **options: Unpack[SamGradOptions]
) -> Callable[..., tuple[PyTree, torch.Tensor]]: ...


@overload
def sam_grad_and_value(
    loss_fn: LossFn, *, has_aux: Literal[True], **options: Unpack[SamGradOptions]
) -> Callable[..., tuple[PyTree, tuple[torch.Tensor, Any]]]: ...


@overload
def sam_grad_and_value(
    loss_fn: LossFn, *, has_aux: bool = ..., **options: Unpack[SamGradOptions]
) -> Callable[..., tuple[PyTree, Any]]: ...


def sam_grad_and_value(
    loss_fn: LossFn, *, has_aux: bool = False, **options: Unpack[SamGradOptions]
) -> Callable[..., tuple[PyTree, Any]]:
    """Transforms ``loss_fn`` into a function returning ``(sam_grads, loss)``.

    The shape of ``torch.func.grad_and_value``: options are checked once here,
    and the returned function ``f(params, batch, rho=None)`` runs both passes.
    Its optional ``rho`` overrides the built-in radius for one call, e.g. with
    a 0-d tensor from a rho schedule. See ``sam_grad`` for the arguments.

    Examples:
        >>> import torch
        >>> loss_fn = lambda p, batch: (p["w"] * batch).pow(2).sum()
        >>> sam_fn = sam_grad_and_value(loss_fn, rho=0.1)
        >>> grads, loss = sam_fn({"w": torch.ones(2)}, torch.ones(2))
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    has_aux = check_bool("has_aux", has_aux)
    sam_options, engine_options = _split(options)
    method = sam_method(**sam_options)
    run_options({**engine_options, "has_aux": has_aux})  # type: ignore[typeddict-item]
    shape = {k: v for k, v in sam_options.items() if k != "rho"}

    def sam_fn(params: Params, batch: Batch, rho: Optional[Rho] = None) -> tuple[PyTree, Any]:
        chosen = method if rho is None else sam_method(check_rho(rho), **shape)
        grads, value, _ = chosen.grad(
            loss_fn, params, batch, chosen.init(params), has_aux=has_aux, **engine_options
        )
        return grads, value

    return sam_fn


@overload
def sam_grad(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    has_aux: Literal[False] = ...,
    **options: Unpack[SamGradOptions],
) -> tuple[PyTree, torch.Tensor]: ...


@overload
def sam_grad(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    has_aux: Literal[True],
    **options: Unpack[SamGradOptions],
) -> tuple[PyTree, tuple[torch.Tensor, Any]]: ...


@overload
def sam_grad(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    has_aux: bool = ...,
    **options: Unpack[SamGradOptions],
) -> tuple[PyTree, Any]: ...


def sam_grad(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    has_aux: bool = False,
    **options: Unpack[SamGradOptions],
) -> tuple[PyTree, Any]:
    """The sharpness-aware gradient ``grad L(w + e)`` and the loss at ``w``.

    Two forward-backward passes through ``torch.func.grad_and_value`` (plain
    autograd in eager mode when that gives the same first-order result): one at
    ``w`` to get ``e`` (see ``perturbation``), one at ``w + e``. Nothing is
    mutated; the caller applies the returned gradient to the original ``w``.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a scalar tensor, or
            ``(loss, aux)`` with ``has_aux=True``. With ``num_chunks`` or
            ``accum_steps`` the loss must be a mean over the batch.
        params: a pytree of floating-point tensors (the weights ``w``).
        batch: any pytree; its tensors are split along dim 0 by ``num_chunks``
            and ``accum_steps``, other leaves are passed whole.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
        **options: SAM's ``rho`` (a float >= 0 or a 0-d tensor, default 0.05),
            ``adaptive``, ``eta``, ``norm`` and ``mask``
            (``samfunc.PerturbationOptions``), and the engine's ``num_chunks``,
            ``accum_steps``, ``vectorize_chunks``, ``data_parallel``,
            ``reuse_rng`` and ``nonfinite`` (``samfunc.PassOptions``). To skip
            a step with a non-finite gradient, use a train step
            (``nonfinite="skip"``) or ``apply_if_finite`` around the optimizer.
            With ``data_parallel``, ``grads`` and the loss are the averages
            over the processes.

    Returns:
        ``(grads, loss)``, or ``(grads, (loss, aux))`` with ``has_aux``. ``grads``
        has the structure of ``params``; ``loss`` and ``aux`` come from the first,
        unperturbed pass (report that loss; take BatchNorm statistics from it).

    Raises:
        ValueError: for a negative or non-finite ``rho``, ``eta < 0``, a loss that
            is not a scalar, ``num_chunks``/``accum_steps`` not dividing the batch,
            or an ``nn.Parameter`` in ``params`` (pass detached tensors).
        TypeError: for a non-floating-point leaf in ``params`` or loss, or a flag
            that is not a bool.
        NonFiniteGradientError: with ``nonfinite="raise"``, for a NaN or inf gradient.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
        >>> params, opt = {"w": torch.ones(3)}, samfunc.sgd(0.1, momentum=0.9)
        >>> opt_state = opt.init(params)
        >>> grads, loss = samfunc.sam_grad(loss_fn, params, torch.randn(8, 3), rho=0.05)
        >>> updates, opt_state = opt.update(grads, opt_state, params)
        >>> params = samfunc.apply_updates(params, updates)
    """
    sam_fn = sam_grad_and_value(loss_fn, has_aux=has_aux, **options)
    result: tuple[PyTree, Any] = sam_fn(params, batch)
    return result
