"""SAM at (nearly) the cost of SGD: LookSAM, AE-SAM, Momentum-SAM and MESA.

* ``looksam``: a full SAM step every ``k`` steps stores the part of ``g_s``
  orthogonal to ``g``; the steps between take one pass and add it back.
* ``ae_sam``: a full SAM step only when ``||g||^2`` is unusually large.
* ``momentum_sam``: one pass per step, at ``w - rho v / ||v||`` with ``v`` the
  momentum of the gradients.
* ``mesa``: no second pass at all: a KL term to the outputs of an exponential
  moving average of the weights, at one extra forward pass.

The first two are two-pass methods with a step policy (``samfunc.StepPolicy``),
so their step kinds are chosen in Python; ``samfunc.with_policy`` gives any
two-pass method such a schedule (SAM every n steps, late-phase SAM).

Examples:
    >>> import torch
    >>> import samfunc
    >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
    >>> params, opt = {"w": torch.ones(3)}, samfunc.sgd(0.1, momentum=0.9)
    >>> method = samfunc.looksam(rho=0.1, k=5)
    >>> opt_state, state = opt.init(params), method.init(params)
    >>> for _ in range(10):
    ...     grads, loss, state = method.grad(loss_fn, params, torch.randn(8, 3), state)
    ...     updates, opt_state = opt.update(grads, opt_state, params)
    ...     params = samfunc.apply_updates(params, updates)
    >>> samfunc.full_step_fraction(state)
    0.2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import torch
from typing_extensions import Unpack

from .. import _tree
from .._ascent import NORM_EPS, sam_ascent
from .._base import (
    Combiner,
    LossFn,
    Method,
    MethodState,
    OptState,
    Params,
    PerturbationOptions,
    Pieces,
    Rho,
    Schedule,
    Updates,
)
from .._policy import every_n_steps, sharp_steps
from .._validate import check_in_interval, check_nonnegative, check_number
from .sam import method_from, sam, sharpness_aware, with_policy

__all__ = [
    "LookSamState",
    "orthogonal_reuse",
    "looksam",
    "ae_sam",
    "MomentumSamState",
    "momentum_sam",
    "MesaState",
    "distillation_kl",
    "mesa",
]


class LookSamState(NamedTuple):
    """LookSAM's combiner state.

    Attributes:
        orthogonal: ``g_v``, the component of the last full step's ``g_s``
            orthogonal to its ``g`` (zeros before the first full step).
        orthogonal_norm: ``||g_v||``, kept so a cheap step need not compute it.
    """

    orthogonal: Updates
    orthogonal_norm: torch.Tensor


def orthogonal_reuse(alpha: float, *, eps: float = NORM_EPS) -> Combiner:
    """LookSAM's combiner: keeps ``g_v`` on full steps, adds it back on cheap ones.

    On a full step the gradient is ``g_s`` and the state becomes
    ``g_v = g_s - (<g, g_s> / max(||g||^2, eps)) g`` (and its norm); on a
    cheap step the gradient is ``g + alpha (||g|| / (||g_v|| + eps)) g_v``.

    Examples:
        >>> import samfunc
        >>> method = samfunc.sharpness_aware(
        ...     samfunc.sam_ascent(0.1),
        ...     samfunc.orthogonal_reuse(0.7),
        ...     policy=samfunc.every_n_steps(5),
        ... )
    """
    built = _OrthogonalReuse(check_nonnegative("alpha", alpha), check_nonnegative("eps", eps))
    return Combiner(built.init, built.update, built.reuse, state_type=LookSamState)


@dataclasses.dataclass(frozen=True)
class _OrthogonalReuse:
    alpha: float
    eps: float

    def init(self, params: Params) -> LookSamState:
        zeros = _tree.zeros_like(params)
        return LookSamState(zeros, _tree.global_norm(zeros))

    def update(
        self, grads: Updates, perturbed_grads: Updates, state: OptState, params: Params
    ) -> tuple[Updates, OptState]:
        del params
        _check_like(state, LookSamState, "looksam")
        _tree.check_same_shapes(state.orthogonal, grads, "the state's g_v", "grads")
        along = _tree.vdot(grads, perturbed_grads) / _tree.vdot(grads, grads).clamp_min(self.eps)
        orthogonal = _tree.add_scaled(perturbed_grads, grads, -along)
        return perturbed_grads, LookSamState(orthogonal, _tree.global_norm(orthogonal))

    def reuse(self, grads: Updates, state: OptState, params: Params) -> tuple[Updates, OptState]:
        del params
        _check_like(state, LookSamState, "looksam")
        _tree.check_same_shapes(state.orthogonal, grads, "the state's g_v", "grads")
        ratio = _tree.global_norm(grads) / (state.orthogonal_norm + self.eps)
        return _tree.add_scaled(grads, state.orthogonal, self.alpha * ratio), state


def _check_like(state: Any, expected: type, owner: str) -> None:
    if not isinstance(state, expected):
        raise TypeError(
            f"{owner}'s combiner got a state of type {type(state).__name__}, expected "
            f"{expected.__name__}: was the state made by another method's init?"
        )


def looksam(
    rho: Rho = 0.1, k: int = 10, alpha: float = 0.7, **options: Unpack[PerturbationOptions]
) -> Method:
    """LookSAM (Liu et al., CVPR 2022): SAM's second pass once every ``k`` steps.

    Step ``t`` with ``t % k == 0`` is a full SAM step (gradient ``g_s``) that
    stores ``g_v``, the component of ``g_s`` orthogonal to ``g``; the steps in
    between take one pass at ``w`` and the gradient
    ``g + alpha (||g|| / ||g_v||) g_v``. Passes per step: ``1 + 1/k``; ``k=1``
    is SAM. The defaults (rho 0.1, k 10, alpha 0.7) are the paper's; ``eps``
    1e-12 guards the two divisions.

    Args:
        rho: SAM's radius on the full steps.
        k: a full step every ``k`` steps.
        alpha: how much of ``g_v`` the cheap steps add back: a term of
            length ``alpha ||g||`` whatever ``rho``. The paper's 0.7 sent a
            small CNN to chance at a large learning rate (0.2) where 0.3 trained
            it (benchmarks/results/cheap_rho.md): lower it if cheap steps diverge.
        **options: ``samfunc.PerturbationOptions`` of the full steps' ascent.

    Examples:
        >>> import samfunc
        >>> method = samfunc.looksam(rho=0.1, k=5, alpha=0.7)
    """
    policy = every_n_steps(k)
    return sharpness_aware(
        sam_ascent(rho, **options), orthogonal_reuse(alpha), policy=policy, name="looksam"
    )


def ae_sam(
    rho: Rho = 0.05,
    c: Union[float, Schedule] = 0.0,
    delta: float = 0.9,
    **options: Unpack[PerturbationOptions],
) -> Method:
    """AE-SAM (Jiang et al., ICLR 2023): SAM's second pass only where the loss looks sharp.

    Every step takes the gradient at ``w``; it becomes a full SAM step when
    ``||g||^2 >= mean + c std`` of its running statistics (``sharp_steps``),
    and is a plain step otherwise. The fraction of full steps is what ``c``
    sets (``samfunc.full_step_fraction(state)`` reports it). The authors'
    code is not public; the statistics follow the paper, and their starting
    values (mean 0, variance e^-10) and the paper's schedule of ``c``
    (``linear_schedule(1.0, -1.0, total_steps)``) are taken as described there.

    Args:
        rho: SAM's radius on the full steps.
        c: the threshold in standard deviations, or a schedule of the step count.
        delta: the moving averages' coefficient.
        **options: ``samfunc.PerturbationOptions`` of the full steps' ascent.

    Examples:
        >>> import samfunc
        >>> method = samfunc.ae_sam(rho=0.05, c=samfunc.linear_schedule(1.0, -1.0, 1000))
    """
    method = with_policy(sam(rho, **options), sharp_steps(c, delta))
    assert method.pieces is not None
    return method_from(method.pieces._replace(name="ae_sam"))


class MomentumSamState(NamedTuple):
    """Momentum-SAM's combiner state.

    Attributes:
        velocity: ``v``, the momentum of the gradients this method returned
            (``v <- momentum v + gradient``), PyTorch SGD's buffer.
    """

    velocity: Updates


@dataclasses.dataclass(frozen=True)
class _MomentumSam:
    """Momentum-SAM's pieces: the point ``w - rho v / (||v|| + eps)`` and the velocity update."""

    rho: float
    momentum: float
    weight_decay: float
    eps: float

    def init(self, params: Params) -> MomentumSamState:
        """Zero velocity: the first step takes the gradient at ``w``."""
        return MomentumSamState(_tree.zeros_like(params))

    def point(self, params: Params, state: OptState) -> Params:
        _check_like(state, MomentumSamState, "momentum_sam")
        _tree.check_same_shapes(state.velocity, params, "the state's velocity", "params")
        if self.rho == 0.0:
            return params
        factor = -self.rho / (_tree.global_norm(state.velocity) + self.eps)
        return _tree.add_scaled(params, state.velocity, factor)

    def reuse(self, grads: Updates, state: OptState, params: Params) -> tuple[Updates, OptState]:
        point = params  # a one-pass step hands reuse the point it evaluated at
        if self.weight_decay != 0.0:
            grads = _tree.add_scaled(grads, point, self.weight_decay)
        velocity = _tree.add_scaled(grads, state.velocity, self.momentum)  # one fused op
        return grads, MomentumSamState(velocity)

    def update(
        self, grads: Updates, perturbed_grads: Updates, state: OptState, params: Params
    ) -> tuple[Updates, OptState]:
        raise AssertionError("momentum_sam takes one pass per step")  # pragma: no cover


