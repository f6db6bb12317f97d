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

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Optional

import torch

from . import _rng, _tree
from ._ascent import normalize, sam_ascent, scale_by_param_abs, scale_by_radius
from ._base import GradientTransformation, Method, Pieces
from ._closure import ClosurePasses, grads_of, write_grads
from ._combine import chain, masked
from ._engine import run_step
from ._finite import NonFinitePolicy, check_policy, raise_if_nonfinite
from ._module import RunningStatsGuard
from ._options import FIRST_PASS, SECOND_PASS, RunOptions
from ._phases import (
    advance,
    ascend,
    ascent_pieces,
    call_whole,
    combine,
    init_state,
    is_whole,
    pieces_of,
)
from ._validate import check_bool, check_nonnegative
from .integrations import lightning

__all__ = ["SAM"]

#: The per-group options SAM adds to the base optimizer's.
SAM_OPTIONS = ("rho", "adaptive", "eta")
SAM_DEFAULTS = {"rho": 0.05, "adaptive": False, "eta": 0.0}
CLASS_POLICIES = ("raise", "skip", "propagate")


class _BackwardWatch:
    """Notes that a backward pass accumulated a gradient into a watched parameter.

    ``step(closure)`` asks it whether the gradients in ``.grad`` are a fresh
    first pass (the seed's pattern: ``loss.backward()`` then ``step(closure)``)
    or what the previous step left behind (the PyTorch pattern).
    """

    __slots__ = ("__weakref__", "seen")

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, param: torch.Tensor) -> None:
        del param
        self.seen = True


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _check_group(index: int, group: dict[str, Any]) -> None:
    where = f"param_groups[{index}]"
    check_nonnegative(f"{where}['rho']", group["rho"])
    check_nonnegative(f"{where}['eta']", group["eta"])
    check_bool(f"{where}['adaptive']", group["adaptive"])


def _check_method(method: Any, rho: float, adaptive: bool, eta: float) -> Optional[Pieces]:
    """The pieces of ``method`` if the class can run it, SAM's own options at their defaults."""
    if method is None:
        return None
    pieces = pieces_of(method)
    if pieces.objective is not None:
        raise TypeError(
            f"{pieces.name} changes the loss (a KL term to the teacher's outputs), which "
            "SAM.step never sees: use make_module_train_step(..., method=samfunc.mesa(...)), "
            "or add samfunc.distillation_kl to your own loss"
        )
    if rho != 0.05 or adaptive or eta != 0.0:
        raise ValueError(
            "with method=..., set rho (and adaptive, eta) in the method, e.g. "
            f"samfunc.gsam(rho={rho}); got rho={rho}, adaptive={adaptive}, eta={eta} here"
        )
    fraction = pieces.select_fraction
    if fraction is not None and fraction < 1.0:
        raise ValueError(
            f"{pieces.name}'s data selection ranks per-sample losses, which SAM.step never "
            f"sees: use the functional method.grad or a train step, or gamma=1.0 (got {fraction})"
        )
    return pieces


def _groups_ascent(
    keys: list[str], options: list[tuple[float, bool, float]]
) -> GradientTransformation:
    """SAM's ascent over a flat list of leaves, each with its group's rho, adaptive and eta.

    One group (the usual case) is ``sam_ascent``; several are the same pieces,
    each rescale and radius ``masked`` to its groups' leaves; the norm stays
    global over all of them, as in the seed.
    """
    if len(set(options)) == 1:
        rho, adaptive, eta = options[0]
        return sam_ascent(rho, adaptive=adaptive, eta=eta)

    rescales = [
        masked(scale_by_param_abs(eta), dict(zip(keys, [o == (rho, True, eta) for o in options])))
        for rho, adaptive, eta in sorted(set(options))
        if adaptive
    ]
    radii = [
        masked(scale_by_radius(rho), dict(zip(keys, [o[0] == rho for o in options])))
        for rho in sorted({o[0] for o in options})
    ]
    return chain(*rescales, normalize(), *rescales, *radii)


