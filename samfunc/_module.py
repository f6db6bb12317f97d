"""The ``nn.Module`` bridge: parameters and buffers as pytrees, losses via ``functional_call``.

A module's trainable parameters become a dict pytree for ``sam_grad`` and the
optimizer; its buffers (BatchNorm running statistics) are threaded through the
loss function as an input and an output, never mutated in place. In a SAM step
the new buffers come from the first, unperturbed pass only, as in the seed's
training advice and the official JAX code.

Examples:
    >>> import torch
    >>> import samfunc
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
    ... )
    >>> params, buffers = samfunc.module_state(model)
    >>> loss_fn = samfunc.module_loss(model, torch.nn.functional.cross_entropy, buffers)
    >>> batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    >>> grads, (loss, aux) = samfunc.sam_grad(loss_fn, params, batch, has_aux=True)
    >>> buffers = aux.buffers  # running statistics from the pass at w
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.func import functional_call

from . import _tree

__all__ = [
    "ModuleAux",
    "module_params",
    "module_buffers",
    "module_state",
    "module_loss",
    "mean_over_parts",
    "load_into_module",
    "disable_running_stats",
    "enable_running_stats",
    "frozen_running_stats",
    "RunningStatsGuard",
]

Tensors = dict[str, torch.Tensor]


class ModuleAux(NamedTuple):
    """What ``module_loss`` returns beside the loss.

    Attributes:
        buffers: the module's buffers after the forward pass (updated running
            statistics in training mode; unchanged copies in eval mode).
        output: the module's output, detached (for accuracy and other metrics).
    """

    buffers: Tensors
    output: Any


def module_params(module: torch.nn.Module) -> Tensors:
    """The trainable parameters as ``{name: tensor}``, detached from autograd.

    Parameters with ``requires_grad=False`` are left out (``functional_call``
    then uses the module's own, so they are neither perturbed nor updated).
    Tied weights appear once, under their first name, and get one gradient.
    The tensors share storage with the module; samfunc never writes to them.
    """
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def module_buffers(module: torch.nn.Module) -> Tensors:
    """The buffers as ``{name: tensor}``, detached copies."""
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def module_state(module: torch.nn.Module) -> tuple[Tensors, Tensors]:
    """``(module_params(module), module_buffers(module))``."""
    return module_params(module), module_buffers(module)


def has_tied_tensors(module: torch.nn.Module) -> bool:
    """Whether one parameter or buffer of ``module`` is reachable under two names.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> has_tied_tensors(model)
        False
        >>> model[1].weight = model[0].weight
        >>> has_tied_tensors(model)
        True
    """
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    return len({id(t) for _, t in named}) != len(named)


def module_loss(
    module: torch.nn.Module,
    criterion: Callable[[Any, Any], torch.Tensor],
    buffers: Tensors | None = None,
    *,
    detach_output: bool = True,
    tie_weights: bool = True,
) -> Callable[[Tensors, Any], tuple[torch.Tensor, ModuleAux]]:
    """A ``loss_fn(params, batch) -> (loss, ModuleAux)`` for ``sam_grad(..., has_aux=True)``.

    ``batch`` is ``(inputs, targets)``: ``inputs`` a tensor, or a tuple of the
    module's positional arguments; the loss is ``criterion(output, targets)``.
    The module runs through ``torch.func.functional_call`` in its current
    train/eval mode. ``buffers`` are copied before the call, so the module may
    update the copies in place (BatchNorm does) while the caller's stay as they
    were; the copies come back in ``ModuleAux.buffers``.

    Build it inside your train step from that step's buffers: the function
    closes over them, and a fresh closure per step keeps the step pure.

    Args:
        module: the model.
        criterion: ``criterion(output, targets)`` returning a scalar tensor.
        buffers: the buffers to run with; ``None`` uses the module's own
            (read-only: they are copied first).
        detach_output: detach ``ModuleAux.output`` (default). samfunc's
            gradient functions detach aux anyway; a method that builds its
            loss from the outputs (``samfunc.mesa``) needs them attached.
        tie_weights: ``functional_call``'s: a value given for one of two tied
            parameters (one tensor under two names) is used for both. False
            skips the walk over the module that finds the ties, for a module
            without any (the train steps find that out once, when built).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> loss_fn = module_loss(model, torch.nn.functional.cross_entropy)
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> loss, aux = loss_fn(module_params(model), batch)
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not callable(criterion):
        raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
    start = module_buffers(module) if buffers is None else buffers

    def loss_fn(params: Tensors, batch: Any) -> tuple[torch.Tensor, ModuleAux]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"batch must be an (inputs, targets) pair, got {type(batch).__name__}")
        inputs, targets = batch
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        new_buffers = {name: b.clone() for name, b in start.items()}
        output = _call_with(module, params, new_buffers, args, tie_weights)
        loss = criterion(output, targets)
        if detach_output:
            output = _tree.detached(output)
        return loss, ModuleAux(buffers=new_buffers, output=output)

    return loss_fn