def momentum_sam(
    rho: float = 3.0, momentum: float = 0.9, *, weight_decay: float = 0.0, eps: float = 1e-12
) -> Method:
    """Momentum-SAM (Becker et al., 2024): SAM's ascent from the momentum, at one pass per step.

    The gradient is taken at ``w - rho v / (||v|| + eps)`` only, with ``v``
    the momentum of the gradients returned so far in PyTorch SGD's convention
    (``v <- momentum v + g``, update ``-lr v``): ``-v`` is where SGD is about
    to go, and the loss's rise along it stands in for SAM's ascent. Pair it
    with ``samfunc.sgd(lr, momentum=the same momentum)``: then ``v`` is the
    optimizer's buffer and this is the official ``optimizer/msam.py``
    (MarlonBecker/MSAM), which stores the perturbed weights instead of ``w``;
    samfunc keeps ``w``, so nothing needs moving back before evaluation.

    The reported loss is the one at the perturbed point (the only pass).
    ``rho=0`` is the base optimizer exactly. ``rho`` is a distance in weight
    space (``||w - point|| = rho`` whatever the momentum, learning rate or
    gradient), so compare it with ``||w||``: the default, the paper's ``rho=3``
    for CIFAR and ImageNet ResNets, is ~3% of a WRN-16-8's norm but two thirds
    of a small CNN's, which it sends to chance (the guide "SAM at the cost of
    SGD", Choosing rho: a few percent of ``||w||`` trained every model tried).

    Args:
        rho: the radius, along ``-v``: a distance in weight space.
        momentum: the momentum of ``v``: the optimizer's.
        weight_decay: as the official code, added to the gradient (at the
            perturbed point) before it enters ``v``; leave the optimizer's
            weight decay at 0 then.
        eps: added to ``||v||`` (the official 1e-12); the first step, with
            ``v = 0``, takes the gradient at ``w``.

    Examples:
        >>> import samfunc
        >>> import torch
        >>> model = torch.nn.Linear(64, 10)
        >>> norm = torch.cat([p.detach().flatten() for p in model.parameters()]).norm()
        >>> method = samfunc.momentum_sam(rho=0.05 * float(norm), momentum=0.9)
        >>> opt = samfunc.sgd(0.1, momentum=0.9)
    """
    rho = check_nonnegative("rho", rho)
    momentum = check_in_interval("momentum", momentum, 0.0, 1.0)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    eps = check_nonnegative("eps", eps)
    built = _MomentumSam(rho, momentum, weight_decay, eps)
    combiner = Combiner(built.init, built.update, built.reuse, state_type=MomentumSamState)
    return method_from(Pieces("momentum_sam", None, combiner, point=built.point))