class _Leaves(NamedTuple):
    """What the method sees: the trainable parameters, their names and their groups' options."""

    keys: list[str]
    params: list[torch.Tensor]
    options: list[tuple[float, bool, float]]

    def tree(self, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, values))


class _Perturbed(NamedTuple):
    """What ``first_step`` leaves for ``second_step``."""

    pieces: Pieces
    state: Any
    first_grads: Optional[list[torch.Tensor]]
    ascent_state: Any
    leaves: _Leaves


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
        self._method_pieces = _check_method(method, rho, adaptive, eta)
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
        _check_group(index, group)
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
        self._perturbed: Optional[_Perturbed] = None
        self._moved: Optional[ClosurePasses] = None
        self._skip_second = False
        self._guard = RunningStatsGuard()
        self.skipped_steps = getattr(self, "skipped_steps", 0)
        self.method_state: Any = getattr(self, "method_state", None)
        self._groups_pieces: dict[tuple[Any, ...], Pieces] = {}
        self._groups_state: Optional[tuple[tuple[Any, ...], Any]] = None
        # w's storage while the parameters are at another point, reused from step to step.
        self._storage: dict[torch.Tensor, torch.Tensor] = {}
        self._watch = _BackwardWatch()
        self._hooked: set[int] = set()
        self._handles: list[Any] = []
        # The hooks hold the watch, not this optimizer; they go when it does.
        weakref.finalize(self, _remove_hooks, self._handles)
        self._watch_params()

    def _watch_params(self) -> None:
        """Hooks every parameter that can get a gradient (again after an unfreeze)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in self._hooked:
                    self._hooked.add(id(p))
                    self._handles.append(p.register_post_accumulate_grad_hook(self._watch))

    def _wrapped(self) -> Optional[SAM]:
        """The SAM that Lightning's ``LightningOptimizer`` wraps, when ``self`` is that wrapper."""
        inner = lightning.wrapped_optimizer(self)
        return inner if isinstance(inner, SAM) else None

    def _leaves(self) -> _Leaves:
        """The trainable parameters in group order, with their names and groups' options."""
        keys, params, options = [], [], []
        for g, group in enumerate(self.param_groups):
            self._check_group_options(g, group)
            names = group.get("param_names")
            option = (float(group["rho"]), bool(group["adaptive"]), float(group["eta"]))
            for i, p in enumerate(group["params"]):
                if p.requires_grad:
                    position = _tree.Position(f"param_groups[{g}]['params'][{i}]")
                    keys.append(names[i] if names else position)
                    params.append(p)
                    options.append(option)
        return _Leaves(keys, params, options)

    def _pieces(self, leaves: _Leaves) -> Pieces:
        """The method's pieces, or SAM's ascent from the groups' options (built once per set)."""
        if self._method_pieces is not None:
            return self._method_pieces
        key = tuple(leaves.options)
        if key not in self._groups_pieces:
            ascent = _groups_ascent(leaves.keys, leaves.options)
            self._groups_pieces = {key: ascent_pieces("sam", ascent)}
        return self._groups_pieces[key]

    def _state(self, pieces: Pieces, leaves: _Leaves) -> Any:
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

    def _finite_or_skip(self, grads: dict[str, torch.Tensor], where: str, scaled: bool) -> bool:
        """Applies the non-finite policy to one gradient; returns whether to go on."""
        if self.nonfinite == "propagate" and not scaled:
            return True
        if not grads or _tree.norm_is_finite(grads):
            return True
        if self.nonfinite == "raise" and not scaled:
            raise_if_nonfinite(grads, where)
        self.skipped_steps += 1
        return False

    def _two_step_pieces(self, leaves: _Leaves, action: str) -> Pieces:
        pieces = self._pieces(leaves)
        if pieces.policy is not None or pieces.ascent is None or is_whole(pieces):
            raise RuntimeError(
                f"{pieces.name} chooses its passes itself (a step policy, one pass per step, or "
                f"its own grad), which {action} cannot tell you: use step(closure), which runs "
                "the closure once or twice as it chooses"
            )
        return pieces

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
        if self._perturbed is not None or self._skip_second:
            raise RuntimeError("first_step called twice without second_step in between")
        leaves = self._leaves()
        pieces = self._two_step_pieces(leaves, "first_step")
        if scaler is not None and pieces.combiner.reads_first_gradient:
            raise ValueError(
                f"{pieces.name} mixes the gradients at w and at w + e, which a GradScaler "
                "scales differently; for float16, use make_train_step(..., "
                "loss_scale=samfunc.dynamic_loss_scale()), or bfloat16 autocast"
            )
        self._watch.seen = False
        if scaler is not None:
            scaler.unscale_(self)
        grads = grads_of(leaves.params)
        if not self._finite_or_skip(leaves.tree(grads), FIRST_PASS, scaled=scaler is not None):
            self._skip_second = True
        else:
            self._perturb(pieces, leaves, grads)
        if zero_grad:
            self.zero_grad()

    def _perturb(self, pieces: Pieces, leaves: _Leaves, grads: list[torch.Tensor]) -> None:
        state = self._state(pieces, leaves)
        tree = leaves.tree(leaves.params)
        e, ascent_state = ascend(pieces, leaves.tree(grads), state, tree)
        first = [g.clone() for g in grads] if pieces.combiner.reads_first_gradient else None
        moved = ClosurePasses(
            _no_closure, leaves.keys, leaves.params, False, self._run(), _none, self._storage
        )
        moved._move_to(_tree.add_leaves(leaves.params, _tree.leaves(e)))
        self._moved = moved
        self._perturbed = _Perturbed(pieces, state, first, ascent_state, leaves)
        self._guard.start()

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
        if self._perturbed is None and not self._skip_second:
            raise RuntimeError(
                "second_step called without first_step: call first_step() after the first "
                "backward pass (or use step(closure), which runs both)"
            )
        self.restore()
        perturbed, self._perturbed = self._perturbed, None
        skipped, self._skip_second = self._skip_second, False
        self._watch.seen = False
        if not skipped and perturbed is not None:
            self._descend(perturbed, scaler)
        # torch.optim.lr_scheduler wraps SAM.step to note that the optimizer
        # stepped; the two-step API goes around it, so note it here.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def _descend(self, perturbed: _Perturbed, scaler: Optional[torch.amp.GradScaler]) -> None:
        """The combine phase and the base optimizer's step, if the gradients are usable."""
        leaves = perturbed.leaves
        had = [p.grad is not None for p in leaves.params]
        second = grads_of(leaves.params)
        if scaler is None and not self._finite_or_skip(
            leaves.tree(second), SECOND_PASS, scaled=False
        ):
            return
        first = perturbed.first_grads if perturbed.first_grads is not None else second
        state = perturbed.state
        out, combine_state = combine(
            perturbed.pieces,
            leaves.tree(first),
            leaves.tree(second),
            state,
            leaves.tree(leaves.params),
        )
        write_grads(leaves.params, _tree.leaves(out), had)
        new_state = advance(
            state._replace(ascent=perturbed.ascent_state, combine=combine_state), True
        )
        if scaler is not None:
            scaler.step(self.base_optimizer)
            if _tree.norm_is_finite(leaves.tree(second)):
                self._commit(new_state)
            else:
                self.skipped_steps += 1  # scaler.step skipped it
            return
        self.base_optimizer.step()
        self._commit(new_state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients (as ``torch.optim.Optimizer.zero_grad``)."""
        super().zero_grad(set_to_none)
        if hasattr(self, "_watch"):
            self._watch.seen = False

    def _has_fresh_gradients(self) -> bool:
        """True if a backward pass since the last step left gradients to use."""
        return self._watch.seen and any(
            p.grad is not None for group in self.param_groups for p in group["params"]
        )

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
        self._refuse_mid_step("call step")
        self._watch_params()
        leaves = self._leaves()
        pieces = self._pieces(leaves)
        fresh = self._has_fresh_gradients()
        if fresh and ((pieces.ascent is None and pieces.whole is None) or is_whole(pieces)):
            raise RuntimeError(
                f"{pieces.name} takes its own passes, so the backward pass before step(closure) "
                "cannot be used: let the closure do the whole pass"
            )
        state = self._state(pieces, leaves)
        passes = ClosurePasses(
            torch.enable_grad()(closure),
            leaves.keys,
            leaves.params,
            fresh,
            self._run(),
            lambda: super(SAM, self).zero_grad(set_to_none=True),
            self._storage,
        )
        tree = leaves.tree(leaves.params)
        locked = _rng.RNG_LOCK if self.reuse_rng else contextlib.nullcontext()
        with locked:
            try:
                if is_whole(pieces):
                    assert pieces.whole is not None
                    grads, loss, new_state = call_whole(
                        pieces.whole, passes.loss_fn, tree, None, state, passes.run
                    )
                else:
                    grads, loss, new_state = run_step(pieces, passes, tree, None, state)
            finally:
                passes.restore()
                self._watch.seen = False
        self._opt_called = True
        if loss is None:  # the seed's pattern: the closure's loss, at w + e
            loss = passes.loss
        if self.nonfinite == "skip" and not _tree.norm_is_finite(grads):
            self.skipped_steps += 1
            return loss
        write_grads(leaves.params, _tree.leaves(grads), passes.had)
        self.base_optimizer.step()
        self._commit(new_state)
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to both optimizers; it may set its own ``rho``, ``adaptive``, ``eta``."""
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        self._check_group_options(len(self.param_groups), group)
        self.base_optimizer.add_param_group(group)
        self.param_groups = self.base_optimizer.param_groups
        self._watch_params()

    def state_dict(self) -> dict[str, Any]:
        """This optimizer's groups plus the base optimizer's whole state."""
        self._refuse_mid_step("save a state_dict")
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        if self._method_pieces is not None:
            state["method_state"] = self.method_state
            state["method"] = self._method_pieces.name
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
        saved_method = state_dict.pop("method", None)
        self._load_method_state(state_dict.pop("method_state", None), saved_method)
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

    def _load_method_state(self, method_state: Any, saved_method: Any) -> None:
        pieces = self._method_pieces
        if pieces is None:
            if method_state is not None:
                raise ValueError(
                    f"the state_dict holds the state of a method ({saved_method}), but this SAM "
                    "has no method: build it with the same method=..."
                )
            return
        if method_state is not None:
            leaves = self._leaves()
            tree = {k: p.detach() for k, p in leaves.tree(leaves.params).items()}
            expected = init_state(pieces, tree)
            problem = _tree.first_difference(expected, method_state, ("expected", "saved"))
            if saved_method is not None and saved_method != pieces.name:
                problem = problem or "another method"
            if problem is not None:
                raise ValueError(
                    f"the state_dict holds a state of {saved_method or 'another method'}, which "
                    f"does not fit this SAM's method {pieces.name} ({problem}): load it into a "
                    "SAM built with the same method and parameters"
                )
        self.method_state = method_state

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
        state["reuse_rng"] = self.reuse_rng
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        base = state.pop("base_optimizer", None)
        self.nonfinite = state.pop("nonfinite", getattr(self, "nonfinite", "raise"))
        self.skipped_steps = state.pop("skipped_steps", getattr(self, "skipped_steps", 0))
        # Optimizer.load_state_dict calls this with the groups only: keep what is here.
        self.method = state.pop("method", getattr(self, "method", None))
        self._method_pieces = None if self.method is None else pieces_of(self.method)
        self.method_state = state.pop("method_state", getattr(self, "method_state", None))
        self.reuse_rng = state.pop("reuse_rng", getattr(self, "reuse_rng", False))
        super().__setstate__(state)
        if base is not None:
            self.base_optimizer = base
            # One pickle shares one list object, so these are the same groups again.
            self.param_groups = base.param_groups
        self._start_runtime()


def _no_closure() -> Any:
    raise AssertionError("first_step moves the parameters without a closure")  # pragma: no cover


def _none() -> None:
    return None
