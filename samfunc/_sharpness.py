"""Tools to measure sharpness: worst-case loss, Hessian spectrum and trace, loss landscapes.

All take a ``loss_fn(params, batch)`` as ``sam_grad`` does (``has_aux=True``
for one that returns ``(loss, aux)``, such as ``module_loss``), and use
``torch.func`` throughout: Hessian-vector products are forward-over-reverse,
``jvp`` of ``grad``, and never form the Hessian. For an ``nn.Module``,
``module_sharpness_loss(model, criterion)`` gives the ``(loss_fn, params)``
every tool takes: in eval mode, with the model's buffers (BatchNorm running
statistics), and leaving the model as it was.

Examples:
    >>> import torch
    >>> import samfunc
    >>> a = torch.diag(torch.tensor([3.0, 1.0]))
    >>> loss_fn = lambda p, batch: 0.5 * p["w"] @ batch @ p["w"]
    >>> value, _ = samfunc.top_hessian_eigenvalue(loss_fn, {"w": torch.ones(2)}, a)
    >>> round(float(value), 3)
    3.0
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.func import grad, jvp

from . import _tree
from ._batch import split_batch
from ._grad import grad_and_value
from ._module import module_loss, module_params
from ._sam import perturbation
from ._tree import PyTree
from ._validate import check_bool, check_nonnegative, check_positive, check_positive_int

__all__ = [
    "Sharpness",
    "HessianTrace",
    "hessian_vector_product",
    "worst_case_loss",
    "top_hessian_eigenvalue",
    "hessian_trace",
    "random_direction",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "module_sharpness_loss",
]

LossFn = Callable[..., Any]
Tensors = dict[str, torch.Tensor]


def _loss_only(loss_fn: LossFn, has_aux: bool) -> Callable[[PyTree, Any], torch.Tensor]:
    if not check_bool("has_aux", has_aux):
        return loss_fn

    def loss(params: PyTree, batch: Any) -> torch.Tensor:
        value: torch.Tensor = loss_fn(params, batch)[0]
        return value

    return loss


def _random_like(params: PyTree, generator: torch.Generator, rademacher: bool = False) -> PyTree:
    def draw(leaf: torch.Tensor) -> torch.Tensor:
        sample = torch.randn(leaf.shape, generator=generator, dtype=torch.float64)
        if rademacher:
            sample = torch.sign(sample)
        return sample.to(device=leaf.device, dtype=leaf.dtype)

    return _tree.tree_map(draw, params)


def _dense(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.contiguous()


def _measured_hvp(
    loss_fn: LossFn, params: PyTree, batch: Any, vector: PyTree, has_aux: bool
) -> PyTree:
    """``H v`` for a measurement: detached, so params that require grad build no graph."""
    product = hessian_vector_product(loss_fn, params, batch, vector, has_aux=has_aux)
    return _tree.tree_map(lambda t: t.detach(), product)


def hessian_vector_product(
    loss_fn: LossFn, params: PyTree, batch: Any, vector: PyTree, *, has_aux: bool = False
) -> PyTree:
    """``H v``, the Hessian of the loss at ``params`` times ``vector`` (a tree like params).

    Forward-over-reverse: ``jvp`` of ``grad``, one forward and one backward pass
    with dual numbers; the Hessian is never formed.

    Examples:
        >>> import torch
        >>> hvp = hessian_vector_product(
        ...     lambda p, b: (p ** 3).sum(), torch.tensor([1.0, 2.0]), None, torch.ones(2)
        ... )
        >>> hvp
        tensor([ 6., 12.])
    """
    _tree.check_same_structure(params, vector, "params", "vector")
    loss = _loss_only(loss_fn, has_aux)
    # jvp has no rule for expanded (stride-0) leaves: dense copies, only where not dense.
    params, vector = _tree.tree_map(_dense, params), _tree.tree_map(_dense, vector)
    outputs = jvp(lambda p: grad(loss)(p, batch), (params,), (vector,))
    return outputs[1]


class Sharpness(NamedTuple):
    """Result of ``worst_case_loss``.

    Attributes:
        loss: the loss at ``w``.
        worst_loss: the largest loss found in the rho-ball around ``w``.
        sharpness: ``worst_loss - loss``.
    """

    loss: torch.Tensor
    worst_loss: torch.Tensor
    sharpness: torch.Tensor


def _ascend(
    loss: Callable[[PyTree, Any], torch.Tensor],
    params: PyTree,
    batch: Any,
    rho: float,
    steps: int,
    step_size: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected normalized-gradient ascent on ``L(w + e)`` over ``||e|| <= rho``."""
    grad_fn = grad_and_value(loss)
    grads, value = grad_fn(params, batch)
    e = _tree.zeros_like(params)
    worst = value
    for _ in range(steps):
        e = _tree.add_scaled(e, perturbation(params, grads, step_size), 1.0)
        norm = _tree.global_norm(e)
        e = _tree.scale(e, torch.clamp(rho / (norm + 1e-12), max=1.0))
        grads, moved_loss = grad_fn(_tree.add_scaled(params, e, 1.0), batch)
        worst = torch.maximum(worst, moved_loss)
    return value, worst


