"""The sharpness-aware gradient, as pure functions built on ``torch.func``.

SAM (Foret et al., 2021) evaluates the gradient at the worst point of a small
ball around the weights::

    g   = grad L(w)
    e   = rho * g / (||g||_2 + 1e-12)        one global L2 norm over every leaf
    g_s = grad L(w + e)                      the SAM gradient, used to update w

Adaptive SAM (ASAM, Kwon et al., 2021) rescales the ball by ``T = |w| + eta``:
``e = rho * T**2 g / (||T g||_2 + 1e-12)``.

``_ascent`` is the one place in samfunc where ``e`` is computed: ``perturbation``,
``sam_grad``, the train-step builders and the ``SAM`` optimizer class all go
through it.

Example:
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

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Union, overload

import torch
from torch.func import vmap

from . import _tree
from ._base import Params
from ._finite import NonFinitePolicy, check_policy, raise_if_nonfinite, refuse_raise_under_compile
from ._grad import grad_and_value
from ._tree import Mask, PyTree
from ._validate import check_bool, check_nonnegative, check_positive_int, check_rho

__all__ = [
    "NORMS",
    "Norm",
    "perturbation",
    "perturbed_params",
    "sam_grad",
    "sam_grad_and_value",
]

FIRST_PASS = "the first pass, at w"
SECOND_PASS = "the second pass, at w + e"

#: Added to the gradient norm before dividing, as in the paper's code.
NORM_EPS = 1e-12

Norm = Literal["l2", "none", "inf"]
NORMS: tuple[Norm, ...] = ("l2", "none", "inf")

Rho = Union[float, torch.Tensor]
Batch = PyTree
LossFn = Callable[..., Any]

#: The policies ``sam_grad`` accepts; the train steps and ``SAM`` add ``"skip"``.
SAM_GRAD_POLICIES = ("propagate", "raise")
SamGradPolicy = Literal["propagate", "raise"]

# reuse_rng replays the global generator's state between the two passes; a
# second thread drawing from it in between would change the masks. Calls that
# reuse the RNG hold this lock from the first draw to the replay.
_RNG_LOCK = threading.RLock()


def _check_norm(norm: Any) -> Norm:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    result: Norm = norm
    return result


def _flags(mask: Mask | None, params: Params, name: str) -> list[bool]:
    """One bool per leaf: all True for ``None``, else the resolved mask."""
    if mask is None:
        return [True] * len(_tree.leaves(params))
    flags = _tree.resolve_mask(mask, params, name)
    if not any(flags):
        raise ValueError(f"{name} selects no leaf of params, so nothing would be perturbed")
    return flags


def _check_adaptive(adaptive: Any) -> bool | Mask:
    """``adaptive`` is a bool or a mask; a string such as ``"False"`` is neither."""
    if isinstance(adaptive, (bool, dict, list, tuple)) or callable(adaptive):
        return adaptive
    raise TypeError(
        "adaptive must be True, False, a tree of bools or a predicate (path, leaf) -> bool, "
        f"got {adaptive!r}"
    )


def _adaptive_flags(adaptive: bool | Mask, params: Params) -> list[bool]:
    if isinstance(adaptive, bool):
        return [adaptive] * len(_tree.leaves(params))
    return _tree.resolve_mask(adaptive, params, "adaptive")


def _scale_leaves(
    leaves: Sequence[torch.Tensor], factor: Rho | torch.Tensor, fused: bool
) -> list[torch.Tensor]:
    """``factor * leaf`` for each leaf; 16-bit leaves are scaled in float32.

    ``rho / ||g||`` can exceed float16's range when the gradient is tiny, so
    half-precision leaves are upcast for the product and cast back.
    """
    wide = [leaf.float() if leaf.element_size() < 4 else leaf for leaf in leaves]
    scaled = _tree.mul_leaves(wide, factor, fused=fused)
    return [s.to(leaf.dtype) for s, leaf in zip(scaled, leaves)]


class _Ascent(NamedTuple):
    """``e = factor * directions`` (times a per-leaf rho, if given), not yet multiplied out."""

    directions: list[torch.Tensor]
    factor: Rho
    leaf_rhos: list[float] | None


def _ascent(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rho: Rho | Sequence[float],
    adaptive: Sequence[bool],
    eta: float | Sequence[float],
    norm: Norm,
    fused: bool,
) -> _Ascent:
    """SAM's ascent step for matching lists of leaves: the one formula in samfunc.

    ``rho`` and ``eta`` are one value, or one float per leaf (the ``SAM``
    class's per-group options); the norm is global over all the leaves either
    way, as in the seed.
    """
    etas = [float(eta)] * len(params) if isinstance(eta, (float, int)) else list(eta)
    leaf_rhos: list[float] | None
    if isinstance(rho, (float, int, torch.Tensor)):
        leaf_rhos, radius = None, rho
    else:
        leaf_rhos, radius = [float(r) for r in rho], 1.0
    scales = _asam_scales(params, adaptive, etas, fused)
    if norm == "inf":
        signs = torch._foreach_sign(list(grads)) if fused else [g.sign() for g in grads]
        return _Ascent(_times(signs, scales, fused), radius, leaf_rhos)
    scaled_grads = _times(grads, scales, fused)
    directions = _times(scaled_grads, scales, fused)
    if norm == "none":
        return _Ascent(directions, radius, leaf_rhos)
    factor = radius / (_tree.global_norm(scaled_grads, fused=fused) + NORM_EPS)
    return _Ascent(directions, factor, leaf_rhos)


def _perturbation_leaves(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rho: Rho | Sequence[float],
    adaptive: Sequence[bool],
    eta: float | Sequence[float],
    norm: Norm,
    fused: bool = True,
) -> list[torch.Tensor]:
    """``e`` itself, for matching lists of parameter and gradient leaves."""
    if not params:
        return []
    ascent = _ascent(params, grads, rho, adaptive, eta, norm, fused)
    e = _scale_leaves(ascent.directions, ascent.factor, fused)
    if ascent.leaf_rhos is not None:
        e = (
            list(torch._foreach_mul(e, ascent.leaf_rhos))
            if fused
            else [x * r for x, r in zip(e, ascent.leaf_rhos)]
        )
    return e


def _as_python_scale(ascent: _Ascent, params: Sequence[torch.Tensor]) -> float | None:
    """``factor`` as a Python float when reading it is free, else None.

    Then ``w + factor * d`` is one fused op with no temporary ``e``: a float
    factor always qualifies; a tensor one does in eager mode on the CPU, where
    ``.item()`` does not synchronize with a device. 16-bit leaves keep the
    float32 product of ``_scale_leaves``.
    """
    if ascent.leaf_rhos is not None or any(p.element_size() < 4 for p in params):
        return None
    factor = ascent.factor
    if not isinstance(factor, torch.Tensor):
        return float(factor)
    if factor.device.type == "cpu" and not torch.compiler.is_compiling():
        return float(factor.item())
    return None


def _perturbed_leaves(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rho: Rho,
    adaptive: Sequence[bool],
    eta: float,
    norm: Norm,
    fused: bool,
) -> list[torch.Tensor]:
    """``w + e`` for matching lists of parameter and gradient leaves."""
    ascent = _ascent(params, grads, rho, adaptive, eta, norm, fused)
    scale = _as_python_scale(ascent, params) if fused else None
    if scale is not None:
        return list(torch._foreach_add(list(params), ascent.directions, alpha=scale))
    e = _scale_leaves(ascent.directions, ascent.factor, fused)
    return _tree.add_leaves(params, e, fused=fused)


def _asam_scales(
    params: Sequence[torch.Tensor], adaptive: Sequence[bool], etas: Sequence[float], fused: bool
) -> list[torch.Tensor | None]:
    """ASAM's ``T = |w| + eta`` for adaptive leaves; None (``T = 1``) for the others."""
    chosen = [i for i, is_adaptive in enumerate(adaptive) if is_adaptive]
    scales: list[torch.Tensor | None] = [None] * len(params)
    if not chosen:
        return scales
    weights = [params[i] for i in chosen]
    chosen_etas = [etas[i] for i in chosen]
    if fused:
        values = list(torch._foreach_add(torch._foreach_abs(weights), chosen_etas))
    else:
        values = [w.abs() + eta for w, eta in zip(weights, chosen_etas)]
    for i, value in zip(chosen, values):
        scales[i] = value
    return scales


def _times(
    values: Sequence[torch.Tensor], scales: Sequence[torch.Tensor | None], fused: bool
) -> list[torch.Tensor]:
    """``values[i] * scales[i]`` where a scale is given; ``values[i]`` itself elsewhere."""
    chosen = [(i, scale) for i, scale in enumerate(scales) if scale is not None]
    out = list(values)
    if not chosen:
        return out
    products = _tree.mul_lists([values[i] for i, _ in chosen], [s for _, s in chosen], fused=fused)
    for (i, _), product in zip(chosen, products):
        out[i] = product
    return out


def perturbation(
    params: Params,
    grads: PyTree,
    rho: Rho = 0.05,
    *,
    adaptive: bool | Mask = False,
    eta: float = 0.0,
    norm: Norm = "l2",
    mask: Mask | None = None,
) -> PyTree:
    """Returns SAM's ascent step ``e`` (a tree like ``params``); mutates nothing.

    Args:
        params: the weights ``w``, a pytree of floating-point tensors.
        grads: ``grad L(w)``, with the structure of ``params``.
        rho: the radius, a float or a 0-d tensor (a tensor can change between
            calls under ``torch.compile`` without a recompile).
        adaptive: ASAM. ``True`` rescales every leaf by ``T = |w| + eta``; a mask
            (tree of bools or predicate ``(path, leaf) -> bool``) rescales only
            the leaves it selects, the others use ``T = 1``.
        eta: ASAM's offset in ``T = |w| + eta``.
        norm: ``"l2"`` (SAM: ``rho * T^2 g / ||T g||``), ``"none"``
            (unnormalized: ``rho * T^2 g``) or ``"inf"`` (``rho * T sign(g)``).
        mask: which leaves to perturb (the others get ``e = 0`` and are left out
            of the norm); a tree of bools or a predicate on key paths.

    Returns:
        ``e``. For ``norm="l2"``, ``||e / T||_2 = rho`` unless ``g`` is zero, in
        which case ``e`` is zero.

    Example:
        >>> import torch
        >>> e = perturbation({"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([3.0, 4.0])}, 0.5)
        >>> e["w"]
        tensor([0.3000, 0.4000])
    """
    options = _Options(rho, adaptive, eta, norm, mask, num_chunks=1, accum_steps=1)
    _tree.check_same_structure(params, grads, "params", "grads")
    flags = _flags(options.mask, params, "mask")
    adaptive_flags = _tree.select(_adaptive_flags(options.adaptive, params), flags)
    e_selected = _perturbation_leaves(
        _tree.select(params, flags),
        _tree.select(grads, flags),
        options.rho,
        adaptive_flags,
        options.eta,
        options.norm,
    )
    return _tree.merge(_tree.zeros_like(params), e_selected, flags)


def perturbed_params(
    params: Params,
    grads: PyTree,
    rho: Rho = 0.05,
    *,
    adaptive: bool | Mask = False,
    eta: float = 0.0,
    norm: Norm = "l2",
    mask: Mask | None = None,
) -> Params:
    """Returns ``params + perturbation(params, grads, ...)``, new tensors only.

    Leaves that ``mask`` leaves out come back as they are (the same tensor objects).

    Example:
        >>> import torch
        >>> w = {"w": torch.tensor([3.0, 4.0])}
        >>> perturbed_params(w, w, 5.0)["w"]
        tensor([6., 8.])
    """
    options = _Options(rho, adaptive, eta, norm, mask, num_chunks=1, accum_steps=1)
    _tree.check_same_structure(params, grads, "params", "grads")
    return options.perturb(params, grads, options.rho)


def _perturb(
    params: Params,
    grads: PyTree,
    rho: Rho,
    adaptive_flags: list[bool],
    eta: float,
    norm: Norm,
    flags: list[bool],
    fused: bool = True,
) -> Params:
    selected = _tree.select(params, flags)
    if not selected:
        return params
    moved = _perturbed_leaves(
        selected,
        _tree.select(grads, flags),
        rho,
        _tree.select(adaptive_flags, flags),
        eta,
        norm,
        fused,
    )
    return _tree.merge(params, moved, flags)


def _check_params(params: Params) -> None:
    leaves = _tree.leaves(params)
    if not leaves:
        raise ValueError("params must hold at least one tensor, got an empty tree")
    for path, leaf in zip(_tree.key_paths(params), leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"params must be a pytree of tensors, "
                f"got {type(leaf).__name__} at {path or '<root>'}"
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"params must hold floating-point tensors, got {leaf.dtype} at {path or '<root>'}"
            )
    _tree.check_detached(params, "params")


def checked_loss_fn(loss_fn: LossFn, has_aux: bool) -> LossFn:
    """Wraps ``loss_fn`` to check that the loss it returns is a scalar tensor."""

    def checked(params: Params, batch: Batch) -> Any:
        out = loss_fn(params, batch)
        if has_aux:
            if not isinstance(out, tuple) or len(out) != 2:
                raise ValueError(
                    "with has_aux=True, loss_fn must return a (loss, aux) pair, "
                    f"got {type(out).__name__}"
                )
            loss = out[0]
        else:
            loss = out
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            hint = "" if has_aux else " (pass has_aux=True if it returns (loss, aux))"
            raise ValueError(f"loss_fn must return a scalar (0-d) tensor loss, got {shape}{hint}")
        if not loss.is_floating_point():
            raise TypeError(
                f"loss_fn must return a floating-point loss, got {loss.dtype}: an integer or "
                "boolean loss has no gradient (compute it from the model's float outputs)"
            )
        return out

    return checked


def _is_split(leaf: Any) -> bool:
    """Tensor leaves with a batch dimension are split; other leaves pass whole."""
    return isinstance(leaf, torch.Tensor) and leaf.ndim > 0


def _part_size(leaves: Sequence[Any], parts: int, name: str) -> int:
    """The size of each of ``parts`` equal pieces of dim 0, after checking it exists."""
    sizes = {leaf.shape[0] for leaf in leaves if _is_split(leaf)}
    if len(sizes) != 1:
        raise ValueError(
            f"{name}={parts} splits the batch along dim 0, so every tensor in batch needs the "
            f"same leading size; got sizes {sorted(sizes)}"
        )
    (size,) = sizes
    if size % parts:
        raise ValueError(f"{name}={parts} must divide the batch size {size}")
    return int(size) // parts


def _split_batch(batch: Batch, parts: int, name: str) -> list[Batch]:
    """Splits every tensor leaf of ``batch`` along dim 0 into ``parts`` equal pieces."""
    leaves, spec = _tree.flatten(batch)
    step = _part_size(leaves, parts, name)
    return [
        _tree.unflatten(
            [leaf[i * step : (i + 1) * step] if _is_split(leaf) else leaf for leaf in leaves],
            spec,
        )
        for i in range(parts)
    ]


def _stack_chunks(batch: Batch, parts: int, name: str) -> tuple[Batch, PyTree]:
    """Reshapes tensor leaves to ``(parts, size // parts, ...)``; returns in_dims too."""
    leaves, spec = _tree.flatten(batch)
    step = _part_size(leaves, parts, name)
    stacked = [
        leaf.reshape(parts, step, *leaf.shape[1:]) if _is_split(leaf) else leaf for leaf in leaves
    ]
    in_dims = [0 if _is_split(leaf) else None for leaf in leaves]
    return _tree.unflatten(stacked, spec), _tree.unflatten(in_dims, spec)


def _stack_aux(auxes: Sequence[PyTree]) -> PyTree:
    return _tree.tree_map(lambda *xs: torch.stack(xs), *auxes)


class _Options:
    """Validated SAM options, shared by every entry point."""

    def __init__(
        self,
        rho: Rho,
        adaptive: bool | Mask,
        eta: float,
        norm: Norm,
        mask: Mask | None,
        num_chunks: int,
        accum_steps: int,
        reuse_rng: bool = False,
        vectorize_chunks: bool = True,
        nonfinite: str = "propagate",
    ) -> None:
        self.rho = check_rho(rho)
        self.eta = check_nonnegative("eta", eta)
        self.norm = _check_norm(norm)
        self.adaptive = _check_adaptive(adaptive)
        self.mask = mask
        self.num_chunks = check_positive_int("num_chunks", num_chunks)
        self.accum_steps = check_positive_int("accum_steps", accum_steps)
        self.reuse_rng = check_bool("reuse_rng", reuse_rng)
        self.vectorize_chunks = check_bool("vectorize_chunks", vectorize_chunks)
        self.nonfinite: NonFinitePolicy = check_policy("nonfinite", nonfinite, SAM_GRAD_POLICIES)
        if self.num_chunks > 1 and self.accum_steps > 1:
            raise ValueError(
                "num_chunks and accum_steps cannot both be > 1, "
                f"got num_chunks={num_chunks} and accum_steps={accum_steps}"
            )

    def perturb(self, params: Params, grads: PyTree, rho: Rho, fused: bool = True) -> Params:
        flags = _flags(self.mask, params, "mask")
        adaptive_flags = _adaptive_flags(self.adaptive, params)
        return _perturb(params, grads, rho, adaptive_flags, self.eta, self.norm, flags, fused)

    def check_pass(self, grads: PyTree, where: str, value: Any, has_aux: bool) -> None:
        """With ``nonfinite="raise"``, raises if one pass's gradient is not finite."""
        if self.nonfinite == "raise":
            raise_if_nonfinite(grads, where, value[0] if has_aux else value)


def _sam_single(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    options: _Options,
    rho: Rho,
    has_aux: bool,
    fused: bool = True,
) -> tuple[PyTree, Any]:
    """Both passes on one batch: ``(grad L(w + e), value at w)``."""
    grad_fn = grad_and_value(loss_fn, has_aux=has_aux)
    with _RNG_LOCK if options.reuse_rng else contextlib.nullcontext():
        replay = _rng_states_of(params) if options.reuse_rng else None
        grads, value = grad_fn(params, batch)
        if fused:  # not inside vmap, where a flag cannot be read
            options.check_pass(grads, FIRST_PASS, value, has_aux)
        perturbed = options.perturb(params, grads, rho, fused)
        sam_grads, perturbed_value = _second_pass(grad_fn, perturbed, batch, replay)
    if fused:
        options.check_pass(sam_grads, SECOND_PASS, perturbed_value, has_aux)
    return sam_grads, value


_RngStates = tuple[list[int], tuple[torch.Tensor, list[torch.Tensor]]]


def _rng_states_of(params: Params) -> _RngStates:
    """The generators ``params``' devices draw from, and their states now."""
    devices = _cuda_devices(params)
    return devices, _rng_states(devices)


def _second_pass(
    grad_fn: Callable[..., tuple[PyTree, Any]],
    perturbed: Params,
    batch: Batch,
    replay: _RngStates | None,
) -> tuple[PyTree, Any]:
    """The pass at ``w + e``.

    With ``replay``, it runs on the first pass's random draws (dropout masks),
    and leaves the generators where the first pass left them.
    """
    if replay is None:
        return grad_fn(perturbed, batch)
    devices, before = replay
    with torch.random.fork_rng(devices=devices):
        _set_rng_states(before, devices)
        return grad_fn(perturbed, batch)


def _cuda_devices(params: Params) -> list[int]:
    return sorted({t.device.index or 0 for t in _tree.leaves(params) if t.device.type == "cuda"})


def _rng_states(cuda_devices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = [torch.cuda.get_rng_state(d) for d in cuda_devices]
    return torch.get_rng_state(), cuda


def _set_rng_states(
    states: tuple[torch.Tensor, list[torch.Tensor]], cuda_devices: list[int]
) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    for device, state in zip(cuda_devices, cuda):
        torch.cuda.set_rng_state(state, device)


def _sam_chunk_loop(
    loss_fn: LossFn, params: Params, batch: Batch, options: _Options, rho: Rho, has_aux: bool
) -> tuple[PyTree, Any]:
    """m-sharpness as a Python loop over chunks: for losses vmap cannot batch.

    BatchNorm in training mode updates its running statistics in place, which
    ``torch.func.vmap`` refuses; this loop supports it, one chunk at a time.
    """

    def one_chunk(params: Params, chunk: Batch) -> tuple[PyTree, Any]:
        return _sam_single(loss_fn, params, chunk, options, rho, has_aux)

    chunks = _split_batch(batch, options.num_chunks, "num_chunks")
    grads, values = _accumulate(one_chunk, params, chunks)
    return grads, _mean_values(values, has_aux)


def _sam_chunked(
    loss_fn: LossFn, params: Params, batch: Batch, options: _Options, rho: Rho, has_aux: bool
) -> tuple[PyTree, Any]:
    """m-sharpness: one ``e`` per chunk of the batch, vmapped, then averaged."""
    stacked, in_dims = _stack_chunks(batch, options.num_chunks, "num_chunks")

    def one_chunk(chunk: Batch) -> tuple[PyTree, Any]:
        # foreach ops have no vmap batching rule: per-leaf ops inside vmap.
        return _sam_single(loss_fn, params, chunk, options, rho, has_aux, fused=False)

    grads, value = vmap(one_chunk, in_dims=(in_dims,), randomness="different")(stacked)
    grads = _tree.tree_map(lambda g: g.mean(0), grads)
    value = (value[0].mean(0), value[1]) if has_aux else value.mean(0)
    options.check_pass(grads, "either pass (in some chunk)", value, has_aux)
    return grads, value


def _sam_accumulated(
    loss_fn: LossFn, params: Params, batch: Batch, options: _Options, rho: Rho, has_aux: bool
) -> tuple[PyTree, Any]:
    """Both gradients accumulated over micro-batches, one micro-batch alive at a time."""
    micro_batches = _split_batch(batch, options.accum_steps, "accum_steps")
    grad_fn = grad_and_value(loss_fn, has_aux=has_aux)
    grads, values = _accumulate(grad_fn, params, micro_batches)
    options.check_pass(grads, FIRST_PASS, _mean_values(values, has_aux), has_aux)
    perturbed = options.perturb(params, grads, rho)
    sam_grads, perturbed_values = _accumulate(grad_fn, perturbed, micro_batches)
    options.check_pass(sam_grads, SECOND_PASS, _mean_values(perturbed_values, has_aux), has_aux)
    return sam_grads, _mean_values(values, has_aux)


def _mean_values(values: Sequence[Any], has_aux: bool) -> Any:
    """The mean loss over parts; with ``has_aux``, ``(loss, aux stacked over parts)``."""
    if has_aux:
        loss = torch.stack([v[0] for v in values]).mean()
        return loss, _stack_aux([v[1] for v in values])
    return torch.stack(list(values)).mean()


def _accumulate(
    grad_fn: Callable[..., tuple[PyTree, Any]], params: Params, micro_batches: Sequence[Batch]
) -> tuple[PyTree, list[Any]]:
    """Mean gradient over the parts of a batch, summed as it goes; also each value."""
    total, values = None, []
    for micro_batch in micro_batches:
        grads, value = grad_fn(params, micro_batch)
        values.append(value)
        leaves, spec = _tree.flatten(grads)
        total = leaves if total is None else list(torch._foreach_add(total, leaves))
    assert total is not None
    mean = torch._foreach_div(total, float(len(micro_batches)))
    return _tree.unflatten(mean, spec), values


@overload
def sam_grad_and_value(
    loss_fn: LossFn,
    *,
    rho: Rho = ...,
    adaptive: bool | Mask = ...,
    eta: float = ...,
    norm: Norm = ...,
    mask: Mask | None = ...,
    has_aux: Literal[False] = ...,
    num_chunks: int = ...,
    accum_steps: int = ...,
    vectorize_chunks: bool = ...,
    reuse_rng: bool = ...,
    nonfinite: SamGradPolicy = ...,
) -> Callable[..., tuple[PyTree, torch.Tensor]]: ...


@overload
def sam_grad_and_value(
    loss_fn: LossFn,
    *,
    rho: Rho = ...,
    adaptive: bool | Mask = ...,
    eta: float = ...,
    norm: Norm = ...,
    mask: Mask | None = ...,
    has_aux: Literal[True],
    num_chunks: int = ...,
    accum_steps: int = ...,
    vectorize_chunks: bool = ...,
    reuse_rng: bool = ...,
    nonfinite: SamGradPolicy = ...,
) -> Callable[..., tuple[PyTree, tuple[torch.Tensor, Any]]]: ...


@overload
def sam_grad_and_value(
    loss_fn: LossFn,
    *,
    rho: Rho = ...,
    adaptive: bool | Mask = ...,
    eta: float = ...,
    norm: Norm = ...,
    mask: Mask | None = ...,
    has_aux: bool = ...,
    num_chunks: int = ...,
    accum_steps: int = ...,
    vectorize_chunks: bool = ...,
    reuse_rng: bool = ...,
    nonfinite: SamGradPolicy = ...,
) -> Callable[..., tuple[PyTree, Any]]: ...


def sam_grad_and_value(
    loss_fn: LossFn,
    *,
    rho: Rho = 0.05,
    adaptive: bool | Mask = False,
    eta: float = 0.0,
    norm: Norm = "l2",
    mask: Mask | None = None,
    has_aux: bool = False,
    num_chunks: int = 1,
    accum_steps: int = 1,
    vectorize_chunks: bool = True,
    reuse_rng: bool = False,
    nonfinite: SamGradPolicy = "propagate",
) -> Callable[..., tuple[PyTree, Any]]:
    """Transforms ``loss_fn`` into a function returning ``(sam_grads, loss)``.

    The shape of ``torch.func.grad_and_value``: options are checked once here,
    and the returned function ``f(params, batch, rho=None)`` runs both passes.
    Its optional ``rho`` overrides the built-in radius for one call, e.g. with
    a 0-d tensor from a rho schedule. See ``sam_grad`` for the arguments.

    Example:
        >>> import torch
        >>> loss_fn = lambda p, batch: (p["w"] * batch).pow(2).sum()
        >>> sam_fn = sam_grad_and_value(loss_fn, rho=0.1)
        >>> grads, loss = sam_fn({"w": torch.ones(2)}, torch.ones(2))
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    has_aux = check_bool("has_aux", has_aux)
    options = _Options(
        rho,
        adaptive,
        eta,
        norm,
        mask,
        num_chunks,
        accum_steps,
        reuse_rng,
        vectorize_chunks,
        nonfinite,
    )

    def sam_fn(params: Params, batch: Batch, rho: Rho | None = None) -> tuple[PyTree, Any]:
        radius = options.rho if rho is None else check_rho(rho)
        return _run(loss_fn, params, batch, options, radius, has_aux)

    return sam_fn


def _run(
    loss_fn: LossFn, params: Params, batch: Batch, options: _Options, rho: Rho, has_aux: bool
) -> tuple[PyTree, Any]:
    """``sam_grad`` with options validated beforehand (the train-step builders call this)."""
    _check_params(params)
    if options.nonfinite == "raise":
        refuse_raise_under_compile()
    checked_loss = checked_loss_fn(loss_fn, has_aux)
    if options.num_chunks > 1:
        implementation = _sam_chunked if options.vectorize_chunks else _sam_chunk_loop
    elif options.accum_steps > 1:
        implementation = _sam_accumulated
    else:
        implementation = _sam_single
    return implementation(checked_loss, params, batch, options, rho, has_aux)


@overload
def sam_grad(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    rho: Rho = ...,
    adaptive: bool | Mask = ...,
    eta: float = ...,
    norm: Norm = ...,
    mask: Mask | None = ...,
    has_aux: Literal[False] = ...,
    num_chunks: int = ...,
    accum_steps: int = ...,
    vectorize_chunks: bool = ...,
    reuse_rng: bool = ...,
    nonfinite: SamGradPolicy = ...,
) -> tuple[PyTree, torch.Tensor]: ...


@overload
def sam_grad(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    rho: Rho = ...,
    adaptive: bool | Mask = ...,
    eta: float = ...,
    norm: Norm = ...,
    mask: Mask | None = ...,
    has_aux: Literal[True],
    num_chunks: int = ...,
    accum_steps: int = ...,
    vectorize_chunks: bool = ...,
    reuse_rng: bool = ...,
    nonfinite: SamGradPolicy = ...,
) -> tuple[PyTree, tuple[torch.Tensor, Any]]: ...


@overload
def sam_grad(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    rho: Rho = ...,
    adaptive: bool | Mask = ...,
    eta: float = ...,
    norm: Norm = ...,
    mask: Mask | None = ...,
    has_aux: bool = ...,
    num_chunks: int = ...,
    accum_steps: int = ...,
    vectorize_chunks: bool = ...,
    reuse_rng: bool = ...,
    nonfinite: SamGradPolicy = ...,
) -> tuple[PyTree, Any]: ...


def sam_grad(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    rho: Rho = 0.05,
    adaptive: bool | Mask = False,
    eta: float = 0.0,
    norm: Norm = "l2",
    mask: Mask | None = None,
    has_aux: bool = False,
    num_chunks: int = 1,
    accum_steps: int = 1,
    vectorize_chunks: bool = True,
    reuse_rng: bool = False,
    nonfinite: SamGradPolicy = "propagate",
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
        rho: the radius, a float >= 0 or a 0-d tensor (change it between calls
            under ``torch.compile`` without a recompile).
        adaptive: ASAM; ``True`` for every leaf (the seed's ASAM, with
            ``eta=0``), or a mask of the leaves to rescale (the ASAM authors'
            code rescales weights only, with ``eta=0.01``).
        eta: ASAM's offset in ``T = |w| + eta``.
        norm: ``"l2"``, ``"none"`` or ``"inf"``; see ``perturbation``.
        mask: which leaves to perturb; e.g. ``lambda path, _: "norm" in path``
            perturbs only normalization layers (SAM-ON).
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
        num_chunks: m-sharpness. Splits the batch into this many equal chunks,
            each with its own ``e`` (run in parallel with ``torch.func.vmap``),
            and averages their SAM gradients; ``aux`` leaves get a leading axis
            of size ``num_chunks``.
        accum_steps: gradient accumulation. Both gradients are accumulated over
            this many micro-batches, so the result equals the full-batch SAM
            gradient while only one micro-batch's activations are alive at a
            time; ``aux`` leaves get a leading axis of size ``accum_steps``.
        vectorize_chunks: run the ``num_chunks`` chunks with ``torch.func.vmap``
            (default) or, with False, in a Python loop, which supports losses vmap
            cannot batch, such as BatchNorm updating its running statistics.
        reuse_rng: replay the first pass's random state in the second pass, so
            both see the same dropout masks (the seed draws new ones). Not for
            ``torch.compile(fullgraph=True)``: RNG state capture breaks graphs.
            Thread-safe among samfunc calls: a lock holds the global generator
            from the first pass to the replay, so concurrent ``reuse_rng`` calls
            run one at a time. Another thread drawing random numbers outside
            samfunc in between can still change the masks.
        nonfinite: what to do when a pass's gradient has a NaN or inf element.
            ``"propagate"`` (default) returns it as it is (one NaN makes the
            whole SAM gradient NaN, since the norm in ``e`` is global);
            ``"raise"`` raises ``NonFiniteGradientError`` naming the pass and
            the first non-finite leaf (eager only: it reads a flag from the
            device). To skip such steps, use a train step (``nonfinite="skip"``)
            or ``apply_if_finite`` around the optimizer.

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

    Example:
        >>> import torch
        >>> import samfunc
        >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
        >>> params, opt = {"w": torch.ones(3)}, samfunc.sgd(0.1, momentum=0.9)
        >>> opt_state = opt.init(params)
        >>> grads, loss = samfunc.sam_grad(loss_fn, params, torch.randn(8, 3), rho=0.05)
        >>> updates, opt_state = opt.update(grads, opt_state, params)
        >>> params = samfunc.apply_updates(params, updates)
    """
    sam_fn = sam_grad_and_value(
        loss_fn,
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        norm=norm,
        mask=mask,
        has_aux=has_aux,
        num_chunks=num_chunks,
        accum_steps=accum_steps,
        vectorize_chunks=vectorize_chunks,
        reuse_rng=reuse_rng,
        nonfinite=nonfinite,
    )
    result: tuple[PyTree, Any] = sam_fn(params, batch)
    return result
