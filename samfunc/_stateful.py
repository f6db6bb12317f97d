"""``samfunc.SAM``: the seed's stateful optimizer API, on samfunc's interpreter.

A drop-in replacement for ``from sam import SAM``::

    optimizer = samfunc.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    loss_fn(model(x), y).backward()        # first pass, at w
    optimizer.first_step(zero_grad=True)   # climb to w + e(w)
    loss_fn(model(x), y).backward()        # second pass, at w + e
    optimizer.second_step(zero_grad=True)  # back to w, then the base optimizer's step

The class turns ``param_groups`` into a tree of the trainable parameters
(keyed by their names when given ``model.named_parameters()``) and runs the
method through the interpreter's phases (``samfunc._engine``): ``step(closure)``
with ``ClosurePasses``, which evaluate the closure at a point; ``first_step``
and ``second_step`` with the ascent and combine phases. So
``SAM(..., method=samfunc.gsam(...))`` runs any method, a bare
``Method(init, grad)`` included, with the numbers of its functional ``grad``.
Slips of the seed's that are fixed here: every parameter perturbed in
``first_step`` is restored in ``second_step``; the base optimizer's state is
part of ``state_dict``, pickling and ``copy.deepcopy``, so a resumed run is
bitwise identical to an uninterrupted one; ``step(closure)`` is right when
called every step in a loop; BatchNorm's running statistics come from the
first pass only; a NaN or inf gradient raises (or skips the step) instead of
turning every parameter into NaN; the seed's checkpoints load as they are.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

from . import _class_checkpoint, _two_step
from ._base import Method, Pieces
from ._closure import BackwardWatch, Moved, clear_grads, closure_step
from ._finite import NonFinitePolicy, check_policy
from ._groups import (
    SAM_DEFAULTS,
    SAM_OPTIONS,
    Leaves,
    check_group,
    check_method,
    groups_ascent,
    leaves_of,
)
from ._module import RunningStatsGuard
from ._options import RunOptions
from ._phases import ascent_pieces, init_state
from ._validate import check_bool, check_nonnegative
from .integrations import lightning

__all__ = ["SAM"]

CLASS_POLICIES = ("raise", "skip", "propagate")


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

    Args:
        params: parameters, ``model.named_parameters()`` (then a mask
            predicate sees the parameters' names) or parameter groups, as for
            any ``torch.optim`` optimizer. A group may set its own ``rho``,
            ``adaptive`` and ``eta`` (not with ``method``).
        base_optimizer: the optimizer class that makes the actual update,
            e.g. ``torch.optim.SGD``; built on the same ``param_groups``.
        rho: the neighbourhood radius (per group).
        adaptive: ASAM, with ``T = |w| + eta`` (per group): ``True`` or ``False``.
        eta: ASAM's offset; the seed uses 0 (per group).
        method: any method, ``samfunc.gsam(rho=0.05, alpha=0.4)`` or a bare
            ``samfunc.Method(init, grad)``: it makes the step (with its own
            ``rho``, so leave ``rho``, ``adaptive`` and ``eta`` here at their
            defaults), its state is part of ``state_dict``, and the tree it
            sees holds this optimizer's trainable parameters in group order,
            keyed by name (given ``named_parameters()``) or by position
            (``"param_groups[0]['params'][3]"``); a parameter without a
            gradient counts as a zero gradient and keeps ``.grad = None``.
            Methods with a step policy or one pass per step (LookSAM, AE-SAM,
            Momentum-SAM) and bare methods run with ``step(closure)`` only.
            ESAM's data selection needs per-sample losses, so only
            ``esam(gamma=1.0)`` works here; MESA changes the loss and does not.
        nonfinite: a gradient with a NaN or inf element, in either pass:
            ``"raise"`` (default) raises ``NonFiniteGradientError`` with the
            parameters back at ``w`` and the base optimizer not stepped;
            ``"skip"`` skips the step the same way and counts it in
            ``skipped_steps``; ``"propagate"`` does what the seed does. With a
            ``GradScaler`` (see ``first_step``) such steps are always skipped.
        reuse_rng: ``step(closure)`` replays the first pass's random draws
            (dropout masks) in the second pass.
        **kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    Attributes:
        base_optimizer: the wrapped optimizer. It shares ``param_groups`` with
            this one, so ``torch.optim.lr_scheduler`` works on either.
        method_state: the method's state (None before the first step, and
            without ``method``). Its ``count`` is the clock of the method's
            schedules: the updates applied (a skipped step is not one).
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

    _opt_called: bool  # set on each step, as torch.optim.lr_scheduler expects

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        method: Optional[Method] = None,
        nonfinite: NonFinitePolicy = "raise",
        reuse_rng: bool = False,
        **kwargs: Any,
    ) -> None:
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        check_bool("adaptive", adaptive)
        policy = check_policy("nonfinite", nonfinite, CLASS_POLICIES)
        self.reuse_rng = check_bool("reuse_rng", reuse_rng)
        self.method = method
        self._method_pieces = check_method(method, rho, adaptive, eta)
        if not callable(base_optimizer):
            raise TypeError(
                f"base_optimizer must be an optimizer class, got {type(base_optimizer).__name__}"
            )
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **kwargs)
        super().__init__(params, defaults)
        for index, group in enumerate(self.param_groups):
            self._check_group_options(index, group)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.nonfinite: NonFinitePolicy = policy
        self._start_runtime()

    def _check_group_options(self, index: int, group: dict[str, Any]) -> None:
        for key in SAM_OPTIONS:
            group.setdefault(key, self.defaults[key])
        check_group(index, group)
        if self._method_pieces is not None:
            changed = [k for k in SAM_OPTIONS if group[k] != SAM_DEFAULTS[k]]
            if changed:
                raise ValueError(
                    f"param_groups[{index}] sets {changed[0]}={group[changed[0]]!r}, which "
                    f"{self._method_pieces.name} (method=...) would ignore: a method has one "
                    "radius for all parameters; give it a mask, or drop method="
                )

    def _start_runtime(self) -> None:
        """What lives only in this process: the step in progress, hooks."""
        self._perturbed: Optional[_two_step.Perturbed] = None
        self._moved: Optional[Moved] = None
        self._skip_second = False
        self._guard = RunningStatsGuard()
        self.skipped_steps = getattr(self, "skipped_steps", 0)
        self.method_state: Any = getattr(self, "method_state", None)
        self._groups_pieces: dict[tuple[Any, ...], Pieces] = {}
        self._groups_state: Optional[tuple[tuple[Any, ...], Any]] = None
        # w's storage while the parameters are at another point, reused from step to step.
        self._storage: dict[torch.Tensor, torch.Tensor] = {}
        self._watch = BackwardWatch()  # its hooks go when it does, with this optimizer
        # The guard's global hook too, if this is dropped between first_step and second_step.
        weakref.finalize(self, self._guard.release)
        self._watch.watch(self.param_groups)

    def _wrapped(self) -> Optional[SAM]:
        """The SAM that Lightning's ``LightningOptimizer`` wraps, when ``self`` is that wrapper."""
        inner = lightning.wrapped_optimizer(self)
        return inner if isinstance(inner, SAM) else None

    def _leaves(self) -> Leaves:
        """The trainable parameters in group order, with their names and groups' options."""
        for index, group in enumerate(self.param_groups):
            self._check_group_options(index, group)
        return leaves_of(self.param_groups)

    def _pieces(self, leaves: Leaves) -> Pieces:
        """The method's pieces, or SAM's ascent from the groups' options (built once per set)."""
        if self._method_pieces is not None:
            return self._method_pieces
        key = tuple(leaves.options)
        if key not in self._groups_pieces:
            ascent = groups_ascent(leaves.keys, leaves.options)
            self._groups_pieces = {key: ascent_pieces("sam", ascent)}
        return self._groups_pieces[key]

    def _state(self, pieces: Pieces, leaves: Leaves) -> Any:
        """The method's state (built at the first step); a fresh one for the groups' SAM."""
        tree = leaves.tree(leaves.params)
        if self._method_pieces is None:
            # SAM's state holds nothing that lasts a step: one fresh state serves every step.
            key = tuple(leaves.options)
            if self._groups_state is None or self._groups_state[0] != key:
                detached = {k: p.detach() for k, p in tree.items()}
                self._groups_state = (key, init_state(pieces, detached))
            return self._groups_state[1]
        if self.method_state is None:
            self.method_state = init_state(pieces, {k: p.detach() for k, p in tree.items()})
        return self.method_state

    def _commit(self, state: Any) -> None:
        if self._method_pieces is not None:
            self.method_state = state

    def _run(self) -> RunOptions:
        engine = "raise" if self.nonfinite == "raise" else "propagate"
        return RunOptions(reuse_rng=self.reuse_rng, nonfinite=engine)  # type: ignore[arg-type]

    def _refuse_mid_step(self, action: str) -> None:
        if self._moved is not None:
            raise RuntimeError(
                f"cannot {action} between first_step and second_step: the parameters are at "
                "w + e; call second_step() or restore() first"
            )

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, *, scaler: Optional[torch.amp.GradScaler] = None
    ) -> None:
        """Moves every trainable parameter from ``w`` to ``w + e(w)``.

        From here to ``second_step`` BatchNorm's running statistics are kept as
        they were (the first pass's), whatever the second pass runs.

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
        _two_step.first_step(self, zero_grad, scaler)

    @torch.no_grad()
    def restore(self) -> None:
        """Puts back ``w`` for every parameter ``first_step`` moved (a no-op otherwise)."""
        inner = self._wrapped()
        if inner is not None:
            inner.restore()
            return
        if self._moved is not None:
            self._moved.restore()
            self._moved = None
        self._guard.stop()

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, *, scaler: Optional[torch.amp.GradScaler] = None
    ) -> None:
        """Returns to ``w`` and runs the base optimizer with the method's gradient.

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
            with lightning.counted_as_step(self):
                inner.second_step(zero_grad, scaler=scaler)
            return
        _two_step.second_step(self, zero_grad, scaler)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients (as ``torch.optim.Optimizer.zero_grad``)."""
        if set_to_none:  # torch's own walks the same params, inside a profiler record
            clear_grads(self.param_groups)
        else:
            super().zero_grad(set_to_none)
        if hasattr(self, "_watch"):
            self._watch.reset()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """A whole step of the method around ``closure``, which does a forward-backward pass.

        Both ways of calling it are right, step after step:

        * the PyTorch pattern: the closure does everything (``zero_grad``,
          forward, ``backward``) and ``step(closure)`` is called every step.
          ``step`` runs it at ``w``, then at ``w + e`` (once, for a cheap step).
          Gradients left from the previous step are never taken for this
          step's first pass;
        * the seed's pattern: ``loss.backward()`` at ``w`` first, then
          ``step(closure)``; the gradients of that backward pass are used as
          the first pass, and the closure runs once, at ``w + e``.

        Which one it is comes from whether a backward pass accumulated a
        gradient into the parameters since the last step (a hook on each
        parameter), not from whether ``.grad`` is set. If the closure raises,
        the parameters are put back to ``w`` before the error propagates, and
        the base optimizer does not step. BatchNorm's running statistics are
        the first pass's; with ``reuse_rng`` the second pass draws the same
        dropout masks as the first.

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
        return closure_step(self, closure)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to both optimizers; it may set its own ``rho``, ``adaptive``, ``eta``."""
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        self._check_group_options(len(self.param_groups), group)
        self.base_optimizer.add_param_group(group)
        self.param_groups = self.base_optimizer.param_groups
        self._watch.watch(self.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """This optimizer's groups plus the base optimizer's whole state (and the method's)."""
        self._refuse_mid_step("save a state_dict")
        return _class_checkpoint.state_dict_of(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a checkpoint of this class, of the seed's SAM, or of the base optimizer.

        See ``samfunc._class_checkpoint``: the seed's (its base optimizer
        starts fresh, with a warning) and a plain base optimizer's (each group
        keeps its ``rho``, ``adaptive`` and ``eta``) load too.
        """
        self._refuse_mid_step("load a state_dict")
        _class_checkpoint.load_state_dict_into(self, state_dict)

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``torch.save(opt)``, ``copy.deepcopy``) keeps the base optimizer."""
        self._refuse_mid_step("pickle or copy the optimizer")
        return _class_checkpoint.pickled_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _class_checkpoint.unpickle_into(self, state)
        self._start_runtime()
