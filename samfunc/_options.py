"""The engine's options, checked once, and the checks on what a pass is given and returns.

Examples:
    >>> run_options({"accum_steps": 2}).accum_steps
    2
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from . import _tree
from ._base import EngineOptions, LossFn, Params
from ._distributed import DataParallel, check_data_parallel
from ._finite import NonFinitePolicy, check_policy
from ._tree import PyTree
from ._validate import check_bool, check_positive_int

__all__ = [
    "FIRST_PASS",
    "SECOND_PASS",
    "ONE_PASS",
    "ENGINE_POLICIES",
    "RunOptions",
    "run_options",
    "check_params",
    "checked_loss_fn",
    "mean_of_samples",
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
    # Not an engine option: False where the loss threads the module's buffers itself
    # (module_loss copies them), so the second pass needs no RunningStatsGuard.
    guard_running_stats: bool = True

    @property
    def local(self) -> bool:
        """Data-parallel in ``"local"`` mode: each process perturbs with its own gradient."""
        return self.data_parallel is not None and not self.data_parallel.is_global

    @property
    def reduces_each_pass(self) -> bool:
        """Data-parallel in ``"global"`` mode: each pass's gradient is averaged."""
        return self.data_parallel is not None and self.data_parallel.is_global


#: The options a caller may pass: ``samfunc.EngineOptions``'s, in ``RunOptions``' order.
ENGINE_OPTIONS = tuple(
    name
    for name in RunOptions._fields
    if name in EngineOptions.__required_keys__ | EngineOptions.__optional_keys__
)


def run_options(options: EngineOptions) -> RunOptions:
    """Checks the engine's options (unknown names included) once; fills in defaults."""
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected option {unknown[0]!r}; the engine's options are {ENGINE_OPTIONS}"
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
    if all(_plain_float_tensor(leaf) for leaf in leaves):  # one walk on the hot path
        return
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


def _plain_float_tensor(leaf: Any) -> bool:
    """A floating-point tensor that is not an ``nn.Parameter`` requiring grad."""
    if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
        return False
    return not (isinstance(leaf, torch.nn.Parameter) and leaf.requires_grad)


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


def mean_of_samples(loss_fn: LossFn, has_aux: bool) -> LossFn:
    """``loss_fn`` returning per-sample losses, as ``(mean, (per-sample, aux))``."""

    def mean_loss(params: Params, batch: Batch) -> tuple[torch.Tensor, Any]:
        out = loss_fn(params, batch)
        losses, aux = out if has_aux else (out, ())  # () not None: no leaf for torch.func
        return losses.mean(), (losses.detach(), aux)

    return mean_loss