def worst_case_loss(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    rho: float = 0.05,
    *,
    steps: int = 1,
    step_size: float | None = None,
    num_chunks: int = 1,
    has_aux: bool = False,
) -> Sharpness:
    """The worst loss within an L2 ball of radius ``rho`` around ``params`` (m-sharpness).

    Ascends ``L(w + e)`` by ``steps`` normalized-gradient steps of size
    ``step_size`` (default ``rho``, so one step is SAM's own ``e``), projecting
    back into the ball after each, and keeps the largest loss met. With ``num_chunks``, each
    chunk of the batch gets its own ``e`` and the results are averaged: the
    paper's m-sharpness with ``m = batch size / num_chunks``.

    Examples:
        >>> import torch
        >>> loss_fn = lambda p, b: 0.5 * (p ** 2).sum()
        >>> result = worst_case_loss(loss_fn, torch.tensor([3.0, 4.0]), None, rho=1.0)
        >>> float(result.worst_loss)  # 0.5 * (5 + 1) ** 2
        18.0
    """
    rho = check_nonnegative("rho", rho)
    steps = check_positive_int("steps", steps)
    size = rho if step_size is None else check_positive("step_size", step_size)
    num_chunks = check_positive_int("num_chunks", num_chunks)
    loss = _loss_only(loss_fn, has_aux)
    parts = [batch] if num_chunks == 1 else split_batch(batch, num_chunks, "num_chunks")
    results = [_ascend(loss, params, part, rho, steps, size) for part in parts]
    value = torch.stack([v for v, _ in results]).mean()
    worst = torch.stack([w for _, w in results]).mean()
    value, worst = value.detach(), worst.detach()  # measurements, not part of a graph
    return Sharpness(loss=value, worst_loss=worst, sharpness=worst - value)