def _call_with(
    module: torch.nn.Module, params: Tensors, buffers: Tensors, args: tuple[Any, ...], tie: bool
) -> Any:
    """``functional_call(module, (params, buffers), args, tie_weights=tie)``.

    Eager, without ties to resolve, the module's own tensors are swapped for
    the given ones in its ``_parameters`` and ``_buffers`` and put back after
    the call: what ``functional_call`` does, without its per-call machinery
    (on a small model that machinery cost as much as the forward pass).
    Anything else (ties, a transform or ``torch.compile``, a tensor subclass,
    a name that is not a parameter or buffer) goes to ``functional_call``.
    """
    slots = None if tie or not _tree.fused_ops() else _slots(module, (params, buffers))
    if slots is None:
        return functional_call(module, (params, buffers), args, tie_weights=tie)
    originals = [table[key] for table, key, _ in slots]
    try:
        for table, key, value in slots:
            table[key] = value
        return module(*args)
    finally:
        for (table, key, _), original in zip(slots, originals):
            table[key] = original


Slot = tuple[dict[str, Any], str, torch.Tensor]


def _slots(module: torch.nn.Module, trees: tuple[Tensors, Tensors]) -> list[Slot] | None:
    """Where each named tensor lives in ``module`` (its table and key), or None if one does not."""
    found: list[Slot] = []
    owners: dict[str, torch.nn.Module] = {"": module}
    for tree in trees:
        for name, value in tree.items():
            if type(value) not in _SWAPPABLE:
                return None
            prefix, _, key = name.rpartition(".")
            owner = owners.get(prefix)
            if owner is None:
                try:
                    owner = owners[prefix] = module.get_submodule(prefix)
                except AttributeError:
                    return None
            if key in owner._parameters:
                found.append((owner._parameters, key, value))
            elif key in owner._buffers:
                found.append((owner._buffers, key, value))
            else:
                return None
    return found


_SWAPPABLE = (torch.Tensor, torch.nn.Parameter)


def mean_over_parts(buffers: Tensors) -> Tensors:
    """Reduces buffers stacked over chunks or micro-batches to one set.

    ``sam_grad`` with ``num_chunks`` or ``accum_steps`` stacks the aux of each
    part on a new leading axis. Averaging floating-point running statistics
    gives the running mean a full-batch step would have (and the running
    variance to within the spread of the part means); integer buffers such as
    ``num_batches_tracked`` are the same in every part and the first is kept.

    Examples:
        >>> import torch
        >>> mean_over_parts({"m": torch.tensor([[1.0], [3.0]]), "n": torch.tensor([4, 4])})
        {'m': tensor([2.]), 'n': tensor(4)}
    """
    return {name: b.mean(0) if b.is_floating_point() else b[0] for name, b in buffers.items()}


@torch.no_grad()
def load_into_module(
    module: torch.nn.Module, params: Tensors, buffers: Tensors | None = None
) -> None:
    """Copies functional params (and buffers) back into ``module``, in place.

    For evaluation with ordinary PyTorch code or for saving a ``state_dict``;
    the training loop itself never needs it.

    Raises:
        KeyError: if a name is not a parameter (or buffer) of ``module``.
    """
    own_params = dict(module.named_parameters())
    own_buffers = dict(module.named_buffers())
    for name, value in params.items():
        if name not in own_params:
            raise KeyError(f"params has {name!r}, which is not a parameter of the module")
        own_params[name].copy_(value)
    for name, value in (buffers or {}).items():
        if name not in own_buffers:
            raise KeyError(f"buffers has {name!r}, which is not a buffer of the module")
        own_buffers[name].copy_(value)


# --- BatchNorm helpers for the stateful path (the seed's training loop) ---


def _batch_norms(model: torch.nn.Module) -> Iterator[torch.nn.modules.batchnorm._BatchNorm]:
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            yield module