class MesaState(NamedTuple):
    """MESA's combiner state.

    Attributes:
        average: the teacher: an exponential moving average of the weights.
    """

    average: Params


def _outputs_of(aux: Any) -> torch.Tensor:
    """The model's outputs in ``aux``: ``aux`` itself, or its ``output`` (``ModuleAux``)."""
    output = getattr(aux, "output", aux)
    if isinstance(output, torch.Tensor) and output.ndim >= 1:
        return output
    if hasattr(output, "logits") or (isinstance(output, dict) and "logits" in output):
        raise TypeError(
            f"mesa got the model's output as a {type(output).__name__}: distill its logits, "
            "e.g. samfunc.mesa(outputs=lambda aux: aux.output.logits), or have the model "
            "return the logits tensor"
        )
    if isinstance(output, torch.Tensor):
        raise ValueError(
            f"mesa needs the model's outputs with a class dimension (e.g. logits of shape "
            f"(batch, classes)), got a tensor of shape {tuple(output.shape)}: a KL term over "
            "a 0-d output is always zero"
        )
    raise TypeError(
        "mesa needs the model's outputs: loss_fn must return (loss, logits) with "
        "has_aux=True (make_module_train_step does), got aux of type "
        f"{type(aux).__name__}"
    )


def distillation_kl(
    outputs: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(outputs / T))``, summed over classes, batch mean."""
    log_student = torch.log_softmax(outputs / temperature, dim=-1)
    target = torch.softmax(teacher.detach() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_student, target, reduction="none").sum(-1).mean()
    return kl * temperature**2


def _teacher_init(params: Params) -> MesaState:
    """The teacher starts as a copy of ``w``."""
    return MesaState(_tree.tree_map(lambda p: p.detach().clone(), params))


@dataclasses.dataclass(frozen=True)
class _Mesa:
    """MESA's objective: the loss plus ``weight KL(teacher || model)``, one extra forward."""

    weight: float
    decay: float
    temperature: float
    start_step: int
    outputs: Callable[[Any], torch.Tensor]

    def teacher(self, state: MethodState, params: Params) -> Params:
        """This step's teacher: the average moved towards ``w`` (unchanged at step 0)."""
        _check_like(state.combine, MesaState, "mesa")
        _tree.check_same_shapes(state.combine.average, params, "the state's teacher", "params")
        moved = state.steps > 0
        decay = self.decay
        return _tree.tree_map(
            lambda a, p: torch.where(moved, a * decay + (1.0 - decay) * p.detach(), a),
            state.combine.average,
            params,
        )

    def __call__(
        self, loss_fn: LossFn, params: Params, state: MethodState
    ) -> tuple[LossFn, MesaState]:
        teacher = self.teacher(state, params)
        active = state.steps >= self.start_step
        return _Regularized(self, loss_fn, teacher, active), MesaState(teacher)