def _residual_norm(product: PyTree, eigenvalue: torch.Tensor, vector: PyTree) -> float:
    """``||H v - lambda v||`` from ``H v`` and ``v``, in float64."""
    squares = [
        (p.double() - eigenvalue * v.double()).square().sum()
        for p, v in zip(_tree.leaves(product), _tree.leaves(vector))
    ]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    has_aux: bool = False,
) -> tuple[torch.Tensor, PyTree]:
    """The Hessian eigenvalue of largest magnitude, by power iteration on ``H v``.

    Near a minimum this is the top (sharpest) eigenvalue. Each iteration takes
    one Hessian-vector product ``H v`` of a unit ``v`` and estimates the
    eigenvalue by the Rayleigh quotient ``lambda = v^T H v``. It stops when
    ``(lambda, v)`` is an eigenpair to within ``tol``, that is when the
    residual ``||H v - lambda v|| <= tol * |lambda|``, which bounds the distance
    from ``lambda`` to the spectrum. A small change of the estimate between
    iterations is not enough: when the two largest eigenvalues have nearly the
    same magnitude (say ``-3`` and ``3.05``) the estimate creeps so slowly that
    it looks settled long before it is an eigenvalue.

    Power iteration converges at the rate ``|lambda_2 / lambda_1|`` per step, so
    such spectra need many iterations. If ``iters`` products pass without
    convergence, a ``RuntimeWarning`` gives the residual reached, and the last
    estimate is returned. With float32 parameters the products are rounded to
    about 1e-7 relative, so a ``tol`` much below 1e-5 may never be met.

    Args:
        loss_fn: ``loss_fn(params, batch)``, returning the loss (or
            ``(loss, aux)`` with ``has_aux=True``).
        params: the point where the Hessian is taken.
        batch: passed to ``loss_fn``.
        iters: the most Hessian-vector products to take.
        tol: the relative residual at which to stop.
        seed: seeds the random starting vector.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
        ``(eigenvalue, eigenvector)``: a float64 0-d tensor and a unit-norm
        tree like ``params``; the pair whose residual was measured last.

    Examples:
        >>> import torch
        >>> a = torch.diag(torch.tensor([-3.0, 4.0], dtype=torch.float64))
        >>> loss_fn = lambda p, batch: 0.5 * p @ batch @ p
        >>> value, vector = top_hessian_eigenvalue(loss_fn, torch.zeros(2, dtype=torch.float64), a)
        >>> round(float(value), 4), round(abs(float(vector[1])), 4)
        (4.0, 1.0)
    """
    iters = check_positive_int("iters", iters)
    tol = check_positive("tol", tol)
    generator = torch.Generator().manual_seed(seed)
    vector = _random_like(params, generator)
    start_norm = float(_tree.global_norm(vector))
    if start_norm == 0.0:
        raise ValueError("params has no elements: there is no Hessian to measure")
    vector = _tree.scale(vector, 1.0 / start_norm)
    eigenvalue = torch.zeros((), dtype=torch.float64)
    residual, done, why = math.inf, 0, ""
    for done in range(1, iters + 1):
        product = _measured_hvp(loss_fn, params, batch, vector, has_aux)
        eigenvalue = _tree.vdot(vector, product, torch.float64)
        residual = _residual_norm(product, eigenvalue, vector)
        if residual <= tol * abs(float(eigenvalue)):
            return eigenvalue, vector
        norm = float(_tree.global_norm(product))
        if not math.isfinite(norm):
            why = " (the Hessian-vector product is not finite)"
            break
        if done < iters:
            vector = _tree.scale(product, 1.0 / norm)
    warnings.warn(
        f"top_hessian_eigenvalue did not converge in {done} iterations{why}: the residual "
        f"||Hv - lambda v|| = {residual:.3g} is above tol * |lambda| = "
        f"{tol * abs(float(eigenvalue)):.3g} (lambda = {float(eigenvalue):.6g}); "
        f"returning the last estimate. Raise iters (or tol) for an eigenvalue.",
        RuntimeWarning,
        stacklevel=2,
    )
    return eigenvalue, vector


class HessianTrace(NamedTuple):
    """Result of ``hessian_trace``: the estimate and its standard error."""

    trace: torch.Tensor
    standard_error: torch.Tensor


def hessian_trace(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    samples: int = 100,
    seed: int = 0,
    has_aux: bool = False,
) -> HessianTrace:
    """Hutchinson's estimate of ``tr(H)``: the mean of ``v^T H v`` over Rademacher ``v``.

    Exact for a diagonal Hessian; otherwise unbiased, with the standard error
    reported next to it.
    """
    samples = check_positive_int("samples", samples)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        v = _random_like(params, generator, rademacher=True)
        values.append(
            _tree.vdot(v, _measured_hvp(loss_fn, params, batch, v, has_aux), torch.float64)
        )
    stacked = torch.stack(values)
    error = (
        stacked.std() / math.sqrt(samples) if samples > 1 else torch.zeros((), dtype=torch.float64)
    )
    return HessianTrace(trace=stacked.mean(), standard_error=error)


