"""Sharpness-aware methods: SAM and its well-known variants, each an ascent plus a combiner.

Every method here is a ``Method(init, grad)``::

    state = method.init(params)
    grads, loss, state = method.grad(loss_fn, params, batch, state)   # then the optimizer

``sharpness_aware(ascent, combiner)`` builds one from pieces, so a variant of
one's own is a transform (and, if it mixes the two gradients, a combiner).

Examples:
    >>> import torch
    >>> import samfunc
    >>> loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
    >>> params, opt = {"w": torch.ones(3)}, samfunc.sgd(0.1)
    >>> method = samfunc.gsam(rho=0.05, alpha=0.4)
    >>> opt_state, method_state = opt.init(params), method.init(params)
    >>> for _ in range(3):
    ...     batch = torch.randn(8, 3)
    ...     grads, loss, method_state = method.grad(loss_fn, params, batch, method_state)
    ...     updates, opt_state = opt.update(grads, opt_state, params)
    ...     params = samfunc.apply_updates(params, updates)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Optional

import torch
from typing_extensions import Unpack

from .. import _tree
from .._ascent import (
    average_gradients,
    random_leaf_subset,
    sam_ascent,
    subtract_momentum,
)
from .._base import (
    Combiner,
    EmptyState,
    GradientTransformation,
    Method,
    OptState,
    Params,
    PerturbationOptions,
    Pieces,
    Rho,
    Schedule,
    StepPolicy,
    Updates,
)
from .._combine import chain, takes_count
from .._interpreted import method_from, plain_gradient_method, sam_method
from .._phases import IDENTITY, pieces_of, reads_gradient
from .._transform import scale
from .._validate import check_fraction, check_in_interval, check_nonnegative, check_number

__all__ = [
    "sharpness_aware",
    "method_from",
    "plain_gradient",
    "with_policy",
    "perturbed_gradient",
    "surrogate_gap_decomposition",
    "weighted_sharpness",
    "sam",
    "gsam",
    "rho_from_learning_rate",
    "friendly_sam",
    "vasso",
    "wsam",
    "esam",
    "normalization_mask",
]

#: The gradient norm's offset in GSAM's projection (``perturb_eps`` in its code).
_PROJECTION_EPS = 1e-12


def _empty_init(params: Params) -> EmptyState:
    del params
    return EmptyState()


def perturbed_gradient() -> Combiner:
    """Plain SAM's combiner: the method's gradient is ``g_s``, the one at ``w + e``."""
    return IDENTITY


def plain_gradient() -> Method:
    """The plain gradient as a method: one pass at ``w`` (the train steps' ``sam=False``).

    Examples:
        >>> import torch
        >>> method = plain_gradient()
        >>> params = {"w": torch.ones(2)}
        >>> grads, loss, state = method.grad(
        ...     lambda p, b: (p["w"] * b).sum(), params, torch.ones(2), method.init(params)
        ... )
        >>> grads["w"]
        tensor([1., 1.])
    """
    return plain_gradient_method()


def sharpness_aware(
    ascent: GradientTransformation,
    combiner: Optional[Combiner] = None,
    *,
    select_fraction: Optional[float] = None,
    policy: Optional[StepPolicy] = None,
    name: str = "sharpness_aware",
) -> Method:
    """A method from its pieces: any ascent transform and a combiner.

    Args:
        ascent: a ``GradientTransformation`` from ``g`` to ``e``; its
            ``update`` gets the params. E.g. ``samfunc.sam_ascent(0.05)`` or a
            ``chain`` of ``normalize``, ``scale_by_radius`` and your own pieces.
        combiner: how ``g`` and ``g_s`` become the gradient; ``g_s`` when None.
        select_fraction: ESAM's data selection (see ``esam``); None for the
            whole batch in the second pass.
        policy: which steps run both passes; the others are cheap, one pass
            at ``w`` (``samfunc.every_n_steps``, ``from_step``,
            ``sharp_steps``). None: every step is full.
        name: for error messages.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> ascent = samfunc.chain(samfunc.normalize("inf"), samfunc.scale_by_radius(0.01))
        >>> method = samfunc.sharpness_aware(ascent)
        >>> params = {"w": torch.ones(2)}
        >>> grads, loss, state = method.grad(
        ...     lambda p, b: (p["w"] * b).sum(), params, torch.ones(2), method.init(params)
        ... )
    """
    if not isinstance(ascent, GradientTransformation):
        raise TypeError(f"ascent must be a GradientTransformation, got {type(ascent).__name__}")
    if combiner is None:
        combiner = perturbed_gradient()
    if not isinstance(combiner, Combiner):
        raise TypeError(f"combiner must be a samfunc.Combiner, got {type(combiner).__name__}")
    if select_fraction is not None:
        select_fraction = check_fraction("select_fraction", select_fraction)
    if policy is not None and not isinstance(policy, StepPolicy):
        raise TypeError(f"policy must be a samfunc.StepPolicy, got {type(policy).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    pieces = Pieces(
        name=name,
        ascent=ascent,
        combiner=combiner,
        policy=policy,
        select_fraction=select_fraction,
        ascent_takes_count=takes_count(ascent),
    )
    return method_from(pieces)


def with_policy(method: Method, policy: StepPolicy) -> Method:
    """``method`` with its full steps chosen by ``policy``, plain one-pass steps otherwise.

    The cheap steps take the gradient at ``w`` (one pass; what the combiner's
    ``reuse`` makes of it, for LookSAM), so a full step costs two passes and a
    cheap one, one. Any two-pass method takes a policy, a bare
    ``Method(init, grad)`` too (its ``grad`` makes the full steps; the cheap
    ones are the plain gradient, its state unchanged); one that has its own
    (LookSAM's, AE-SAM's) does not take another, nor does a one-pass method.

    Args:
        method: e.g. ``samfunc.sam(0.05)`` or ``samfunc.gsam(0.05)``.
        policy: ``samfunc.every_n_steps(n)`` (Composer's ``interval``),
            ``samfunc.from_step(start)`` (late-phase SAM) or
            ``samfunc.sharp_steps(c)`` (AE-SAM's).

    Examples:
        >>> import samfunc
        >>> method = samfunc.with_policy(samfunc.sam(0.05), samfunc.from_step(1000))
    """
    pieces = pieces_of(method)
    if not isinstance(policy, StepPolicy):
        raise TypeError(f"policy must be a samfunc.StepPolicy, got {type(policy).__name__}")
    if pieces.policy is not None:
        raise ValueError(f"{pieces.name} already has a step policy ({pieces.policy.name})")
    if pieces.ascent is None and pieces.whole is None:
        raise ValueError(
            f"{pieces.name} takes one pass per step, so a policy has no second pass to skip"
        )
    with_it = pieces._replace(name=f"{pieces.name} with {policy.name}", policy=policy)
    if with_it.whole is not None and reads_gradient(with_it):
        raise ValueError(
            f"{policy.name} decides from the first pass's gradient, which a bare "
            f"Method(init, grad) does not expose ({pieces.name} takes its own passes): use a "
            "policy that plans by step count (every_n_steps, from_step), or build the method "
            "with samfunc.sharpness_aware"
        )
    return method_from(with_it)


def sam(rho: Rho = 0.05, **options: Unpack[PerturbationOptions]) -> Method:
    """SAM (Foret et al., ICLR 2021), and ASAM (Kwon et al., ICML 2021) with ``adaptive``.

    ``e = rho g / (||g|| + 1e-12)``; the gradient is ``g_s = grad L(w + e)``.
    Official code: google-research/sam; the PyTorch port davda54/sam.

    Args:
        rho: the radius: a float, a 0-d tensor or a schedule of the step count.
        **options: ``adaptive``, ``eta``, ``norm``, ``mask``
            (``samfunc.PerturbationOptions``).

    Examples:
        >>> import samfunc
        >>> method = samfunc.sam(rho=0.05, adaptive=True, eta=0.01)
    """
    return sam_method(rho, **options)


def surrogate_gap_decomposition(alpha: float) -> Combiner:
    """GSAM's combiner: ``g_s - alpha * g_perp``.

    ``g_perp = g - (<g, g_s> / ||g_s||^2) g_s`` is the part of the clean
    gradient ``g`` orthogonal to ``g_s``; descending along ``-g_perp`` lowers
    the surrogate gap without changing the perturbed loss to first order. The
    cosine is computed as in the authors' code (juntang-zhuang/GSAM
    ``gradient_decompose``), with 1e-12 in both denominators.
    """
    alpha = check_number("alpha", alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"alpha must be in [0, 1), got {alpha}: GSAM subtracts alpha times the part of g "
            "orthogonal to g_s (the paper's alpha is 0.01-0.3 in its ResNet runs, 0.6 for ViT)"
        )
    return Combiner(_empty_init, _SurrogateGap(alpha).update, state_type=EmptyState)


@dataclasses.dataclass(frozen=True)
class _SurrogateGap:
    alpha: float

    def update(
        self, grads: Updates, perturbed_grads: Updates, state: OptState, params: Params
    ) -> tuple[Updates, OptState]:
        del params
        g_norm = _tree.global_norm(grads)
        gs_norm = _tree.global_norm(perturbed_grads)
        cosine = _tree.vdot(grads, perturbed_grads) / (g_norm * gs_norm + _PROJECTION_EPS)
        along = cosine * g_norm / (gs_norm + _PROJECTION_EPS)  # <g, g_s> / ||g_s||^2
        vertical = _tree.add_scaled(grads, perturbed_grads, -along)
        return _tree.add_scaled(perturbed_grads, vertical, -self.alpha), state


def gsam(rho: Rho = 0.05, alpha: float = 0.4, **options: Unpack[PerturbationOptions]) -> Method:
    """GSAM, surrogate gap guided SAM (Zhuang et al., ICLR 2022).

    The ascent is SAM's, ``e = rho_t g / (||g|| + 1e-12)``; the gradient is
    ``g_s - alpha * g_perp`` with ``g_perp`` the part of ``g`` orthogonal to
    ``g_s`` (``surrogate_gap_decomposition``). The paper ties rho to the
    learning rate: pass ``rho=samfunc.rho_from_learning_rate(...)``. Official
    code: juntang-zhuang/GSAM (``gsam/gsam.py``) and google-research/big_vision
    (``trainers/proj/gsam``). The PyTorch code has no default for ``alpha``;
    0.4 sits in the paper's range (its ViT configuration uses 0.6).
    ``alpha = 0`` with a constant rho is SAM.

    Examples:
        >>> import samfunc
        >>> lr = samfunc.cosine_decay_schedule(0.1, 1000)
        >>> rho = samfunc.rho_from_learning_rate(
        ...     lr, rho_max=0.1, rho_min=0.01, lr_max=0.1, lr_min=0.0
        ... )
        >>> method = samfunc.gsam(rho=rho, alpha=0.4)
    """
    combiner = surrogate_gap_decomposition(alpha)
    return sharpness_aware(sam_ascent(rho, **options), combiner, name="gsam")


def rho_from_learning_rate(
    learning_rate: Schedule, *, rho_max: float, rho_min: float, lr_max: float, lr_min: float
) -> Schedule:
    """GSAM's radius, proportional to the learning rate (Zhuang et al., 2022).

    ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``,
    and ``rho_max`` when ``lr_max <= lr_min`` (the authors' ``ProportionScheduler``).
    ``lr_t`` is ``learning_rate`` at the same step count, so the ascent's rho
    moves with the optimizer's learning rate when both count the same steps.
    In ``samfunc.SAM`` with a ``torch.optim.lr_scheduler``, pass
    ``samfunc.group_learning_rate()``: the lr the scheduler set for this step.

    Examples:
        >>> import torch
        >>> import samfunc
        >>> lr = samfunc.linear_schedule(0.1, 0.0, 10)
        >>> rho = rho_from_learning_rate(lr, rho_max=0.2, rho_min=0.02, lr_max=0.1, lr_min=0.0)
        >>> round(float(rho(torch.tensor(5))), 6)
        0.11
    """
    if not callable(learning_rate):
        raise TypeError(f"learning_rate must be a schedule, got {learning_rate!r}")
    rho_max = check_nonnegative("rho_max", rho_max)
    rho_min = check_nonnegative("rho_min", rho_min)
    lr_max = check_number("lr_max", lr_max)
    lr_min = check_number("lr_min", lr_min)
    if rho_min > rho_max:
        raise ValueError(f"rho_min must be <= rho_max, got {rho_min} > {rho_max}")
    return _RhoFromLearningRate(learning_rate, rho_max, rho_min, lr_max, lr_min)


@dataclasses.dataclass(frozen=True)
class _RhoFromLearningRate:
    learning_rate: Schedule
    rho_max: float
    rho_min: float
    lr_max: float
    lr_min: float

    def __call__(self, count: torch.Tensor) -> torch.Tensor:
        lr = self.learning_rate(count)
        if not isinstance(lr, torch.Tensor):
            lr = torch.as_tensor(lr, dtype=torch.float64)
        wide = torch.float32 if lr.device.type == "mps" else torch.float64
        lr = lr.to(wide)  # a float32 rho would be off by ~1e-8 of itself
        if self.lr_max <= self.lr_min:
            return torch.ones_like(lr) * self.rho_max
        scale = (self.rho_max - self.rho_min) / (self.lr_max - self.lr_min)
        return self.rho_min + scale * (lr - self.lr_min)


def friendly_sam(
    rho: Rho = 0.05,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    **options: Unpack[PerturbationOptions],
) -> Method:
    """Friendly-SAM, F-SAM (Li et al., CVPR 2024).

    The ascent follows ``g - sigma m`` where ``m`` is a moving average of the raw
    gradients (the full-batch part of ``g``): ``m = g`` at the first step (whose
    direction is plain ``g``), then the direction uses the momentum before this
    step and ``m = lmbda m + (1 - lmbda) g`` (``subtract_momentum``). Official
    code: nblt/F-SAM (``utils.py``, ``FriendlySAM``), whose defaults these are.
    ``sigma = 0`` is SAM.

    Examples:
        >>> import samfunc
        >>> method = samfunc.friendly_sam(rho=0.05, sigma=1.0, lmbda=0.9)
    """
    direction = subtract_momentum(sigma, lmbda)
    return sharpness_aware(sam_ascent(rho, direction=direction, **options), name="friendly_sam")


def vasso(rho: Rho = 0.05, theta: float = 0.9, **options: Unpack[PerturbationOptions]) -> Method:
    """VaSSO, variance-suppressed sharpness-aware optimization (Li & Giannakis, NeurIPS 2023).

    The ascent follows a moving average of the gradients: ``d = g`` at the
    first step, then ``d = (1 - theta) d + theta g``; ``e = rho d / ||d||``
    (``average_gradients``). Official code: BingcongLi/VaSSO
    (``solver/vasso.py``); its default ``theta`` is 0.9 (``configs``, ``train.sh``).
    The authors use 1e-7 in the norm's denominator; samfunc keeps SAM's 1e-12
    for every method. ``theta = 1`` is SAM.

    Examples:
        >>> import samfunc
        >>> method = samfunc.vasso(rho=0.05, theta=0.9)
    """
    direction = average_gradients(theta)
    return sharpness_aware(sam_ascent(rho, direction=direction, **options), name="vasso")


def weighted_sharpness(gamma: float) -> Combiner:
    """WSAM's combiner: ``g + gamma / (1 - gamma) (g_s - g)``."""
    gamma = check_in_interval("gamma", gamma, 0.0, 1.0)
    return Combiner(
        _empty_init, _WeightedSharpness(gamma / (1.0 - gamma)).update, state_type=EmptyState
    )


@dataclasses.dataclass(frozen=True)
class _WeightedSharpness:
    weight: float

    def update(
        self, grads: Updates, perturbed_grads: Updates, state: OptState, params: Params
    ) -> tuple[Updates, OptState]:
        del params
        sharpness = _tree.add_scaled(perturbed_grads, grads, -1.0)
        return _tree.add_scaled(grads, sharpness, self.weight), state


def wsam(rho: Rho = 0.05, gamma: float = 0.9, **options: Unpack[PerturbationOptions]) -> Method:
    """WSAM, weighted sharpness as a regularization term (Yue et al., KDD 2023).

    The gradient is ``g + gamma / (1 - gamma) (g_s - g)``, the gradient of
    ``L(w) + gamma / (1 - gamma) (L(w + e) - L(w))``; ``gamma = 0.5`` is SAM.
    This is the coupled form of the official code
    (intelligent-machine-learning/dlrover, ``atorch/optimizers/wsam.py``,
    ``decouple=False``). Its default, decoupled form steps the base optimizer on
    ``g`` and adds ``-lr gamma / (1 - gamma) (g_s - g)`` outside it (no momentum
    or weight decay on that term), which needs the learning rate inside the
    method; it is not provided.

    Examples:
        >>> import samfunc
        >>> method = samfunc.wsam(rho=0.05, gamma=0.9)
    """
    combiner = weighted_sharpness(gamma)
    return sharpness_aware(sam_ascent(rho, **options), combiner, name="wsam")


def esam(
    rho: Rho = 0.05,
    beta: float = 0.6,
    gamma: float = 0.5,
    *,
    seed: int = 0,
    **options: Unpack[PerturbationOptions],
) -> Method:
    """ESAM, efficient SAM (Du et al., ICLR 2022).

    Two savings on SAM's second pass:

    * stochastic weight perturbation: each leaf joins the ascent with
      probability ``beta``; the norm runs over the joining leaves and ``e`` is
      divided by ``beta`` (``random_leaf_subset``). Every leaf still gets its
      gradient at ``w + e``. The draws come from ``seed`` and the step count in
      the state, so runs are reproducible and resumable;
    * sharpness-sensitive data selection: the second pass runs on the
      ``int(gamma * n)`` samples (at least one) whose loss rose most from ``w``
      to ``w + e``, found with one extra forward pass without gradients.

    So ``loss_fn`` must return **one loss per sample** (a 1-d tensor, e.g.
    ``cross_entropy(..., reduction="none")``); the gradient of the first pass
    and the loss reported are their mean, and the batch's tensor leaves must
    share dim 0 (the samples). ``beta = gamma = 1`` is SAM on the mean loss.
    Official code: dydjw9/Efficient_SAM (``utils/Esam.py``); the defaults are
    those of its ``run.sh`` (its ``options.py`` defaults of 1.0 give plain SAM).
    Where the authors' code keeps the samples *strictly* sharper than the
    k-th (``k - 1`` or fewer), this keeps the top ``k``; it uses 1e-12 in the
    norm as SAM does, where they use 1e-7.

    Examples:
        >>> import samfunc
        >>> method = samfunc.esam(rho=0.05, beta=0.6, gamma=0.5, seed=0)
    """
    beta = check_fraction("beta", beta)
    gamma = check_fraction("gamma", gamma)
    direction = random_leaf_subset(beta, seed)
    ascent = sam_ascent(rho, direction=direction, **options)
    if beta < 1.0:
        ascent = chain(ascent, scale(1.0 / beta))
    return sharpness_aware(ascent, select_fraction=gamma, name="esam")


#: The module types whose parameters SAM-ON perturbs.
_NORMALIZATION_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
    *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()),
)


def normalization_mask(module: torch.nn.Module) -> Callable[[str, torch.Tensor], bool]:
    """SAM-ON's mask (Mueller et al., NeurIPS 2023): the normalization layers' parameters.

    A predicate ``(path, leaf) -> bool`` for ``mask=``, true for the weights and
    biases of ``module``'s BatchNorm, InstanceNorm, LayerNorm, GroupNorm and
    RMSNorm layers, found by module type. Pass it to any method
    (``samfunc.sam(rho=0.5, mask=samfunc.normalization_mask(model))``) or to
    ``SAM(..., method=...)`` (pass ``model.named_parameters()`` there): it
    matches the parameter names of ``module_params(module)``. The
    authors' code (mueller-mp/SAM-ON) selects by name instead (``"norm"`` or
    ``"bn"`` in the name), and uses larger radii than SAM (``rho=0.5`` by default).

    Examples:
        >>> import torch
        >>> import samfunc
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> mask = samfunc.normalization_mask(model)
        >>> [name for name, p in model.named_parameters() if mask(name, p)]
        ['1.weight', '1.bias']
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    names: set[str] = set()
    for prefix, child in module.named_modules():
        if isinstance(child, _NORMALIZATION_TYPES):
            for name, _ in child.named_parameters(recurse=False):
                names.add(f"{prefix}.{name}" if prefix else name)
    if not names:
        raise ValueError(
            f"module has no normalization layer with parameters: {type(module).__name__}"
        )
    return _NamedIn(frozenset(names))


@dataclasses.dataclass(frozen=True)
class _NamedIn:
    """A mask predicate: true for the leaves whose path is one of ``names``."""

    names: frozenset[str]

    def __call__(self, path: str, leaf: torch.Tensor) -> bool:
        del leaf
        return path in self.names