@dataclasses.dataclass(frozen=True)
class _Regularized:
    mesa: _Mesa
    loss_fn: LossFn
    teacher: Params
    active: torch.Tensor

    def __call__(self, params: Params, batch: Any) -> tuple[torch.Tensor, Any]:
        value, aux = self.loss_fn(params, batch)
        outputs = self.mesa.outputs
        with torch.no_grad():
            taught = outputs(self.loss_fn(self.teacher, batch)[1]).detach()
        kl = distillation_kl(outputs(aux), taught, self.mesa.temperature)
        extra = torch.where(self.active, self.mesa.weight * kl, 0.0)
        return value + extra, (value.detach(), aux)


def mesa(
    weight: float = 0.8,
    decay: float = 0.9998,
    temperature: float = 5.0,
    start_step: int = 0,
    *,
    outputs: Optional[Callable[[Any], torch.Tensor]] = None,
) -> Method:
    """MESA (Du et al., NeurIPS 2022, "Sharpness-Aware Training for Free").

    No second pass: the loss gets ``weight T^2 KL(softmax(t / T) || softmax(o / T))``,
    a distillation term from the outputs ``t`` of a teacher, the exponential
    moving average of the weights (``decay``), to the model's outputs ``o``,
    which in expectation penalizes sharpness along the trajectory. The cost is
    one extra forward pass (the teacher's, without gradient) and one copy of
    the weights. Defaults from the official code (AngusDujw/SAF,
    ``MESA_train.py`` and ``run.sh``): weight 0.8, decay 0.9998, T = 5; it
    turns the term on after 5 epochs (``start_step``).

    ``loss_fn`` must return ``(loss, outputs)`` with ``has_aux=True``
    (``make_module_train_step`` does: its aux holds the outputs); the reported
    loss is ``loss_fn``'s, without the term. The teacher runs through the same
    ``loss_fn``, so in a module step BatchNorm uses batch statistics for it;
    the official teacher is a copy of the model in eval mode with averaged
    running statistics.

    Args:
        weight: the KL term's weight (``lambda``).
        decay: the moving average's decay (the teacher at step ``t`` averages
            ``w_0 .. w_t``).
        temperature: the softmax temperature ``T``.
        start_step: the term is on from this step (the average moves from step 0).
        outputs: picks the model's outputs out of ``loss_fn``'s aux; default:
            the aux itself, or its ``.output``.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> model = torch.nn.Linear(4, 3)
        >>> opt, method = samfunc.sgd(0.1), samfunc.mesa(weight=0.8, start_step=100)
        >>> step = samfunc.make_module_train_step(
        ...     model, torch.nn.functional.cross_entropy, opt, method=method
        ... )
        >>> state = samfunc.init_train_state(model, opt, method=method)
        >>> state, metrics = step(state, (torch.randn(8, 4), torch.randint(0, 3, (8,))))
    """
    weight = check_nonnegative("weight", weight)
    decay = check_in_interval("decay", decay, 0.0, 1.0)
    temperature = check_number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
    if outputs is not None and not callable(outputs):
        raise TypeError(f"outputs must be callable, got {type(outputs).__name__}")
    objective = _Mesa(weight, decay, temperature, start_step, outputs or _outputs_of)
    combiner = Combiner(_teacher_init, _no_second_pass, state_type=MesaState)
    return method_from(Pieces("mesa", None, combiner, objective=objective))


def _no_second_pass(
    grads: Updates, perturbed_grads: Updates, state: OptState, params: Params
) -> tuple[Updates, OptState]:
    raise AssertionError("mesa takes one pass per step")  # pragma: no cover