def random_direction(
    params: PyTree,
    *,
    seed: int = 0,
    filter_normalize: bool = True,
    ignore_1d: bool = True,
) -> PyTree:
    """A random direction for loss-landscape plots (Li et al., NeurIPS 2018).

    Gaussian, and with ``filter_normalize`` each filter (slice along dim 0) of a
    leaf is rescaled to the norm of the matching filter of ``params``, so the
    plot does not depend on the weights' scale. With ``ignore_1d``, leaves of
    at most one dimension (biases, normalization parameters) get zero, as in
    the paper.
    """
    check_bool("filter_normalize", filter_normalize)
    check_bool("ignore_1d", ignore_1d)
    generator = torch.Generator().manual_seed(seed)
    direction = _random_like(params, generator)

    def normalize(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if d.numel() == 0:
            return d
        if w.ndim <= 1:
            return torch.zeros_like(d) if ignore_1d else d * (w.norm() / (d.norm() + 1e-10))
        if not filter_normalize:
            return d
        d_norms = d.reshape(d.shape[0], -1).norm(dim=1)
        w_norms = w.reshape(w.shape[0], -1).norm(dim=1)
        ratio: torch.Tensor = (w_norms / (d_norms + 1e-10)).reshape(-1, *([1] * (d.ndim - 1)))
        return d * ratio

    with torch.no_grad():  # a direction to plot along, not part of a graph
        normalized: PyTree = _tree.tree_map(normalize, direction, params)
    return normalized


@torch.no_grad()
def loss_landscape_1d(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    direction: PyTree,
    alphas: Sequence[float] | torch.Tensor,
    *,
    has_aux: bool = False,
) -> torch.Tensor:
    """``L(w + alpha d)`` for each ``alpha``: a 1-D slice of the loss landscape."""
    _tree.check_same_structure(params, direction, "params", "direction")
    loss = _loss_only(loss_fn, has_aux)
    values = [loss(_tree.add_scaled(params, direction, float(a)), batch) for a in alphas]
    return torch.stack([v.detach().double() for v in values])


@torch.no_grad()
def loss_landscape_2d(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    directions: tuple[PyTree, PyTree],
    alphas: Sequence[float] | torch.Tensor,
    betas: Sequence[float] | torch.Tensor,
    *,
    has_aux: bool = False,
) -> torch.Tensor:
    """``L(w + alpha d1 + beta d2)`` on the grid: rows follow ``alphas``, columns ``betas``."""
    first, second = directions
    _tree.check_same_structure(params, first, "params", "directions[0]")
    _tree.check_same_structure(params, second, "params", "directions[1]")
    loss = _loss_only(loss_fn, has_aux)
    rows = []
    for a in alphas:
        shifted = _tree.add_scaled(params, first, float(a))
        row = [loss(_tree.add_scaled(shifted, second, float(b)), batch) for b in betas]
        rows.append(torch.stack([v.detach().double() for v in row]))
    return torch.stack(rows)


@contextlib.contextmanager
def _in_mode(model: torch.nn.Module, train: bool | None) -> Iterator[None]:
    """``model.train(train)`` inside; every submodule's own flag put back on exit, even on error."""
    if train is None:
        yield
        return
    saved = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def _checked_buffers(model: torch.nn.Module, buffers: Any) -> Tensors | None:
    if buffers is None:
        return None
    if not isinstance(buffers, Mapping):
        raise TypeError(
            f"buffers must be a dict of tensors by buffer name (as module_buffers returns) "
            f"or None, got {type(buffers).__name__}"
        )
    own = dict(model.named_buffers())
    for name, value in buffers.items():
        if name not in own:
            known = ", ".join(repr(n) for n in own) or "none"
            raise ValueError(
                f"buffers has {name!r}, which is not a buffer of the model (its buffers: {known})"
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"buffers[{name!r}] must be a tensor, got {type(value).__name__}")
    return dict(buffers)


def module_sharpness_loss(
    model: torch.nn.Module,
    criterion: Callable[[Any, Any], torch.Tensor],
    buffers: Mapping[str, torch.Tensor] | None = None,
    *,
    train: bool | None = False,
) -> tuple[Callable[[Tensors, Any], torch.Tensor], Tensors]:
    """``(loss_fn, params)`` for the sharpness tools, from an ``nn.Module`` and a criterion.

    ``loss_fn(params, batch)`` is ``criterion(model(inputs), targets)`` for a
    batch ``(inputs, targets)`` (``inputs`` a tensor, or a tuple of the
    model's positional arguments), run through ``torch.func.functional_call``
    with ``params`` and the model's buffers; ``params`` is
    ``module_params(model)``, the trainable parameters, sharing storage with
    the model. Pass both to any tool: ``worst_case_loss``,
    ``top_hessian_eigenvalue``, ``hessian_trace``, ``hessian_vector_product``,
    ``loss_landscape_1d`` and ``loss_landscape_2d`` (``has_aux`` stays
    ``False``), and ``random_direction(params)``.

    One entry serves every tool, rather than a module version of each, because
    what a module changes is only the loss: the tools stay functions of
    ``(loss_fn, params, batch)``, and the parameters you measure at can be
    others than the model's (``state.params`` of a functional run, with
    ``buffers=state.buffers``).

    Measuring never changes the model. Each call of ``loss_fn`` puts the model
    in the mode chosen by ``train`` and afterwards gives every submodule back
    its own ``training`` flag, also when the forward pass raises. The buffers
    are copied on each call, so BatchNorm's running statistics and
    ``num_batches_tracked`` stay as they were even in training mode. The
    model's buffers are read at each call; ``buffers`` replaces those it names.

    Args:
        model: the model; its ``forward`` takes the batch's inputs.
        criterion: ``criterion(output, targets)`` returning a scalar tensor
            (``torch.nn.functional.cross_entropy``, an ``nn.CrossEntropyLoss()``).
        buffers: the buffers to measure with, ``{name: tensor}`` (such as a
            train state's ``buffers``); ``None`` uses the model's own, and a
            buffer left out of the dict is the model's.
        train: ``False`` (default) measures in eval mode: BatchNorm normalizes
            with its running statistics and dropout is off, so the loss is a
            function of the weights alone. ``True`` measures in training mode:
            BatchNorm normalizes with the batch's statistics and dropout draws
            a fresh mask on every call (seed ``torch.manual_seed`` or drop the
            dropout for repeatable numbers). ``None`` keeps the modes the
            submodules have (a model with frozen BatchNorm in training).

    Returns:
        ``(loss_fn, params)``: ``loss_fn(params, batch) -> loss`` and the
        model's trainable parameters as ``{name: tensor}``, detached.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``criterion`` is not
            callable, ``train`` is not ``True``, ``False`` or ``None``, or
            ``buffers`` is not a dict of tensors.
        ValueError: if ``buffers`` names something that is not a buffer of ``model``.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.2),
        ...     torch.nn.Linear(8, 3),
        ... )
        >>> batch = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> loss_fn, params = samfunc.module_sharpness_loss(
        ...     model, torch.nn.functional.cross_entropy
        ... )
        >>> worst = samfunc.worst_case_loss(loss_fn, params, batch, rho=0.05)
        >>> bool(worst.sharpness >= 0), model.training, int(model[1].num_batches_tracked)
        (True, True, 0)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(criterion):
        raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
    if train is not None and not isinstance(train, bool):
        raise TypeError(f"train must be True, False or None, got {train!r}")
    chosen = _checked_buffers(model, buffers)

    def loss_fn(params: Tensors, batch: Any) -> torch.Tensor:
        # Every buffer goes in (the given ones over the model's): module_loss copies them all
        # before the forward pass, so no buffer of the model is ever written.
        now = {n: b.detach() for n, b in model.named_buffers()}
        now.update(chosen or {})
        with _in_mode(model, train):
            loss, _ = module_loss(model, criterion, now)(params, batch)
        return loss

    return loss_fn, module_params(model)
