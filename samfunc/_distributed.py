"""Data-parallel SAM over ``torch.distributed``: averaging gradient trees across processes.

With data parallelism each process holds one shard of the batch, so a
sharpness-aware step has a choice to make about the first pass's gradient:

* ``"local"`` (default, the paper's m-sharpness and the official JAX code):
  each process forms ``e`` from its own gradient, runs its second pass, and
  only the method's output (with the loss and the method's floating-point
  state) is averaged, in one all-reduce per step. Over ``P`` processes this
  equals one process running ``num_chunks=P`` on the concatenated batch.
* ``"global"``: the first-pass gradient is averaged before ``e`` is formed, so
  every process perturbs identically and the step equals single-process SAM
  on the concatenated batch; one all-reduce per pass.

A one-pass step (a policy's cheap step, Momentum-SAM, MESA, the plain
gradient) averages its one gradient in either mode. Reductions concatenate
the leaves of one dtype and device into one flat buffer and all-reduce it
with ``torch.distributed._functional_collectives``, so a compiled step keeps
``fullgraph=True``.

Examples:
    >>> import samfunc
    >>> samfunc.data_parallel("global")
    DataParallel(mode='global', group=None)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.distributed as dist

from . import _tree
from ._tree import PyTree

__all__ = [
    "Mode",
    "DataParallel",
    "data_parallel",
    "all_mean",
    "mean_leaves",
    "refuse_parallel_wrapper",
]

Mode = Literal["local", "global"]
MODES = ("local", "global")


class DataParallel(NamedTuple):
    """How a step reduces across the processes of a data-parallel group.

    Build it with ``samfunc.data_parallel``; pass it as ``data_parallel=`` to
    ``sam_grad``, any method's ``grad`` or either train-step builder.

    Attributes:
        mode: ``"local"`` (each process perturbs with its own gradient; the
            results are averaged) or ``"global"`` (the first-pass gradient is
            averaged first: single-process SAM on the whole batch).
        group: the process group (None: the default, every process).
    """

    mode: Mode = "local"
    group: Optional[Any] = None

    @property
    def is_global(self) -> bool:
        """Whether the first pass's gradient is averaged before the ascent."""
        return self.mode == "global"


def data_parallel(mode: Mode = "local", group: Optional[Any] = None) -> DataParallel:
    """Reduces a step's gradients across processes, in ``mode``.

    Args:
        mode: ``"local"`` (default): each process's ``e`` comes from its own
            batch shard, as the SAM paper's m-sharpness (with ``m`` the
            per-process batch); ``"global"``: the step equals single-process
            SAM on the whole batch, at the cost of a second all-reduce.
        group: a ``torch.distributed`` process group; None for the default one.

    Returns:
        A ``DataParallel`` to pass as ``data_parallel=``.

    Examples:
        >>> import samfunc
        >>> samfunc.data_parallel().mode
        'local'
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    return DataParallel(mode, group)


def check_data_parallel(value: Any) -> Optional[DataParallel]:
    """``value`` if it is None or a ``DataParallel``, else an error naming the argument."""
    if value is None or isinstance(value, DataParallel):
        return value
    raise TypeError(
        "data_parallel must be samfunc.data_parallel('local' or 'global') or None, "
        f"got {type(value).__name__}"
    )


def refuse_parallel_wrapper(module: torch.nn.Module) -> None:
    """A DDP- or FSDP2-wrapped module cannot run in a functional step; an error says what can.

    Their forward passes synchronize (DDP's reducer waits for gradients on its
    own parameters; FSDP2 gathers its own shards), which parameters swapped in
    by ``torch.func.functional_call`` never trigger.
    """
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        raise TypeError(
            "make_module_train_step takes the plain module, not DistributedDataParallel: pass "
            "module.module and data_parallel=samfunc.data_parallel(...), which averages the "
            "gradients itself"
        )
    if isinstance(module, FSDPModule):
        raise TypeError(
            "a fully_shard (FSDP2) module gathers its own sharded parameters, which a functional "
            "step cannot swap in: use samfunc.SAM with the sharded module, or DTensor parameters "
            "with make_train_step"
        )


def _world_size(group: Optional[Any]) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "data_parallel reduces across processes, but torch.distributed is not initialized: "
            "call torch.distributed.init_process_group first (torchrun sets it up)"
        )
    return dist.get_world_size(group)


def _reduce_flat(
    tensors: Sequence[torch.Tensor], group: Optional[Any], world: int
) -> list[torch.Tensor]:
    """The mean over processes of tensors of one dtype and device, in one all-reduce."""
    from torch.distributed import _functional_collectives as funcol

    flats = [t.reshape(-1) for t in tensors]
    flat = torch.cat(flats) if len(flats) > 1 else flats[0]
    target: Any = dist.group.WORLD if group is None else group
    summed = funcol.all_reduce(flat, "sum", target)
    mean = summed / world  # gloo has no AVG; every rank gets the same sum
    pieces = torch.split(mean, [t.numel() for t in tensors])
    return [piece.view(t.shape) for piece, t in zip(pieces, tensors)]


def mean_leaves(tensors: Sequence[Any], group: Optional[Any]) -> list[Any]:
    """Each floating tensor averaged over the group's processes; other leaves as they are.

    Leaves of one dtype and device share one flat buffer and one all-reduce.
    """
    world = _world_size(group)
    found = next((t for t in tensors if _tree.is_dtensor(t)), None)
    if found is not None:
        raise TypeError(
            "data_parallel cannot average DTensor leaves: a DTensor's gradient is already "
            "reduced over its device mesh (FSDP2, tensor parallel); leave data_parallel unset"
        )
    out = list(tensors)
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            buckets.setdefault((t.dtype, t.device), []).append(index)
    for indices in buckets.values():
        reduced = _reduce_flat([tensors[i] for i in indices], group, world)
        for i, r in zip(indices, reduced):
            out[i] = r
    return out


def all_mean(tree: PyTree, group: Optional[Any] = None) -> PyTree:
    """Averages a tree of floating-point tensors across the processes of ``group``.

    One all-reduce per dtype and device (the leaves are concatenated into one
    flat buffer), with functional collectives, so it also runs inside
    ``torch.compile(fullgraph=True)``. Every process gets the same bits.

    Args:
        tree: a pytree of floating-point tensors, e.g. gradients.
        group: a process group; None for the default one.

    Returns:
        A tree of the same structure holding the means.

    Example (in each process of ``torchrun --nproc-per-node 2``)::

        grads = samfunc.all_mean(grads)
    """
    leaves, spec = _tree.flatten(tree)
    found = _tree.find_leaf(
        tree, lambda leaf: not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point())
    )
    if found is not None:
        what = found[1].dtype if isinstance(found[1], torch.Tensor) else type(found[1]).__name__
        raise TypeError(f"all_mean averages floating-point tensors, got {what} at {found[0]}")
    return _tree.unflatten(mean_leaves(leaves, group), spec)


def mean_with_loss(
    grads: PyTree, loss: torch.Tensor, extra: PyTree, group: Optional[Any]
) -> tuple[PyTree, torch.Tensor, PyTree]:
    """``grads``, ``loss`` and the floating leaves of ``extra`` averaged in one reduction."""
    grad_leaves, grad_spec = _tree.flatten(grads)
    extra_leaves, extra_spec = _tree.flatten(extra)
    reduced = mean_leaves([*grad_leaves, loss, *extra_leaves], group)
    count = len(grad_leaves)
    return (
        _tree.unflatten(reduced[:count], grad_spec),
        reduced[count],
        _tree.unflatten(reduced[count + 1 :], extra_spec),
    )
