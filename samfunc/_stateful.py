"""``samfunc.SAM``: the seed's stateful optimizer API, on samfunc's pure core.

A drop-in replacement for ``from sam import SAM``::

    optimizer = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    loss_fn(model(x), y).backward()        # first pass, at w
    optimizer.first_step(zero_grad=True)   # climb to w + e(w)
    loss_fn(model(x), y).backward()        # second pass, at w + e
    optimizer.second_step(zero_grad=True)  # back to w, then the base optimizer's step

The ascent step ``e`` comes from the same pieces as ``samfunc.sam_grad``'s, and
``SAM(..., method=samfunc.gsam(...))`` runs any method (GSAM, Friendly-SAM,
VaSSO, WSAM, ESAM's weight perturbation) with the same numbers as its
functional ``grad``.
Slips of the seed's that are fixed here: every parameter perturbed in
``first_step`` is restored in ``second_step`` even if it got no gradient in the
second pass; the base optimizer's state is part of ``state_dict``, pickling and
``copy.deepcopy``, so a resumed run is bitwise identical to an uninterrupted
one; ``step(closure)`` is right when called every step in a loop (see its
docstring); a NaN or inf gradient raises (or skips the step) instead of
turning every parameter into NaN; the seed's checkpoints load as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Optional

import torch

from . import _integrations, _tree
from ._ascent import normalize, sam_ascent, scale_by_param_abs, scale_by_radius
from ._base import GradientTransformation, Method, MethodState
from ._combine import chain, masked
from ._efficient import MesaGrad, MomentumSamGrad, MomentumSamState
from ._engine import FIRST_PASS, ONE_PASS, SECOND_PASS, MethodGrad, counted
from ._finite import NonFinitePolicy, check_policy, raise_if_nonfinite
from ._validate import check_bool, check_nonnegative

__all__ = ["SAM"]

#: The per-group options SAM adds to the base optimizer's.
SAM_OPTIONS = ("rho", "adaptive", "eta")
CLASS_POLICIES = ("raise", "skip", "propagate")


class _BackwardWatch:
    """Notes that a backward pass accumulated a gradient into a watched parameter.

    ``step(closure)`` asks it whether the gradients in ``.grad`` are a fresh
    first pass (the seed's pattern: ``loss.backward()`` then ``step(closure)``)
    or what the previous step left behind (the PyTorch pattern, where the
    closure does everything).
    """

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, param: torch.Tensor) -> None:
        del param
        self.seen = True


def _check_group(index: int, group: dict[str, Any]) -> None:
    where = f"param_groups[{index}]"
    check_nonnegative(f"{where}['rho']", group["rho"])
    check_nonnegative(f"{where}['eta']", group["eta"])
    check_bool(f"{where}['adaptive']", group["adaptive"])


def _check_method(method: Any, rho: float, adaptive: bool, eta: float) -> Optional[Method]:
    """``method`` if the class can run it, with SAM's own options left at their defaults."""
    if method is None:
        return None
    if isinstance(method, Method) and isinstance(method.grad, MesaGrad):
        raise TypeError(
            "mesa changes the loss (a KL term to the teacher's outputs), which SAM.step never "
            "sees: use make_module_train_step(..., method=samfunc.mesa(...)), or add "
            "samfunc.distillation_kl to your own loss"
        )
    if not isinstance(method, Method) or not isinstance(method.grad, (MethodGrad, MomentumSamGrad)):
        raise TypeError(
            "method must be built by samfunc (samfunc.sam, gsam, ... or sharpness_aware), "
            f"got {type(method).__name__}"
        )
    if rho != 0.05 or adaptive or eta != 0.0:
        raise ValueError(
            "with method=..., set rho (and adaptive, eta) in the method, e.g. "
            f"samfunc.gsam(rho={rho}); got rho={rho}, adaptive={adaptive}, eta={eta} here"
        )
    fraction = getattr(method.grad, "select_fraction", None)
    if fraction is not None and fraction < 1.0:
        raise ValueError(
            f"{method.grad.name}'s data selection ranks per-sample losses, which SAM.step never "
            f"sees: use the functional method.grad or a train step, or gamma=1.0 (got {fraction})"
        )
    return method


def _grads_or_zeros(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's ``.grad``, zeros where it has none (what a method sees)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


def _set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Puts a method's gradient into ``.grad``, in place where a gradient is already there."""
    for p, new in zip(params, grads):
        if p.grad is None:
            p.grad = new
        elif new is not p.grad:
            p.grad.copy_(new)


def _groups_ascent(options: Sequence[tuple[float, bool, float]]) -> GradientTransformation:
    """SAM's ascent over a flat list of leaves, each with its group's rho, adaptive and eta.

    One group (the usual case) is ``sam_ascent``; several are the same pieces,
    each rescale and radius ``masked`` to its groups' leaves; the norm stays
    global over all of them, as in the seed.
    """
    if len(set(options)) == 1:
        rho, adaptive, eta = options[0]
        return sam_ascent(rho, adaptive=adaptive, eta=eta)
    rescales = [
        masked(scale_by_param_abs(eta), [o == (rho, True, eta) for o in options])
        for rho, adaptive, eta in sorted(set(options))
        if adaptive
    ]
    radii = [
        masked(scale_by_radius(rho), [o[0] == rho for o in options])
        for rho in sorted({o[0] for o in options})
    ]
    return chain(*rescales, normalize(), *rescales, *radii)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim``
            optimizer. A group may set its own ``rho``, ``adaptive`` and ``eta``.
        base_optimizer: the optimizer class that makes the actual update,
            e.g. ``torch.optim.SGD``; built on the same ``param_groups``.
        rho: the neighbourhood radius (per group).
        adaptive: ASAM, with ``T = |w| + eta`` (per group); must be a bool.
        eta: ASAM's offset; the seed uses 0 (per group).
        method: a method such as ``samfunc.gsam(rho=0.05, alpha=0.4)``; then its
            ascent and combiner make the step (with its own ``rho``, so leave
            ``rho``, ``adaptive`` and ``eta`` here at their defaults), its state
            is part of ``state_dict``, and the leaves it sees are this
            optimizer's trainable parameters in order (a parameter without a
            gradient counts as a zero gradient). A mask in the method is
            resolved against that list: ``samfunc.normalization_mask(model)``
            works; a tree of bools keyed by name does not. ESAM's data selection
            needs per-sample losses, so only ``esam(gamma=1.0)`` works here.
        nonfinite: a gradient with a NaN or inf element, in either pass:
            ``"raise"`` (default) raises ``NonFiniteGradientError`` with the
            parameters back at ``w`` and the base optimizer not stepped;
            ``"skip"`` skips the step the same way and counts it in
            ``skipped_steps``; ``"propagate"`` does what the seed does. With a
            ``GradScaler`` (see ``first_step``) such steps are always skipped.
        **kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    Attributes:
        base_optimizer: the wrapped optimizer. It shares ``param_groups`` with
            this one, so ``torch.optim.lr_scheduler`` works on either.
        skipped_steps: how many steps were skipped for a non-finite gradient.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = model(torch.ones(4, 3)).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(3):
        ...     loss = opt.step(closure)  # the loss at w, before this step's update
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        method: Optional[Method] = None,
        nonfinite: NonFinitePolicy = "raise",
        **kwargs: Any,
    ) -> None:
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        check_bool("adaptive", adaptive)
        policy = check_policy("nonfinite", nonfinite, CLASS_POLICIES)
        self.method = _check_method(method, rho, adaptive, eta)
        if not callable(base_optimizer):
            raise TypeError(
                f"base_optimizer must be an optimizer class, got {type(base_optimizer).__name__}"
            )
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **kwargs)
        super().__init__(params, defaults)
        for index, group in enumerate(self.param_groups):
            _check_group(index, group)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.nonfinite: NonFinitePolicy = policy
        self._start_runtime()

    def _start_runtime(self) -> None:
        """What lives only in this process: w's backup storage, hooks, step flags."""
        # Storage for w, reused from step to step (as the seed's "old_p"), and
        # the parameters first_step moved in the current step.
        self._backup: dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed: list[torch.Tensor] = []
        self._skip_second = False
        self.skipped_steps = getattr(self, "skipped_steps", 0)
        self.method_state: Any = getattr(self, "method_state", None)
        self._method_leaves: list[int] = []  # ids of the params method_state belongs to
        self._pending_ascent: Any = None  # the ascent's new state, kept once the step is done
        self._first_grads: Optional[list[torch.Tensor]] = None
        self._in_policy_step = False
        self._watch = _BackwardWatch()
        self._hooks: dict[torch.Tensor, Any] = {}
        self._watch_params()

    def _watch_params(self) -> None:
        """Hooks every parameter that can get a gradient (again after an unfreeze)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in self._hooks:
                    self._hooks[p] = p.register_post_accumulate_grad_hook(self._watch)

    def _with_grads(self) -> Iterator[tuple[int, int, dict[str, Any], torch.Tensor]]:
        for group_index, group in enumerate(self.param_groups):
            for param_index, p in enumerate(group["params"]):
                if p.grad is not None:
                    yield group_index, param_index, group, p

    def _group_options(self, group_index: int, group: dict[str, Any]) -> tuple[float, bool, float]:
        """A group's rho, adaptive and eta (defaults for a group added to ``base_optimizer``)."""
        for key in SAM_OPTIONS:
            group.setdefault(key, self.defaults[key])
        _check_group(group_index, group)
        return float(group["rho"]), bool(group["adaptive"]), float(group["eta"])

    def _policy_grad(self) -> Optional[MethodGrad]:
        """The method's grad if it has a step policy (LookSAM, AE-SAM, ``with_policy``)."""
        grad = self.method.grad if self.method is not None else None
        return grad if isinstance(grad, MethodGrad) and grad.policy is not None else None

    def _refuse_policy(self, action: str) -> None:
        if self.method is not None and isinstance(self.method.grad, MomentumSamGrad):
            raise RuntimeError(
                f"momentum_sam takes one gradient per step, at w - rho v / ||v||, which {action} "
                "does not fit: use step(closure)"
            )
        grad = self._policy_grad()
        if grad is not None and not self._in_policy_step:
            raise RuntimeError(
                f"{grad.name} chooses each step's number of passes itself, which {action} cannot "
                "tell you: use step(closure), which runs the closure once or twice as it chooses"
            )

    def _wrapped(self) -> Optional[SAM]:
        """The SAM that Lightning's ``LightningOptimizer`` wraps, when ``self`` is that wrapper.

        It subclasses this class but keeps no state, so the two-step API runs on the SAM
        inside it (see ``_integrations``).
        """
        inner = _integrations.wrapped_optimizer(self)
        return inner if isinstance(inner, SAM) else None

    def _refuse_mid_step(self, action: str) -> None:
        if self._perturbed:
            raise RuntimeError(
                f"cannot {action} between first_step and second_step: the parameters are at "
                "w + e; call second_step() or restore() first"
            )

    def _gradient_tree(
        self, pairs: list[tuple[int, int, dict[str, Any], torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The gradients keyed by where their parameter sits, for error messages."""
        grads = {}
        for group_index, param_index, _, p in pairs:
            grad = p.grad
            assert grad is not None
            if grad.is_sparse:
                raise TypeError(
                    f"SAM needs dense gradients; param_groups[{group_index}]['params']"
                    f"[{param_index}] has a sparse one (e.g. nn.Embedding(sparse=True)): "
                    "use sparse=False"
                )
            grads[f"param_groups[{group_index}]['params'][{param_index}]"] = grad
        return grads

    def _finite_or_skip(self, grads: dict[str, torch.Tensor], where: str, scaled: bool) -> bool:
        """Applies the non-finite policy to one pass; returns whether to go on."""
        if self.nonfinite == "propagate" and not scaled:
            return True
        if not grads or _tree.norm_is_finite(grads):
            return True
        if self.nonfinite == "raise" and not scaled:
            raise_if_nonfinite(grads, where)
        self.skipped_steps += 1
        return False

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, *, scaler: Optional[torch.amp.GradScaler] = None
    ) -> None:
        """Moves every parameter with a gradient from ``w`` to ``w + e(w)``.

        Args:
            zero_grad: clear the gradients afterwards, ready for the second pass.
            scaler: a ``torch.amp.GradScaler`` whose scaled loss made these
                gradients. They are unscaled first (``scaler.unscale_(self)``),
                and if they hold an inf or NaN the step is skipped: ``w`` is not
                moved and ``second_step`` will not step the base optimizer.
                Call ``scaler.update()`` after ``second_step``.
        """
        inner = self._wrapped()
        if inner is not None:
            inner.first_step(zero_grad, scaler=scaler)
            return
        if self._perturbed or self._skip_second:
            raise RuntimeError("first_step called twice without second_step in between")
        self._refuse_policy("first_step")
        if scaler is not None and self.method is not None:
            grad = self.method.grad
            if isinstance(grad, MethodGrad) and grad.uses_first_gradient:
                raise ValueError(
                    f"{grad.name} mixes the gradients at w and at w + e, which a GradScaler "
                    "scales differently; for float16, use make_train_step(..., "
                    "loss_scale=samfunc.dynamic_loss_scale()), or bfloat16 autocast"
                )
        self._watch.seen = False
        if scaler is not None:
            scaler.unscale_(self)
        pairs = list(self._with_grads())
        grads = self._gradient_tree(pairs)
        if not self._finite_or_skip(grads, FIRST_PASS, scaled=scaler is not None):
            self._skip_second = True
        elif self.method is not None:
            self._perturb_by_method(self.method.grad)  # type: ignore[arg-type]
        elif pairs:
            self._perturb(pairs)
        if zero_grad:
            self.zero_grad()

    def _perturb(self, pairs: list[tuple[int, int, dict[str, Any], torch.Tensor]]) -> None:
        options = [self._group_options(gi, group) for gi, _, group, _ in pairs]
        params = [p for *_, p in pairs]
        grads = [p.grad for p in params]
        ascent = _groups_ascent(options)
        e, _ = ascent.update(grads, ascent.init(params), params)
        self._move(params, e)

    def _move(self, params: list[torch.Tensor], e: Sequence[torch.Tensor]) -> None:
        """``w <- w + e``, keeping ``w`` in the backup storage."""
        for p in params:
            if p not in self._backup:
                self._backup[p] = torch.empty_like(p)
        _tree.copy_into([self._backup[p] for p in params], params)
        self._perturbed = params
        torch._foreach_add_(params, list(e))

    def _method_params(self) -> list[torch.Tensor]:
        """The leaves a method sees: every trainable parameter, in group order."""
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        ids = [id(p) for p in params]
        if self.method_state is not None and self._method_leaves and ids != self._method_leaves:
            raise RuntimeError(
                "the trainable parameters changed since the method's state was built (a "
                "group added or a parameter frozen or unfrozen): build a new SAM optimizer"
            )
        self._method_leaves = ids
        return params

    def _perturb_by_method(self, grad: MethodGrad) -> None:
        params = self._method_params()
        if self.method_state is None:
            self.method_state = grad.init(params)
        grads = _grads_or_zeros(params)
        e, self._pending_ascent = grad.ascent.update(grads, self.method_state.ascent, params)
        if grad.uses_first_gradient:  # a later zero_grad or backward would change .grad
            self._first_grads = [g.clone() for g in grads]
        self._move(params, e)

    def _combine(self, grad: MethodGrad) -> None:
        """The method's gradient from ``g`` and ``g_s``, into ``.grad``; the state moves on."""
        assert self.method_state is not None
        params = self._method_params()
        perturbed = _grads_or_zeros(params)
        first = self._first_grads if self._first_grads is not None else perturbed
        out, combine_state = grad.combiner.update(
            first, perturbed, self.method_state.combine, params
        )
        _set_grads(params, out)
        self.method_state = self.method_state._replace(
            ascent=self._pending_ascent, combine=combine_state
        )
        self._first_grads = None

    @torch.no_grad()
    def restore(self) -> None:
        """Puts back ``w`` for every parameter ``first_step`` moved (a no-op otherwise)."""
        inner = self._wrapped()
        if inner is not None:
            inner.restore()
            return
        if self._perturbed:
            _tree.copy_into(self._perturbed, [self._backup[p] for p in self._perturbed])
        self._perturbed = []

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, *, scaler: Optional[torch.amp.GradScaler] = None
    ) -> None:
        """Returns to ``w`` and runs the base optimizer with the gradients at ``w + e``.

        If the first pass was skipped (non-finite), or the second pass's gradient
        is not finite, ``w`` is restored and the base optimizer does not step
        (or, with ``nonfinite="raise"`` and no scaler, an error is raised after
        restoring ``w``).

        Args:
            zero_grad: clear the gradients afterwards.
            scaler: the ``GradScaler`` of ``first_step``; the base optimizer
                steps through ``scaler.step``, which unscales the second pass's
                gradients (unless you called ``scaler.unscale_(opt.base_optimizer)``
                to clip them) and skips the step if they hold an inf or NaN.
        """
        inner = self._wrapped()
        if inner is not None:  # Lightning counts it as a step (global_step, max_steps)
            with _integrations.counted_as_step(self):
                inner.second_step(zero_grad, scaler=scaler)
            return
        self.restore()
        skipped = self._skip_second
        self._pending_ascent = None if skipped else self._pending_ascent
        self._skip_second = False
        self._watch.seen = False
        if not skipped:
            self._descend(scaler)
        # torch.optim.lr_scheduler wraps SAM.step to note that the optimizer
        # stepped; the two-step API goes around it, so note it here.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def _descend(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        """The base optimizer's step on the second pass's gradients, if they are usable."""
        grad = self.method.grad if self.method is not None else None
        if scaler is not None:
            before = self.method_state
            if isinstance(grad, MethodGrad):
                self._combine(grad)  # a plain combiner (checked): g_s as it is
            scaler.step(self.base_optimizer)
            grads = self._gradient_tree(list(self._with_grads()))
            if grads and not _tree.norm_is_finite(grads):
                self.skipped_steps += 1  # scaler.step skipped it
                self.method_state = before
            return
        grads = self._gradient_tree(list(self._with_grads()))
        if self._finite_or_skip(grads, SECOND_PASS, scaled=False):
            if isinstance(grad, MethodGrad):
                self._combine(grad)
            self.base_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients (as ``torch.optim.Optimizer.zero_grad``)."""
        super().zero_grad(set_to_none)
        if hasattr(self, "_watch"):
            self._watch.seen = False

    def _has_fresh_gradients(self) -> bool:
        """True if a backward pass since the last step left gradients to use."""
        return self._watch.seen and any(True for _ in self._with_grads())

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """A whole SAM step around ``closure``, which does a forward-backward pass.

        Both ways of calling it are right, step after step:

        * the PyTorch pattern: the closure does everything (``zero_grad``,
          forward, ``backward``) and ``step(closure)`` is called every step.
          ``step`` runs it at ``w``, then at ``w + e``. Gradients left from the
          previous step (or zeros from ``zero_grad(set_to_none=False)``) are
          never taken for this step's first pass;
        * the seed's pattern: ``loss.backward()`` at ``w`` first, then
          ``step(closure)``; the gradients of that backward pass are used as
          the first pass, and the closure runs once, at ``w + e``.

        Which one it is comes from whether a backward pass accumulated a
        gradient into the parameters since the last step (a hook on each
        parameter), not from whether ``.grad`` is set. If the closure raises,
        the parameters are put back to ``w`` before the error propagates, and
        the base optimizer does not step.

        Returns:
            The loss at ``w`` when ``step`` ran the first pass itself (the
            PyTorch pattern); in the seed's pattern, where the first pass was
            yours, the closure's loss at ``w + e``.
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that runs a forward-backward pass; "
                "or call first_step() and second_step() yourself"
            )
        self._watch_params()
        closure_with_grad = torch.enable_grad()(closure)
        if self.method is not None and isinstance(self.method.grad, MomentumSamGrad):
            return self._momentum_step(self.method.grad, closure_with_grad)
        grad = self._policy_grad()
        if grad is not None:
            return self._policy_step(grad, closure_with_grad)
        return self._sam_step(closure_with_grad)

    def _momentum_step(self, grad: MomentumSamGrad, closure_with_grad: Callable[[], Any]) -> Any:
        """Momentum-SAM: one pass, at ``w - rho v / ||v||``, then the base optimizer's step."""
        if self._has_fresh_gradients():
            raise RuntimeError(
                "momentum_sam takes its only gradient at w - rho v / ||v||, so the backward pass "
                "before step(closure) cannot be used: let the closure do the whole pass"
            )
        params = self._method_params()
        if self.method_state is None:
            self.method_state = grad.init(params)
        velocity = list(self.method_state.velocity)
        factor = -grad.rho / (_tree.global_norm(velocity) + grad.eps)
        super().zero_grad(set_to_none=True)
        self._move(params, _tree.scale(velocity, factor))
        try:
            loss = closure_with_grad()
            perturbed = [p.detach().clone() for p in params] if grad.weight_decay else []
        finally:
            self.restore()
        self._watch.seen = False
        grads = self._gradient_tree(list(self._with_grads()))
        if not self._finite_or_skip(grads, ONE_PASS, scaled=False):
            return loss
        g = _grads_or_zeros(params)
        if grad.weight_decay:
            g = _tree.add_scaled(g, perturbed, grad.weight_decay)
        new_velocity = _tree.add_scaled(g, velocity, grad.momentum)
        self.method_state = MomentumSamState(new_velocity)
        _set_grads(params, g)
        self.base_optimizer.step()
        self._opt_called = True
        return loss

    def _sam_step(self, closure_with_grad: Callable[[], Any]) -> Any:
        """``step``'s two passes (the first one skipped if the caller ran it)."""
        first_loss = None
        if not self._has_fresh_gradients():
            super().zero_grad(set_to_none=True)  # last step's gradients are not this step's
            first_loss = closure_with_grad()
        self.first_step(zero_grad=True)
        return self._second_of_step(closure_with_grad, first_loss)

    def _policy_step(self, grad: MethodGrad, closure_with_grad: Callable[[], Any]) -> Any:
        """A step of a method with a policy: the full SAM step, or one pass and ``reuse``."""
        params = self._method_params()
        if self.method_state is None:
            self.method_state = grad.init(params)
        full = None if grad.reads_gradient else grad.planned(self.method_state)
        self._in_policy_step = True
        try:
            if full:
                loss = self._sam_step(closure_with_grad)
            else:
                loss, full = self._one_pass_step(grad, closure_with_grad, params)
        finally:
            self._in_policy_step = False
        assert self.method_state is not None
        policy = counted(self.method_state.policy, bool(full))
        self.method_state = self.method_state._replace(policy=policy)
        return loss

    def _one_pass_step(
        self, grad: MethodGrad, closure_with_grad: Callable[[], Any], params: list[torch.Tensor]
    ) -> tuple[Any, bool]:
        """The first pass; AE-SAM's verdict on it; then the cheap step, or the full one's rest.

        Returns the loss and whether the step was full.
        """
        first_loss = None
        if not self._has_fresh_gradients():
            super().zero_grad(set_to_none=True)
            first_loss = closure_with_grad()
        self._watch.seen = False
        grads = self._gradient_tree(list(self._with_grads()))
        where = FIRST_PASS if grad.reads_gradient else ONE_PASS
        if not self._finite_or_skip(grads, where, scaled=False):
            return first_loss, False
        state = self.method_state
        assert state is not None
        g = _grads_or_zeros(params)
        if grad.reads_gradient:
            assert grad.policy is not None and grad.policy.decide is not None
            verdict, policy = grad.policy.decide(_tree.vdot(g, g), state.policy)
            self.method_state = state._replace(policy=policy)
            if bool(verdict):
                self.first_step(zero_grad=True)
                return self._second_of_step(closure_with_grad, first_loss), True
        out, new_state = grad.reuse(g, self.method_state or state, params)
        self.method_state = new_state
        _set_grads(params, out)
        self.base_optimizer.step()
        self._opt_called = True
        return first_loss, False

    def _second_of_step(self, closure_with_grad: Callable[[], Any], first_loss: Any) -> Any:
        """The pass at ``w + e`` and the descent, after ``first_step``."""
        if self._skip_second:
            self.second_step()
            return first_loss
        try:
            perturbed_loss = closure_with_grad()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return perturbed_loss if first_loss is None else first_loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to both optimizers; it may set its own ``rho``, ``adaptive``, ``eta``."""
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        for key in SAM_OPTIONS:
            group.setdefault(key, self.defaults[key])
        _check_group(len(self.param_groups), group)
        self.base_optimizer.add_param_group(group)
        self.param_groups = self.base_optimizer.param_groups
        self._watch_params()

    def state_dict(self) -> dict[str, Any]:
        """This optimizer's groups plus the base optimizer's whole state."""
        self._refuse_mid_step("save a state_dict")
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        if self.method is not None:
            state["method_state"] = self.method_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a checkpoint of this class, of the seed's SAM, or of the base optimizer.

        * this class's ``state_dict``: groups and the base optimizer's state;
        * the seed's SAM (no ``eta``, per-parameter ``old_p`` copies, no base
          state): its groups load, ``eta`` takes this optimizer's default, and
          the base optimizer starts fresh (a warning says so: the seed never
          saved its momentum);
        * a plain base-optimizer ``state_dict`` (e.g. ``torch.optim.SGD``'s,
          to go on from SGD with SAM): it is loaded into ``base_optimizer``,
          and each group keeps its current ``rho``, ``adaptive`` and ``eta``.
        """
        self._refuse_mid_step("load a state_dict")
        state_dict = dict(state_dict)
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or "state" not in state_dict:
            raise ValueError(
                "state_dict must be an optimizer state_dict with 'state' and 'param_groups', "
                f"got keys {sorted(state_dict)}"
            )
        base_state = state_dict.pop("base_optimizer", None)
        self._load_method_state(state_dict.pop("method_state", None))
        if base_state is None and not all(SAM_OPTIONS[0] in group for group in groups):
            self._load_base_state(state_dict)
            return
        current = [{key: group[key] for key in SAM_OPTIONS} for group in self.param_groups]
        state_dict["state"] = {}  # SAM keeps nothing per parameter (the seed's old_p is w)
        super().load_state_dict(state_dict)
        self._fill_options(current)
        if base_state is None:
            warnings.warn(
                "the state_dict has no base optimizer state (a checkpoint of the seed's SAM, "
                "which does not save it): the base optimizer's state, such as momentum, "
                "starts fresh",
                UserWarning,
                stacklevel=2,
            )
            self.base_optimizer.state.clear()
        else:
            self.base_optimizer.load_state_dict(base_state)
        self.base_optimizer.param_groups = self.param_groups

    def _load_method_state(self, method_state: Any) -> None:
        if self.method is None:
            if method_state is not None:
                raise ValueError(
                    "the state_dict holds a method's state, but this SAM has no method: "
                    "build it with the same method=..."
                )
            return
        expected = (
            MomentumSamState if isinstance(self.method.grad, MomentumSamGrad) else MethodState
        )
        if method_state is not None and not isinstance(method_state, expected):
            raise TypeError(
                f"method_state must be a {expected.__name__}, got {type(method_state).__name__}"
            )
        self.method_state = method_state
        self._method_leaves = []

    def _load_base_state(self, state_dict: dict[str, Any]) -> None:
        current = [{key: group[key] for key in SAM_OPTIONS} for group in self.param_groups]
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self._fill_options(current)

    def _fill_options(self, current: list[dict[str, Any]]) -> None:
        """Groups loaded without SAM's options take the ones they had before."""
        for index, (group, before) in enumerate(zip(self.param_groups, current)):
            for key, value in before.items():
                group.setdefault(key, value)
            _check_group(index, group)

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``torch.save(opt)``, ``copy.deepcopy``) keeps the base optimizer."""
        self._refuse_mid_step("pickle or copy the optimizer")
        state: dict[str, Any] = super().__getstate__()
        state["base_optimizer"] = self.base_optimizer
        state["nonfinite"] = self.nonfinite
        state["skipped_steps"] = self.skipped_steps
        state["method"] = self.method
        state["method_state"] = self.method_state
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        base = state.pop("base_optimizer", None)
        self.nonfinite = state.pop("nonfinite", getattr(self, "nonfinite", "raise"))
        self.skipped_steps = state.pop("skipped_steps", getattr(self, "skipped_steps", 0))
        # Optimizer.load_state_dict calls this with the groups only: keep what is here.
        self.method = state.pop("method", getattr(self, "method", None))
        self.method_state = state.pop("method_state", getattr(self, "method_state", None))
        super().__setstate__(state)
        if base is not None:
            self.base_optimizer = base
            # One pickle shares one list object, so these are the same groups again.
            self.param_groups = base.param_groups
        self._start_runtime()
