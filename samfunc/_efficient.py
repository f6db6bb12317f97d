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

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import torch
from typing_extensions import Unpack

from . import _tree
from ._ascent import NORM_EPS, sam_ascent
from ._base import (
    Combiner,
    EngineOptions,
    LossFn,
    Method,
    OptState,
    Params,
    PerturbationOptions,
    Rho,
    Schedule,
    Updates,
    check_state,
)
from ._distributed import all_mean
from ._engine import ONE_PASS, RunOptions, check_params, checked_loss_fn, one_pass, run_options
from ._finite import raise_if_nonfinite, refuse_raise_under_compile
from ._grad import grad_and_value
from ._methods import sam, sharpness_aware, with_policy
from ._policy import every_n_steps, sharp_steps
from ._tree import PyTree
from ._validate import check_in_interval, check_nonnegative, check_number

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
    alpha = check_nonnegative("alpha", alpha)
    eps = check_nonnegative("eps", eps)

    def init(params: Params) -> LookSamState:
        zeros = _tree.zeros_like(params)
        return LookSamState(zeros, _tree.global_norm(zeros))

    def update(
        grads: Updates, perturbed_grads: Updates, state: OptState, params: Params
    ) -> tuple[Updates, OptState]:
        del state, params
        along = _tree.vdot(grads, perturbed_grads) / _tree.vdot(grads, grads).clamp_min(eps)
        orthogonal = _tree.add_scaled(perturbed_grads, grads, -along)
        return perturbed_grads, LookSamState(orthogonal, _tree.global_norm(orthogonal))

    def reuse(grads: Updates, state: OptState, params: Params) -> tuple[Updates, OptState]:
        del params
        ratio = _tree.global_norm(grads) / (state.orthogonal_norm + eps)
        return _tree.add_scaled(grads, state.orthogonal, alpha * ratio), state

    return Combiner(init, update, reuse)


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
        alpha: how much of ``g_v`` the cheap steps add back.
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
    method.grad.name = "ae_sam"  # type: ignore[attr-defined]
    return method


class _OnePassMethod:
    """What the one-pass methods share: checks, the non-finite option, the parts."""

    name = "method"

    def _prepare(
        self, loss_fn: LossFn, params: Params, state: Any, expected: type, options: EngineOptions
    ) -> tuple[LossFn, RunOptions]:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        run = run_options(options)
        check_params(params)
        check_state(self.name, state, expected)
        if run.nonfinite == "raise":
            refuse_raise_under_compile()
        return checked_loss_fn(loss_fn, run.has_aux), run

    def _check(self, grads: PyTree, loss: torch.Tensor, run: RunOptions) -> None:
        if run.nonfinite == "raise":
            raise_if_nonfinite(grads, ONE_PASS, loss)


class MomentumSamState(NamedTuple):
    """Momentum-SAM's state.

    Attributes:
        velocity: ``v``, the momentum of the gradients this method returned
            (``v <- momentum v + gradient``), PyTorch SGD's buffer.
    """

    velocity: Updates


