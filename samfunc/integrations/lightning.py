"""What ``samfunc.SAM`` needs to know about training frameworks that wrap it.

Nothing here imports a framework (PyTorch Lightning is optional): the wrappers are
recognized by the attributes they keep.

PyTorch Lightning hands ``LightningModule.optimizers()`` a ``LightningOptimizer``
(``pytorch_lightning/core/optimizer.py``). It keeps the optimizer in ``_optimizer``,
forwards attribute *reads* to it with ``__getattr__``, and makes itself a subclass of
the optimizer's class, so ``wrapper.first_step()`` runs ``SAM.first_step`` with the
wrapper as ``self``: the attributes it writes (the step's flags, ``method_state``,
``skipped_steps``) would land on the wrapper, where the optimizer that Lightning
checkpoints never sees them. In manual optimization Lightning counts a step
(``trainer.global_step``, hence ``max_steps``) only around ``LightningOptimizer.step``,
through the two callbacks its loop sets on the wrapper, ``_on_before_step`` and
``_on_after_step`` (``pytorch_lightning/loops/optimization/manual.py``).

In automatic optimization Lightning hands ``SAM.step`` a closure that runs
``training_step``, ``zero_grad`` and ``backward``, so everything ``training_step``
does happens twice per update: at ``w`` and at ``w + e``. BatchNorm's running
statistics are put back after the second pass by the step itself; the rest is
the module's: ``self.log`` would record the loss at ``w + e``, a torchmetrics
metric would count every batch twice, and the step's outputs (what
``on_train_batch_end`` receives) would be the second pass's, which Lightning's
``Closure`` keeps in ``_result`` (``pytorch_lightning/loops/optimization/automatic.py``).
``second_pass`` marks the closure's run at ``w + e`` (``in_second_pass``), and
``LightningSAMMixin`` makes a ``LightningModule`` count only the first pass.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, Optional, cast

import torch

__all__ = [
    "LightningSAMMixin",
    "counted_as_step",
    "in_second_pass",
    "kept_metric_states",
    "second_pass",
    "wrapped_optimizer",
]

_SECOND_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "samfunc_second_pass", default=False
)


def wrapped_optimizer(optimizer: Any) -> Any:
    """The optimizer a ``LightningOptimizer``-style wrapper holds, or ``None``.

    Examples:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> wrapped_optimizer(opt) is None
        True
    """
    inner = vars(optimizer).get("_optimizer")
    return inner if inner is not optimizer else None


@contextlib.contextmanager
def counted_as_step(wrapper: Any) -> Iterator[None]:
    """Runs the body as Lightning runs ``LightningOptimizer.step``: between its step callbacks.

    In manual optimization they count the step (``trainer.global_step``); elsewhere
    they do nothing. As in Lightning, the second one is not called if the body raises.
    A wrapper without them (not Lightning's) runs the body alone.

    Examples:
        >>> class Wrapper:
        ...     def __init__(self):
        ...         self.steps = 0
        ...         self._on_after_step = lambda: setattr(self, "steps", self.steps + 1)
        >>> wrapper = Wrapper()
        >>> with counted_as_step(wrapper):
        ...     pass
        >>> wrapper.steps
        1
    """
    hooks = vars(wrapper)
    before, after = hooks.get("_on_before_step"), hooks.get("_on_after_step")
    if callable(before):
        before()
    yield
    if callable(after):
        after()


def in_second_pass() -> bool:
    """Whether ``samfunc.SAM.step(closure)`` is running the closure at ``w + e`` now.

    True only inside that call of the closure (in this thread); False in the
    first pass, at ``w``, and everywhere else, ``first_step``/``second_step``
    included. A closure or a hook it calls can use it to log, or update a
    metric, once per step: with the first pass's numbers, which are the ones
    to report. ``LightningSAMMixin`` does this for a ``LightningModule``.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = samfunc.SAM([w], torch.optim.SGD, lr=0.1)
        >>> seen = []
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (w**2).sum()
        ...     loss.backward()
        ...     seen.append(samfunc.in_second_pass())
        ...     return loss
        >>> _ = opt.step(closure)
        >>> seen
        [False, True]
    """
    return _SECOND_PASS.get()


@contextlib.contextmanager
def second_pass() -> Iterator[None]:
    """Marks the body as the closure's run at ``w + e`` (see ``in_second_pass``).

    Examples:
        >>> with second_pass():
        ...     in_second_pass()
        True
        >>> in_second_pass()
        False
    """
    token = _SECOND_PASS.set(True)
    try:
        yield
    finally:
        _SECOND_PASS.reset(token)


def _is_metric(module: torch.nn.Module) -> bool:
    """A torchmetrics ``Metric``, recognized by its state names and update count."""
    return isinstance(vars(module).get("_defaults"), dict) and "_update_count" in vars(module)


#: A metric's bookkeeping besides its states, put back with them.
_METRIC_ATTRIBUTES = ("_update_count", "_computed", "_forward_cache")


@contextlib.contextmanager
def kept_metric_states(module: torch.nn.Module) -> Iterator[None]:
    """Puts back, after the body, the state of every torchmetrics metric in ``module``.

    Each metric's states (``metric.metric_state``: tensors and lists of them) are
    the same objects again, holding what they held before the body, so a state
    two metrics share (a ``MetricCollection``'s compute groups) stays shared; its
    update count, cached ``compute()`` and last ``forward`` value are put back
    too. Metrics are found among ``module.modules()``, recognized by the
    attributes a torchmetrics ``Metric`` keeps (torchmetrics is not imported).

    Examples:
        >>> import torch
        >>> class Total(torch.nn.Module):  # the attributes a torchmetrics Metric keeps
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.total, self._defaults = torch.zeros(()), {"total": torch.zeros(())}
        ...         self._update_count, self._computed, self._forward_cache = 0, None, None
        >>> metric = Total()
        >>> with kept_metric_states(torch.nn.ModuleList([metric])):
        ...     metric.total += 5.0
        ...     metric._update_count += 1
        >>> float(metric.total), metric._update_count
        (0.0, 0)
    """
    saved: list[tuple[torch.nn.Module, dict[str, Any]]] = []
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    lists: dict[int, tuple[list[Any], list[Any]]] = {}
    with torch.no_grad():
        for metric in module.modules():
            if not _is_metric(metric):
                continue
            for name in vars(metric)["_defaults"]:
                value = getattr(metric, name)
                if isinstance(value, torch.Tensor):
                    copies.setdefault(id(value), (value, value.clone()))
                elif isinstance(value, list):
                    lists.setdefault(id(value), (value, list(value)))
            names = (*vars(metric)["_defaults"], *_METRIC_ATTRIBUTES)
            saved.append((metric, {name: getattr(metric, name, None) for name in names}))
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in copies.values():
                tensor.copy_(copy)
        for items, before in lists.values():
            items[:] = before
        for metric, attributes in saved:
            for name, value in attributes.items():
                setattr(metric, name, value)


class LightningSAMMixin:
    """Makes a ``LightningModule`` trained with ``samfunc.SAM`` count the first pass only.

    With automatic optimization ``training_step`` runs twice per update, at
    ``w`` and at ``w + e``. Put this class first among the module's bases and,
    in the run at ``w + e`` (``samfunc.in_second_pass()``):

    * ``self.log`` and ``self.log_dict`` do nothing, wherever they are called
      from (``training_step``, ``on_before_optimizer_step``, ...), so what is
      logged, shown and monitored is the first pass's;
    * every torchmetrics metric that is a submodule (directly, in a
      ``ModuleDict`` or in a ``MetricCollection``) is put back as it was before
      it, so ``metric.update(...)`` and ``metric(...)`` count each batch once;
    * the step's outputs (what ``on_train_batch_end`` receives) stay the first
      pass's.

    BatchNorm's running statistics come from the first pass without it, and the
    dropout masks of both passes are the same with ``SAM(..., reuse_rng=True)``.
    The mixin does its work in ``optimizer_step``: if the module overrides it,
    call ``super().optimizer_step(...)`` there. Manual optimization runs the
    closure itself; there the mixin's ``self.log`` rule holds, and metrics are
    best updated outside the closure.

    Examples:
        A module's one added line is its first base class (Lightning is not
        imported here, so a stand-in plays ``LightningModule``)::

            class LitSAM(samfunc.LightningSAMMixin, pl.LightningModule):
                ...

        >>> import torch
        >>> import samfunc
        >>> class Module:  # stands in for pl.LightningModule
        ...     def __init__(self):
        ...         self.logged = []
        ...
        ...     def log(self, name, value):
        ...         self.logged.append((name, value.item()))
        >>> class LitSAM(samfunc.LightningSAMMixin, Module):
        ...     pass
        >>> lit = LitSAM()
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = samfunc.SAM([w], torch.optim.SGD, rho=0.05, lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (w**2).sum()
        ...     loss.backward()
        ...     lit.log("train_loss", loss)
        ...     return loss
        >>> _ = opt.step(closure)
        >>> lit.logged  # the loss at w only
        [('train_loss', 2.0)]
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        owner = next((k for k in cls.__mro__ if "log" in vars(k)), None)
        if owner is not None and owner is not LightningSAMMixin and _is_lightning(owner):
            raise TypeError(
                f"{cls.__name__} has {owner.__name__} before LightningSAMMixin among its bases, "
                "so the mixin does nothing: put it first, e.g. "
                f"class {cls.__name__}(samfunc.LightningSAMMixin, pl.LightningModule)"
            )

    def log(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, except in the second pass, where it does nothing."""
        if not in_second_pass():
            cast(Any, super()).log(*args, **kwargs)

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log_dict``, except in the second pass, where it does nothing."""
        if not in_second_pass():
            cast(Any, super()).log_dict(*args, **kwargs)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Optional[Callable[[], Any]] = None,
    ) -> None:
        """``LightningModule.optimizer_step`` with a closure whose second pass leaves metrics be.

        Args:
            epoch: the current epoch.
            batch_idx: the batch's index in the epoch.
            optimizer: the optimizer (Lightning's wrapper around ``samfunc.SAM``).
            optimizer_closure: Lightning's closure (``training_step``,
                ``zero_grad``, ``backward``).
        """
        if optimizer_closure is not None:
            optimizer_closure = _first_pass_counts(cast(torch.nn.Module, self), optimizer_closure)
        cast(Any, super()).optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def _is_lightning(cls: type) -> bool:
    return cls.__module__.startswith(("pytorch_lightning.", "lightning.pytorch."))


def _first_pass_counts(module: torch.nn.Module, closure: Callable[[], Any]) -> Callable[[], Any]:
    """``closure``, whose run at ``w + e`` leaves ``module``'s metrics and the step's outputs."""

    def counted() -> Any:
        if not in_second_pass():
            return closure()
        # Lightning's Closure keeps the outputs of its last run in _result.
        outputs = getattr(closure, "__dict__", {}).get("_result")
        with kept_metric_states(module):
            loss = closure()
        if outputs is not None:
            closure._result = outputs  # type: ignore[attr-defined]
        return loss

    return counted
