"""``samfunc.SAM``: the seed's stateful optimizer API, on samfunc's pure core.

A drop-in replacement for ``from sam import SAM``::

    optimizer = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    loss_fn(model(x), y).backward()        # first pass, at w
    optimizer.first_step(zero_grad=True)   # climb to w + e(w)
    loss_fn(model(x), y).backward()        # second pass, at w + e
    optimizer.second_step(zero_grad=True)  # back to w, then the base optimizer's step

The ascent step ``e`` comes from the same function as ``samfunc.sam_grad``'s.
Two of the seed's slips are fixed: every parameter perturbed in ``first_step``
is restored in ``second_step`` even if it got no gradient in the second pass,
and the base optimizer's state is part of ``state_dict`` so a resumed run is
bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch

from ._sam import _perturbation_leaves
from ._validate import check_nonnegative

__all__ = [
    "SAM",
    "disable_running_stats",
    "enable_running_stats",
    "frozen_running_stats",
]


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim``
            optimizer. A group may set its own ``rho``, ``adaptive`` and ``eta``.
        base_optimizer: the optimizer class that makes the actual update,
            e.g. ``torch.optim.SGD``; built on the same ``param_groups``.
        rho: the neighbourhood radius (per group).
        adaptive: ASAM, with ``T = |w| + eta`` (per group).
        eta: ASAM's offset; the seed uses 0 (per group).
        **kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    Attributes:
        base_optimizer: the wrapped optimizer. It shares ``param_groups`` with
            this one, so ``torch.optim.lr_scheduler`` works on either.

    Example:
        >>> import torch
        >>> import samfunc
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> def closure():
        ...     loss = model(torch.ones(4, 3)).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        **kwargs: Any,
    ) -> None:
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        if not callable(base_optimizer):
            raise TypeError(
                f"base_optimizer must be an optimizer class, got {type(base_optimizer).__name__}"
            )
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **kwargs)
        super().__init__(params, defaults)
        for index, group in enumerate(self.param_groups):
            check_nonnegative(f"param_groups[{index}]['rho']", group["rho"])
            check_nonnegative(f"param_groups[{index}]['eta']", group["eta"])
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        # Storage for w, reused from step to step (as the seed's "old_p"), and
        # the parameters first_step moved in the current step.
        self._backup: dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed: list[torch.Tensor] = []

    def _with_grads(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Moves every parameter with a gradient from ``w`` to ``w + e(w)``.

        Args:
            zero_grad: clear the gradients afterwards, ready for the second pass.
        """
        if self._perturbed:
            raise RuntimeError("first_step called twice without second_step in between")
        pairs = list(self._with_grads())
        if pairs:
            params = [p for _, p in pairs]
            grads = [p.grad for _, p in pairs]
            e = _perturbation_leaves(
                params,
                grads,  # type: ignore[arg-type]
                [float(group["rho"]) for group, _ in pairs],
                [bool(group["adaptive"]) for group, _ in pairs],
                [float(group["eta"]) for group, _ in pairs],
                "l2",
            )
            for p in params:
                if p not in self._backup:
                    self._backup[p] = torch.empty_like(p)
            torch._foreach_copy_([self._backup[p] for p in params], params)
            self._perturbed = params
            torch._foreach_add_(params, e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Puts back ``w`` for every parameter ``first_step`` moved (a no-op otherwise)."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self._backup[p] for p in self._perturbed])
        self._perturbed = []

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Returns to ``w`` and runs the base optimizer with the gradients at ``w + e``.

        Args:
            zero_grad: clear the gradients afterwards.
        """
        self.restore()
        self.base_optimizer.step()
        # torch.optim.lr_scheduler wraps SAM.step to note that the optimizer
        # stepped; the two-step API goes around it, so note it here.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """A whole SAM step around ``closure``, which does a forward-backward pass.

        If no parameter has a gradient yet, the closure first runs at ``w`` to
        get one (so ``step(closure)`` alone is a complete step); then
        ``first_step``, the closure again at ``w + e``, and ``second_step``. If the
        closure raises, the parameters are put back to ``w`` before the error
        propagates, and the base optimizer does not step.

        Returns:
            What the first closure call that ``step`` made returned: the loss at
            ``w`` when ``step`` ran the first pass itself, else the loss at ``w + e``.
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that runs a forward-backward pass; "
                "or call first_step() and second_step() yourself"
            )
        closure_with_grad = torch.enable_grad()(closure)
        first_loss = None
        if not any(True for _ in self._with_grads()):
            first_loss = closure_with_grad()
        self.first_step(zero_grad=True)
        try:
            perturbed_loss = closure_with_grad()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return perturbed_loss if first_loss is None else first_loss

    def state_dict(self) -> dict[str, Any]:
        """This optimizer's groups plus the base optimizer's whole state."""
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads groups and the base optimizer's state; they share groups again after."""
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_optimizer", None)
        super().load_state_dict(state_dict)
        if base_state is not None:
            self.base_optimizer.load_state_dict(base_state)
        self.base_optimizer.param_groups = self.param_groups


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

    Example:
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