class MomentumSamGrad(_OnePassMethod):
    """Momentum-SAM's ``grad``: one pass, at ``w - rho v / (||v|| + eps)``."""

    name = "momentum_sam"

    def __init__(self, rho: float, momentum: float, weight_decay: float, eps: float) -> None:
        self.rho = rho
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.eps = eps

    def init(self, params: Params) -> MomentumSamState:
        """Zero velocity: the first step takes the gradient at ``w``."""
        return MomentumSamState(_tree.zeros_like(params))

    def __call__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: Any,
        **options: Unpack[EngineOptions],
    ) -> tuple[PyTree, Any, MomentumSamState]:
        """``(grads, loss at w + e, new_state)``; ``(grads, (loss, aux), new_state)`` with aux."""
        loss, run = self._prepare(loss_fn, params, state, MomentumSamState, options)
        velocity = state.velocity
        perturbed = params
        if self.rho != 0.0:
            factor = -self.rho / (_tree.global_norm(velocity) + self.eps)
            perturbed = _tree.add_scaled(params, velocity, factor)
        grads, value = one_pass(
            grad_and_value(loss, has_aux=run.has_aux), perturbed, batch, run, run.has_aux
        )
        self._check(grads, value[0] if run.has_aux else value, run)
        if self.weight_decay != 0.0:
            grads = _tree.add_scaled(grads, perturbed, self.weight_decay)
        velocity = _tree.add_scaled(grads, velocity, self.momentum)  # one fused op
        return grads, value, MomentumSamState(velocity)


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
    ``rho=0`` is the base optimizer exactly. The paper's radii are large:
    ``rho=3`` for its CIFAR and ImageNet runs (the class in its code defaults
    to 0.3).

    Args:
        rho: the radius, along ``-v``.
        momentum: the momentum of ``v``: the optimizer's.
        weight_decay: as the official code, added to the gradient (at the
            perturbed point) before it enters ``v``; leave the optimizer's
            weight decay at 0 then.
        eps: added to ``||v||`` (the official 1e-12); the first step, with
            ``v = 0``, takes the gradient at ``w``.

    Examples:
        >>> import samfunc
        >>> method = samfunc.momentum_sam(rho=3.0, momentum=0.9)
        >>> opt = samfunc.sgd(0.1, momentum=0.9)
    """
    rho = check_nonnegative("rho", rho)
    momentum = check_in_interval("momentum", momentum, 0.0, 1.0)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    eps = check_nonnegative("eps", eps)
    grad = MomentumSamGrad(rho, momentum, weight_decay, eps)
    return Method(grad.init, grad)


class MesaState(NamedTuple):
    """MESA's state.

    Attributes:
        average: the teacher: an exponential moving average of the weights.
        steps: steps taken (int64, CPU).
    """

    average: Params
    steps: torch.Tensor


def _outputs_of(aux: Any) -> torch.Tensor:
    """The model's outputs in ``aux``: ``aux`` itself, or its ``output`` (``ModuleAux``)."""
    output = getattr(aux, "output", aux)
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            "mesa needs the model's outputs: loss_fn must return (loss, logits) with "
            "has_aux=True (make_module_train_step does), got aux of type "
            f"{type(aux).__name__}"
        )
    return output


def distillation_kl(
    outputs: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(outputs / T))``, summed over classes, batch mean."""
    log_student = torch.log_softmax(outputs / temperature, dim=-1)
    target = torch.softmax(teacher.detach() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_student, target, reduction="none").sum(-1).mean()
    return kl * temperature**2


class MesaGrad(_OnePassMethod):
    """MESA's ``grad``: one pass on ``loss + weight KL(teacher || model)``, one extra forward."""

    name = "mesa"

    def __init__(
        self,
        weight: float,
        decay: float,
        temperature: float,
        start_step: int,
        outputs: Callable[[Any], torch.Tensor],
    ) -> None:
        self.weight = weight
        self.decay = decay
        self.temperature = temperature
        self.start_step = start_step
        self.outputs = outputs

    def init(self, params: Params) -> MesaState:
        """The teacher starts as a copy of ``w``."""
        average = _tree.tree_map(lambda p: p.detach().clone(), params)
        return MesaState(average, torch.zeros((), dtype=torch.int64))

    def _teacher(self, state: MesaState, params: Params) -> Params:
        """This step's teacher: the average moved towards ``w`` (unchanged at step 0)."""
        moved = state.steps > 0
        return _tree.tree_map(
            lambda a, p: torch.where(moved, a * self.decay + (1.0 - self.decay) * p.detach(), a),
            state.average,
            params,
        )

    def __call__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: Any,
        **options: Unpack[EngineOptions],
    ) -> tuple[PyTree, Any, MesaState]:
        """``(grads, (loss, aux), new_state)``; ``loss`` is ``loss_fn``'s, without the KL term."""
        loss, run = self._prepare(loss_fn, params, state, MesaState, options)
        if not run.has_aux:
            raise ValueError(
                "mesa needs the model's outputs: pass has_aux=True with a loss_fn that returns "
                "(loss, logits), or use make_module_train_step"
            )
        teacher = self._teacher(state, params)
        active = state.steps >= self.start_step

        def regularized(p: Params, part: Any) -> tuple[torch.Tensor, Any]:
            value, aux = loss(p, part)
            with torch.no_grad():
                taught = self.outputs(loss(teacher, part)[1]).detach()
            kl = distillation_kl(self.outputs(aux), taught, self.temperature)
            return value + torch.where(active, self.weight * kl, 0.0), (value.detach(), aux)

        grads, (_, (value, aux)) = one_pass(
            grad_and_value(regularized, has_aux=True), params, batch, run, True
        )
        value = value.mean() if value.ndim else value
        if run.data_parallel is not None:  # one_pass averaged the loss with the KL term
            value = all_mean(value, run.data_parallel.group)
        self._check(grads, value, run)
        return grads, (value, aux), MesaState(teacher, state.steps + 1)


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
    grad = MesaGrad(weight, decay, temperature, start_step, outputs or _outputs_of)
    return Method(grad.init, grad)