def disable_running_stats(model: torch.nn.Module) -> None:
    """Stops BatchNorm layers updating their running statistics (the seed's helper).

    Call it before the second, perturbed forward pass; ``enable_running_stats``
    undoes it. Besides setting ``momentum`` to 0 as the seed does, this keeps
    ``num_batches_tracked`` from counting the second pass.
    """
    for bn in _batch_norms(model):
        if hasattr(bn, "_samfunc_saved"):
            continue
        tracked = bn.num_batches_tracked
        saved = tracked.clone() if isinstance(tracked, torch.Tensor) else None
        bn._samfunc_saved = (bn.momentum, saved)  # type: ignore[assignment]
        bn.momentum = 0.0


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undoes ``disable_running_stats``."""
    for bn in _batch_norms(model):
        saved = getattr(bn, "_samfunc_saved", None)
        if saved is None:
            continue
        momentum, tracked = saved
        bn.momentum = momentum
        if tracked is not None and isinstance(bn.num_batches_tracked, torch.Tensor):
            with torch.no_grad():
                bn.num_batches_tracked.copy_(tracked)
        del bn._samfunc_saved


@contextlib.contextmanager
def frozen_running_stats(model: torch.nn.Module) -> Iterator[None]:
    """A context in which BatchNorm running statistics stay as they are.

    Examples:
        >>> import torch
        >>> model = torch.nn.BatchNorm1d(3)
        >>> with frozen_running_stats(model):
        ...     _ = model(torch.randn(8, 3))
        >>> model.running_mean
        tensor([0., 0., 0.])
    """
    disable_running_stats(model)
    try:
        yield
    finally:
        enable_running_stats(model)


class RunningStatsGuard:
    """Keeps BatchNorm running statistics from changing between ``start()`` and ``stop()``.

    SAM's rule is that running statistics come from the first pass only. The
    second pass (at ``w + e``) runs the same modules in training mode, which
    would update them again. While started, a global forward pre-hook notes
    the running statistics of every normalization module with
    ``track_running_stats`` in training mode the first time it runs;
    ``stop()`` puts them back. The interpreter wraps every second pass in one
    (in eager mode, outside function transforms; a compiled module step
    threads its buffers functionally instead), and ``samfunc.SAM`` holds one
    from ``first_step`` to ``second_step``, so ``step(closure)``, the seed's
    two-step loop and ``sam_grad`` over ``functional_call`` all count one
    update per step.

    Examples:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> guard = RunningStatsGuard()
        >>> guard.start()
        >>> _ = bn(torch.randn(4, 2))
        >>> guard.stop()
        >>> int(bn.num_batches_tracked)
        0
    """

    def __init__(self) -> None:
        self._handle: Any = None
        self._saved: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def active(self) -> bool:
        """Whether the guard is started."""
        return self._handle is not None

    def start(self) -> None:
        """Starts watching (no-op inside ``torch.compile`` or a function transform)."""
        if self._handle is not None or not _can_guard():
            return
        self._saved = {}
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._note)

    def _note(self, module: torch.nn.Module, args: Any) -> None:
        del args
        if not isinstance(module, _NormBase) or not module.training:
            return
        if not _can_guard():  # a forward traced or transformed meanwhile: its buffers are not these
            return
        if not module.track_running_stats or id(module) in self._saved:
            return
        buffers = [
            b
            for b in (module.running_mean, module.running_var, module.num_batches_tracked)
            if isinstance(b, torch.Tensor)
        ]
        with torch.no_grad():
            self._saved[id(module)] = (buffers, [b.clone() for b in buffers])

    def stop(self) -> None:
        """Stops watching and puts back what the watched modules' forwards changed."""
        saved = self._saved
        self.release()
        with torch.no_grad():
            for buffers, values in saved.values():
                for buffer, value in zip(buffers, values):
                    buffer.copy_(value)

    def release(self) -> None:
        """Stops watching and forgets what it noted, putting nothing back.

        For an owner that goes away mid-step (a ``samfunc.SAM`` dropped between
        ``first_step`` and ``second_step``): its global hook must not outlive it.
        """
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._saved = {}

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """``start()`` on entry, ``stop()`` on exit (also on an error)."""
        self.start()
        try:
            yield
        finally:
            self.stop()


_NormBase = torch.nn.modules.batchnorm._NormBase


def _can_guard() -> bool:
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.maybe_current_level() is None
