"""Plain reference loops for the efficient SAM methods, written from the official code / papers.

LookSAM, Momentum-SAM (MSAM), AE-SAM, SAM every k steps (Composer's ``interval``), late-phase
SAM and MESA, plus plain SGD and SAM. These use torch only (never samfunc), so samfunc's
implementations can be tested against them. Each loop keeps the official structure where it
matters: forward/backward into ``.grad``, perturb the parameters in place, backward again,
restore w the way the official code restores it, then ``torch.optim.SGD.step()``
(``weight_decay=0``, ``nesterov=False``). MSAM is its own optimizer and is ported as written.
Every loop returns a Trajectory: one ``{name: detached clone}`` per step of the TRUE weights w
after that step (for MSAM: with the stored perturbation undone, see below).

Official sources read (the stored copies; line numbers are approximate, by the file as stored):

* LookSAM (Liu et al., CVPR 2022, arXiv 2203.02714). The authors released no code
  (``Mi-Peng/sam-hub`` README: "LookSAM | Official Code: Not Found"). Implementations read:

  - ``MarlonBecker/MSAM`` ``optimizer/looksam.py`` @ 780fa4f6 (the MSAM authors' baseline):
    ``iteration_counter = k`` at start (~L45, so the FIRST step is a SAM step, then every k-th);
    ``move_up`` ~L48-63 (e = rho g / (||g|| + 1e-12)); ``move_back`` ~L65-88:
    ``g_v = g_s - <g_s, g> / (||g||**2 + 1e-12) * g`` then ``g_v /= ||g_v||`` (NO eps);
    ``update_gradient`` ~L90-98: ``g += alpha * ||g|| * g_v_hat``; ``step`` ~L100-125 feeds
    g_s to its SGD on SAM steps. Global (all-parameter) norms. Config ``configs/default.ini``
    ``lookSAMk = 10, lookSAMalpha = 0.7``; class defaults ``k=5, alpha=0.2, rho=0.3``.
  - ``Mi-Peng/sam-hub`` ``solver/looksam.py`` @ 4e1101fa (same author as the TorchZoo
    collection): ``step`` ~L56-85 computes g (``closure_first``), and only when
    ``global_step % k == 0`` perturbs (e = rho g / (||g|| + 1e-7), ~L38-47), runs
    ``closure_second`` (which calls ``optimizer.zero_grad()`` first, ``utils/engine.py``), builds
    ``g_v = g_s - ||g_s|| cos g / ||g||`` with ``cos = <g, g_s> / (||g|| ||g_s||)`` (no eps,
    ``update_gv`` ~L87-94, ``_cosine_theta_sgdsam`` ~L108-118) and restores by ``p.sub_(e_w)``;
    other steps ``reuse_gv`` ~L96-106: ``g += alpha * g_v * ||g|| / ||g_v||`` (no eps). Global
    norms; ``configs/optimizer/looksam.yaml``: ``rho 0.1, k 5, alpha 0.7``. So this collection
    DOES skip the second pass and feeds g_s alone (refutes the claim for sam-hub). The repo
    ``Mi-Peng/Sharpness-Aware-Minimization-TorchZoo`` is not in the stored index: the claim
    that it "never skips the second pass and doubles the gradient" could not be checked there.
    The doubled gradient is a documented bug of ``rollovd/LookSAM`` (issue #3: no ``zero_grad``
    before the second backward, so .grad = g + g_s); the stored ``looksam.py`` @ c1d6214c has
    ``zero_sam_grad=True`` by default.
  - ``rollovd/LookSAM`` ``looksam.py`` @ c1d6214c: PER-TENSOR (layer-wise) projection and
    ratio: ``g_v_l = g_s_l - ||g_s_l|| <g_l_hat, g_s_l_hat> g_l_hat`` and
    ``g_l += alpha * ||g_l|| / (||g_v_l|| + 1e-8) * g_v_l``; perturbation eps 1e-8; it ends
    every step with ``p.data = state[p]['old_p']``, benign only because after the first SAM step
    p.data IS that tensor (aliasing). ``Leminhbinh0209/LookSAM`` ``looksam.py``: global, eps
    1e-12 in ``cos = <g, g_s> / (||g|| ||g_s|| + eps)``, ``g/(||g|| + eps)`` and
    ``||g|| / (||g_v|| + eps)``; its first README ran ``ascent_step`` (perturb) every step.
    ``EnderDragonzy/looksam_wise_layer``: per-tensor, clips the ratio at 1, clips grads at 1.
  - Look-LayerSAM (the paper's large-batch variant) keeps the g_v reuse but scales the
    PERTURBATION layer-wise (LAMB-style trust ratio ||w_l|| / ||g_l|| per layer) and runs on a
    LAMB base optimizer; not implemented here (from the paper's description; the text itself
    is not stored).

  Our reference = the paper's Algorithm 1 with global norms, SAM on 0-based steps
  ``t % k == 0`` (step 0 included, as every implementation does), see ``looksam_reference``.

* Momentum-SAM (Becker, Altrock, Risse, 2024, arXiv 2401.12033): ``MarlonBecker/MSAM``
  ``optimizer/msam.py`` @ 780fa4f6 (``__init__`` L5-33: zero momentum buffers,
  ``inverse_norm_buffer = 0``; ``step`` L35-101; ``move_up_to_momentumAscent`` /
  ``move_back_from_momentumAscent`` ~L104-117) and its driver ``main.py`` (``move_up`` before
  each epoch's batches ~L87-88, ``loss.mean().backward(); optimizer.step()`` then
  ``optimizer.zero_grad()`` ~L99-106, ``move_back`` before evaluation ~L116-117, an extra
  forward-only epoch to recompute BN statistics at the end ~L133-160). Defaults: class
  ``lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.3``; ``configs/*.ini`` ``learningRate 0.5``
  (1-epoch ramp + cosine), ``momentum 0.9, weightDecay 5e-4, rhoScheduler const``; README:
  MSAM ``--rho 3`` (SAM baseline ``--rho 0.2``).

* AE-SAM (Jiang, Yang, Zhang, Kwok, ICLR 2023, arXiv 2304.14647). No official code is stored
  (or was found in any index: ``find_repos``/``find_string`` for AE-SAM/AESAM/Weisen).
  Written from the paper's update rules (as quoted by two independent secondary sources:
  ``junaidaliop.github.io/zij/math/aesam`` and a paper-notes markdown in the code index):
  ``mu_t = delta mu_{t-1} + (1-delta) ||g_t||^2``, then
  ``sigma2_t = delta sigma2_{t-1} + (1-delta) (||g_t||^2 - mu_t)^2`` (with the UPDATED mu_t),
  SAM iff ``||g_t||^2 >= mu_t + c_t sigma_t`` (updated statistics, ``>=``), else an ERM step
  with g_t; ``c_t = (t/T) lambda1 + (1 - t/T) lambda2``. The initial values
  ``mu_{-1} = 0, sigma2_{-1} = e^-10`` and the defaults ``delta = 0.9, (lambda1, lambda2) =
  (-1, 1)`` are from memory of the paper's Algorithm 1 / experiments, NOT verified against a
  stored copy (see ``AE_SAM_MU_INIT``, ``AE_SAM_VAR_INIT``, ``ae_sam_c_schedule``).

* SAM every k steps: ``mosaicml/composer`` ``composer/algorithms/sam/sam.py`` @ 2052adc1
  (``SAMOptimizer.first_step`` ~L67-77, ``second_step`` ~L79-86 restores by ``p.sub_(e_w)``,
  ``step`` ~L88-112: SAM iff ``(self.global_step + 1) % self.interval == 0`` with
  ``global_step`` starting at 0, i.e. the LAST step of each interval, 0-based steps
  ``every-1, 2*every-1, ...``; other steps ``base_optimizer.step()`` on the same base
  optimizer, so one momentum buffer). Defaults ``rho=0.05, epsilon=1e-12, interval=1``; README:
  ``interval=10`` with ``rho=0.5`` in their ImageNet runs ("adjust rho proportionally").
  ``sam_interval.py`` (``SAM_FixedInterval.run_check``: ``(t + 1) % interval_num == 0``) agrees.

* Late-phase SAM (Zhou, Wang, Mao, Li, Yan, ICLR 2025, arXiv 2410.10373):
  ``zzp1012/SAM-in-Late-Phase`` ``script/ERM_to_SAM.py`` @ 217fea42 (two optimizers ~L60-70:
  ``ERM_optimizer = SGD(...)`` and ``SAM_optimizer = SAM(..., base_optimizer=SGD)``, i.e. TWO
  SGD instances with SEPARATE momentum buffers; ``isSAM = start_SAM <= epoch <= end_SAM``
  ~L87; SAM branch ~L110-122) and ``src/utils/SAM.py`` (davda54/sam: eps 1e-12, restore by
  ``p.data = old_p``). Argparse defaults: ``epochs 160, start_SAM 150, end_SAM 160`` (SAM for
  the last 10 of 160 epochs, 6.25%), ``lr 0.01, momentum 0.9, wd 1e-4, rho 2.0`` (with
  ``--adaptive`` optional), label smoothing 0.1. Paper Fig. 1: WRN-16-8 / CIFAR-10, SGD to
  epoch 175 then SAM to 200 (the last 12.5%).

* MESA (Du et al., NeurIPS 2022, "Sharpness-Aware Training for Free", arXiv 2205.14083):
  ``AngusDujw/SAF`` ``MESA_train.py`` @ 6e856004 (MESA args ~L283-286: ``--reinforce 0.3``,
  ``--temperature 5``, ``--kl_start_epoch 5``, ``--kl_end_epoch 360``; timm
  ``--model-ema-decay 0.9998``; ``train_one_epoch`` ~L620-690: teacher forward under no_grad,
  KL added iff ``kl_start_epoch < epoch < kl_end_epoch`` (strict), ``model_ema.update(model)``
  after every ``optimizer.step()``); ``run.sh``: ``--reinforce 0.8 --kl_start_epoch 5
  --model-ema --smoothing 0.1 --lr 0.4 --weight-decay 1e-4``; README: lambda ``(0.3/0.8)``
  (SAF/MESA), temperature 5, E_start 5 "or 30% of the total epochs". Teacher: timm
  ``ModelEmaV2`` (``deepcopy(model)`` at creation, ``.eval()``, update
  ``ema = decay * ema + (1 - decay) * w`` over the whole state_dict, buffers included; read in
  ``huggingface/pytorch-image-models`` ``timm/utils/model_ema.py``). CE: ``rein_CrossEntropyLoss``
  (``timm/loss/cross_entropy.py`` in SAF) called without ``reinforce``/``indices`` is the mean CE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# The helpers and plain SAM shared with the other reference loops (davda54-style SAM, eps 1e-12).
from tests.reference_fsam_vasso_esam import (
    _global_norm,
    _leaves,
    _max_diff,
    _sgd,
    _snapshot,
    sam_reference,
    tiny_problem,
)

LossFn = Callable[[dict[str, Tensor], Any], Tensor]
LogitsFn = Callable[[dict[str, Tensor], Tensor], Tensor]
Trajectory = list[dict[str, Tensor]]

#: ``1 / (ascent_norm + 1e-12)`` in MarlonBecker/MSAM optimizer/msam.py ``step`` (~L89).
MSAM_EPS = 1e-12
#: AE-SAM initial statistics ``mu_{-1}`` and ``sigma^2_{-1}`` (paper's Algorithm 1, from memory).
AE_SAM_MU_INIT = 0.0
AE_SAM_VAR_INIT = math.exp(-10.0)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``sum(stack([(x * y).sum() ...]))`` (MarlonBecker/MSAM looksam.py ``_scalar_product``)."""
    return torch.sum(torch.stack([(x * y).sum() for x, y in zip(a, b)]))


def sgd_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
) -> Trajectory:
    """Plain SGD with momentum: one gradient per step, ``torch.optim.SGD.step()``."""
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    out: Trajectory = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()
        opt.step()
        out.append(_snapshot(w))
    return out


def looksam_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    k: int,
    alpha: float,
    eps: float = 1e-12,
) -> Trajectory:
    """LookSAM (Liu et al., CVPR 2022, Algorithm 1), global (non-layer-wise) norms.

    Step t (0-based) with ``t % k == 0`` (so step 0 is always a SAM step):
      g at w; e = rho * g / (||g|| + eps); p += e in place; g_s at w + e; restore w by copying
      the saved weights (davda54 style);
      g_v = g_s - (<g, g_s> / ||g||**2) * g            (NO eps in this projection; equal to
      g_s - ||g_s|| cos(theta) g / ||g|| with cos = <g, g_s> / (||g|| ||g_s||));
      g_s (not g, not g + g_s) is fed to SGD.
    Other steps: one gradient g at w, and SGD is fed
      g + alpha * (||g|| / (||g_v|| + eps)) * g_v      (eps only here and in the perturbation).
    All norms and the inner product are over all parameters (``_global_norm``, ``_dot``).
    ||g_v|| is recomputed from the stored g_v at each reuse step (same value every time).

    Differences from the implementations read (see the module docstring): the MSAM repo puts
    1e-12 in the projection denominator (||g||**2 + 1e-12) and none in ||g_v||; sam-hub uses
    no eps in either and 1e-7 in the perturbation; rollovd/LookSAM is per-tensor (layer-wise).
    With k=1 every step is a SAM step and this equals ``sam_reference`` exactly.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    g_v: dict[str, Tensor] = {}
    out: Trajectory = []
    for t, batch in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()  # g at w, every step
        if t % k == 0:
            with torch.no_grad():
                keys = [n for n, p in w.items() if p.grad is not None]
                g = {n: w[n].grad.detach().clone() for n in keys}
                grad_norm = _global_norm([g[n] for n in keys])
                scale = rho / (grad_norm + eps)
                old_p: dict[str, Tensor] = {}
                for n in keys:
                    p = w[n]
                    old_p[n] = p.detach().clone()
                    p.add_(p.grad * scale)
            opt.zero_grad(set_to_none=True)
            loss_fn(w, batch).backward()  # g_s at w + e
            with torch.no_grad():
                for n in keys:
                    w[n].copy_(old_p[n])
                g_s = [w[n].grad for n in keys]
                coef = _dot(g_s, [g[n] for n in keys]) / grad_norm**2
                g_v = {n: (w[n].grad - coef * g[n]).detach().clone() for n in keys}
            # .grad holds g_s: SGD steps with the SAM gradient
        else:
            with torch.no_grad():
                keys = [n for n, p in w.items() if p.grad is not None]
                norm_g = _global_norm([w[n].grad for n in keys])
                norm_gv = _global_norm([g_v[n] for n in keys])
                ratio = norm_g / (norm_gv + eps)
                for n in keys:
                    w[n].grad.add_(g_v[n] * (alpha * ratio))
        opt.step()
        out.append(_snapshot(w))
    return out


def momentum_sam_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    weight_decay: float = 0.0,
) -> Trajectory:
    """Momentum-SAM as MarlonBecker/MSAM ``optimizer/msam.py`` writes it (its own optimizer).

    The model's parameters hold the PERTURBED point between steps:
    ``p~_t = w_t - rho * v_t / (||v_t|| + 1e-12)`` (minus: a step along -v, the direction the
    next SGD update moves), with ``v`` PyTorch's momentum buffer (``v <- momentum v + d_p``,
    no dampening; the update is ``w <- w - lr v``). One gradient per step, taken at p~_t:

      d_p = grad L(p~_t) (+ weight_decay * p~_t: the decay is added to the GRADIENT, in place on
            .grad, with the parameter AT THE PERTURBED POINT, before anything else);
      p += rho * inv_t * v_t          (back to w_t; inv_t = 1 / (||v_t|| + 1e-12), stored)
      v_{t+1} = momentum * v_t + d_p  (buffers start at ZEROS in __init__, so v_1 = d_p, the
                                       same as torch SGD's first step)
      p -= lr * v_{t+1}               (w_{t+1})
      inv_{t+1} = 1 / (||v_{t+1}|| + 1e-12)   (global norm over the params with a gradient)
      p -= rho * inv_{t+1} * v_{t+1}  (p~_{t+1}, where the next gradient is taken)

    First step: ``inverse_norm_buffer`` starts at 0 and v at 0, so the first gradient is taken
    at w_0 itself (no perturbation, no division by 0). The returned snapshot is the TRUE w,
    recovered exactly as ``move_back_from_momentumAscent`` does (``p + rho * inv * v``, on a
    clone; the stored p~ is left untouched, so later steps see the official floating point).
    The official driver only moves back at epoch ends (and moves up again at the next epoch's
    start, a round trip that may change the last bit); this loop never does the round trip.
    With rho=0 this is plain SGD with momentum (and weight_decay on the gradient).
    """
    w = _leaves(params)  # holds p~ (the stored, perturbed point)
    names = list(w)
    buf = {n: torch.zeros_like(w[n]).detach() for n in names}  # __init__: zero buffers
    inverse_norm: Any = 0  # group["inverse_norm_buffer"] = 0
    out: Trajectory = []
    for batch in batches:
        for p in w.values():  # main.py: optimizer.zero_grad() after each step (set_to_none)
            p.grad = None
        loss_fn(w, batch).backward()  # the gradient at p~
        with torch.no_grad():
            with_grad = [n for n in names if w[n].grad is not None]
            # first loop (msam.py ~L65-80)
            for n in with_grad:
                param = w[n]
                d_p = param.grad
                if weight_decay != 0:
                    d_p.add_(param, alpha=weight_decay)
                param.add_(buf[n], alpha=rho * inverse_norm)
                buf[n].mul_(momentum).add_(d_p)
                param.add_(buf[n], alpha=-lr)
            # ascent norm (msam.py ~L82-89)
            ascent_norm = torch.norm(torch.stack([buf[n].norm(p=2) for n in with_grad]), p=2)
            inverse_norm = 1 / (ascent_norm + MSAM_EPS)
            # second loop (msam.py ~L91-96)
            for n in with_grad:
                w[n].sub_(buf[n], alpha=rho * inverse_norm)
            # move_back_from_momentumAscent, on a copy: the true weights w
            true_w = {}
            for n in names:
                true_w[n] = w[n].detach().clone().add_(buf[n], alpha=rho * inverse_norm)
        out.append(true_w)
    return out


def ae_sam_c_schedule(t: int, total_steps: int, lambda1: float, lambda2: float) -> float:
    """AE-SAM's threshold schedule ``c_t = (t/T) lambda1 + (1 - t/T) lambda2``.

    It moves linearly from lambda2 (at t=0) to lambda1 (at t=T); with the paper's
    ``(lambda1, lambda2) = (-1, 1)`` it decreases from 1 to -1, so SAM is used more often late in
    training. ``ae_sam_reference`` takes a constant ``c`` instead.
    """
    frac = t / total_steps
    return frac * lambda1 + (1 - frac) * lambda2


def ae_sam_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    c: float,
    delta: float,
    eps: float = 1e-12,
) -> tuple[Trajectory, list[bool]]:
    """AE-SAM (Jiang et al., ICLR 2023) with a constant threshold coefficient ``c``.

    Per step, with statistics starting at ``mu = AE_SAM_MU_INIT = 0`` and
    ``var = AE_SAM_VAR_INIT = e^-10``:
      g at w; s = ||g||**2 (global norm, squared);
      mu  = delta * mu  + (1 - delta) * s          (updated FIRST)
      var = delta * var + (1 - delta) * (s - mu)**2 (with the updated mu)
      SAM step iff s >= mu + c * sqrt(var)          (updated statistics, ``>=``):
        e = rho g / (||g|| + eps), g_s at w + e, restore w by copy, SGD with g_s;
      otherwise an SGD step with g.
    The statistics are updated on every step (SAM or not), from the gradient at w. One SGD
    optimizer (one momentum buffer) serves both kinds of steps. Returns the trajectory and,
    per step, whether it was a SAM step. c = -1e9 gives SAM on every step, c = +1e9 plain SGD.
    """
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    mu: Any = AE_SAM_MU_INIT
    var: Any = AE_SAM_VAR_INIT
    out: Trajectory = []
    sam_steps: list[bool] = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()
        with torch.no_grad():
            grad_norm = _global_norm([p.grad for p in w.values() if p.grad is not None])
            sq = grad_norm**2
            mu = delta * mu + (1 - delta) * sq
            var = delta * var + (1 - delta) * (sq - mu) ** 2
            use_sam = bool(sq >= mu + c * torch.sqrt(torch.as_tensor(var)))
        sam_steps.append(use_sam)
        if use_sam:
            with torch.no_grad():
                scale = rho / (grad_norm + eps)
                old_p: dict[str, Tensor] = {}
                for k, p in w.items():
                    if p.grad is None:
                        continue
                    old_p[k] = p.detach().clone()
                    p.add_(p.grad * scale)
            opt.zero_grad(set_to_none=True)
            loss_fn(w, batch).backward()
            with torch.no_grad():
                for k, p in w.items():
                    if p.grad is None:
                        continue
                    p.copy_(old_p[k])
        opt.step()
        out.append(_snapshot(w))
    return out, sam_steps


def sam_every_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    every: int,
    eps: float = 1e-12,
) -> Trajectory:
    """SAM once per ``every`` steps, as Composer's ``SAMOptimizer`` (``interval``) does it.

    COMPOSER'S CONVENTION: SAM iff ``(t + 1) % every == 0`` for the 0-based step t, i.e. the
    LAST step of each interval (steps every-1, 2*every-1, ...; with every=10 the first SAM step
    is step 9), NOT ``t % every == 0``. SAM steps: e = g * rho / (||g|| + eps), ``p.add_(e)``,
    gradient at w + e, restore by ``p.sub_(e)`` (Composer's ``second_step``), base step. Other
    steps: ``base_optimizer.step()`` with g on the same base optimizer (one momentum buffer).
    every=1 is SAM on every step (equal to ``sam_reference`` up to the sub_-vs-copy restore).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    global_step = 0
    out: Trajectory = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()  # closure(): gradient at w
        if (global_step + 1) % every == 0:
            with torch.no_grad():  # first_step
                grad_norm = _global_norm([p.grad for p in w.values() if p.grad is not None])
                scale = rho / (grad_norm + eps)
                e_w: dict[str, Tensor] = {}
                for k, p in w.items():
                    if p.grad is None:
                        continue
                    e_w[k] = p.grad * scale
                    p.add_(e_w[k])
            opt.zero_grad(set_to_none=True)
            loss_fn(w, batch).backward()  # closure(): gradient at w + e
            with torch.no_grad():  # second_step
                for k, p in w.items():
                    if p.grad is None or k not in e_w:
                        continue
                    p.sub_(e_w[k])
        opt.step()
        global_step += 1
        out.append(_snapshot(w))
    return out


def late_phase_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    start_step: int,
    eps: float = 1e-12,
) -> Trajectory:
    """SGD for steps t < start_step, SAM for t >= start_step (Zhou et al., ICLR 2025).

    As ``zzp1012/SAM-in-Late-Phase`` ``script/ERM_to_SAM.py`` does it: TWO SGD optimizers over
    the same parameters, ``ERM_optimizer`` for the SGD phase and the SAM optimizer's own base
    SGD for the SAM phase, so the momentum buffer RESTARTS at the switch (the SAM phase's first
    base step sets buf = g_s, as a fresh torch SGD does). SAM as davda54/sam (eps 1e-12 by
    default, restore by copying the saved weights). start_step=0 is plain SAM,
    start_step=len(batches) plain SGD.
    """
    w = _leaves(params)
    erm_opt = _sgd(w, lr, momentum)
    sam_base = _sgd(w, lr, momentum)  # SAM(..., base_optimizer=SGD): its own momentum buffers
    out: Trajectory = []
    for t, batch in enumerate(batches):
        if t < start_step:
            erm_opt.zero_grad(set_to_none=True)
            loss_fn(w, batch).backward()
            erm_opt.step()
        else:
            sam_base.zero_grad(set_to_none=True)
            loss_fn(w, batch).backward()
            with torch.no_grad():  # first_step
                grad_norm = _global_norm([p.grad for p in w.values() if p.grad is not None])
                scale = rho / (grad_norm + eps)
                old_p: dict[str, Tensor] = {}
                for k, p in w.items():
                    if p.grad is None:
                        continue
                    old_p[k] = p.detach().clone()
                    p.add_(p.grad * scale)
            sam_base.zero_grad(set_to_none=True)
            loss_fn(w, batch).backward()
            with torch.no_grad():  # second_step: p.data = old_p
                for k, p in w.items():
                    if p.grad is None:
                        continue
                    p.copy_(old_p[k])
            sam_base.step()
        out.append(_snapshot(w))
    return out


def mesa_reference(
    logits_fn: LogitsFn,
    params: dict[str, Tensor],
    batches: list[tuple[Tensor, Tensor]],
    *,
    lr: float,
    momentum: float,
    decay: float,
    weight: float,
    temperature: float,
    start_step: int,
) -> Trajectory:
    """MESA (Du et al., NeurIPS 2022) as ``AngusDujw/SAF`` ``MESA_train.py`` does it.

    Teacher: an EMA of the weights, initialised to w_0 (``ModelEmaV2`` deep-copies the model
    before training) and updated after EVERY optimizer step from step 0 on, whether or not the
    KL term is active: ``w_ema = decay * w_ema + (1 - decay) * w`` (with the new w). So the
    teacher used at step t is the EMA after t updates. Per step, on batch (x, y):

      ema_logits = logits_fn(w_ema, x)   (no grad; the official teacher is in eval mode)
      logits     = logits_fn(w, x)
      loss = cross_entropy(logits, y)    (mean over the batch)
      if t >= start_step:
          kl = F.kl_div(F.softmax(logits / T).log(), F.softmax(ema_logits / T),
                        reduction="none").sum(-1).mean() * T**2
             = T**2 * mean_i KL(p_teacher,i || p_student,i)    (teacher is the TARGET)
          loss = loss + kl * weight
      SGD step; EMA update.

    The official switch is by epoch, ``kl_start_epoch < epoch < kl_end_epoch`` (strict, so with
    the default 5 the KL starts at 0-based epoch 6); here ``t >= start_step`` and no end.
    The official log-softmax is ``softmax(.).log()`` (kept). weight=0 (or start_step >=
    len(batches)) is plain SGD on the cross-entropy.
    """
    w = _leaves(params)
    teacher = {k: v.detach().clone() for k, v in params.items()}
    opt = _sgd(w, lr, momentum)
    out: Trajectory = []
    for t, (x, y) in enumerate(batches):
        with torch.no_grad():
            ema_output = logits_fn(teacher, x)
        output = logits_fn(w, x)
        loss = F.cross_entropy(output, y)
        if t >= start_step:
            kl_loss = F.kl_div(
                F.softmax(output / temperature, dim=1).log(),
                F.softmax(ema_output / temperature, dim=1),
                reduction="none",
            ).sum(-1).mean() * (temperature**2)
            loss = loss + kl_loss * weight
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # model_ema.update(model)
            for k in teacher:
                teacher[k].copy_(decay * teacher[k] + (1.0 - decay) * w[k])
        out.append(_snapshot(w))
    return out


# ----------------------------------------------------------------------------------------------
# independent forms used only by the self-check
# ----------------------------------------------------------------------------------------------


def _sam_on_steps_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    sam_steps: list[bool],
    eps: float = 1e-12,
) -> Trajectory:
    """SAM (restore by copy) on the steps where ``sam_steps`` is True, SGD elsewhere; one SGD."""
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    out: Trajectory = []
    for use_sam, batch in zip(sam_steps, batches):
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()
        if use_sam:
            with torch.no_grad():
                grad_norm = _global_norm([p.grad for p in w.values() if p.grad is not None])
                old_p = {k: p.detach().clone() for k, p in w.items()}
                for p in w.values():
                    p.add_(p.grad * (rho / (grad_norm + eps)))
            opt.zero_grad(set_to_none=True)
            loss_fn(w, batch).backward()
            with torch.no_grad():
                for k, p in w.items():
                    p.copy_(old_p[k])
        opt.step()
        out.append(_snapshot(w))
    return out


def _momentum_sam_explicit(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    weight_decay: float = 0.0,
) -> Trajectory:
    """MSAM written on the true weights: g at w - rho v/(||v|| + 1e-12) (w itself when v = 0)."""
    w = {k: v.detach().clone() for k, v in params.items()}
    v = {k: torch.zeros_like(t) for k, t in w.items()}
    out: Trajectory = []
    for batch in batches:
        norm_v = _global_norm(list(v.values()))
        scale = 0.0 if float(norm_v) == 0.0 else rho / (norm_v + MSAM_EPS)
        point = {k: (w[k] - scale * v[k]).requires_grad_(True) for k in w}
        grads = torch.autograd.grad(loss_fn(point, batch), list(point.values()))
        with torch.no_grad():
            for (k, g), p in zip(zip(point, grads), point.values()):
                v[k] = momentum * v[k] + g + weight_decay * p.detach()
                w[k] = w[k] - lr * v[k]
        out.append({k: t.clone() for k, t in w.items()})
    return out


def _self_check() -> None:
    """Run the degenerate cases on a tiny float64 MLP and print the max abs differences."""
    params, batches = tiny_problem()
    steps = len(batches)

    def logits_fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def mean_loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(logits_fn(p, x), y)

    hp: dict[str, Any] = {"lr": 0.1, "momentum": 0.9}
    rho = 0.05
    sgd = sgd_reference(mean_loss, params, batches, **hp)
    sam = sam_reference(mean_loss, params, batches, **hp, rho=rho)
    rows: list[tuple[str, float]] = []

    def row(name: str, value: float) -> None:
        rows.append((name, value))
        print(f"{name:<52} {value:.3e}")

    print(f"sam vs sgd (should differ):                          {_max_diff(sam, sgd):.3e}")

    # LookSAM
    look1 = looksam_reference(mean_loss, params, batches, **hp, rho=rho, k=1, alpha=0.7)
    row("looksam(k=1) vs sam", _max_diff(look1, sam))
    mask3 = [t % 3 == 0 for t in range(steps)]
    look_a0 = looksam_reference(mean_loss, params, batches, **hp, rho=rho, k=3, alpha=0.0)
    masked3 = _sam_on_steps_reference(mean_loss, params, batches, **hp, rho=rho, sam_steps=mask3)
    row("looksam(k=3, alpha=0) vs SAM on t%3==0, SGD else", _max_diff(look_a0, masked3))
    look = looksam_reference(mean_loss, params, batches, **hp, rho=rho, k=3, alpha=0.7)
    print(f"looksam(k=3, alpha=0.7) vs that (should differ):     {_max_diff(look, masked3):.3e}")

    # Momentum-SAM
    msam0 = momentum_sam_reference(mean_loss, params, batches, **hp, rho=0.0)
    row("momentum_sam(rho=0) vs sgd", _max_diff(msam0, sgd))
    msam = momentum_sam_reference(mean_loss, params, batches, **hp, rho=0.3)
    explicit = _momentum_sam_explicit(mean_loss, params, batches, **hp, rho=0.3)
    row("momentum_sam(rho=0.3) vs explicit true-w form", _max_diff(msam, explicit))
    msam_wd = momentum_sam_reference(mean_loss, params, batches, **hp, rho=0.3, weight_decay=0.01)
    explicit_wd = _momentum_sam_explicit(
        mean_loss, params, batches, **hp, rho=0.3, weight_decay=0.01
    )
    row("momentum_sam(rho=0.3, wd=0.01) vs explicit form", _max_diff(msam_wd, explicit_wd))
    print(f"momentum_sam(rho=0.3) vs sgd (should differ):        {_max_diff(msam, sgd):.3e}")

    # AE-SAM
    ae_all, mask_all = ae_sam_reference(
        mean_loss, params, batches, **hp, rho=rho, c=-1e9, delta=0.9
    )
    row("ae_sam(c=-1e9) vs sam", _max_diff(ae_all, sam))
    ae_none, mask_none = ae_sam_reference(
        mean_loss, params, batches, **hp, rho=rho, c=1e9, delta=0.9
    )
    row("ae_sam(c=+1e9) vs sgd", _max_diff(ae_none, sgd))
    assert all(mask_all) and not any(mask_none), (mask_all, mask_none)
    ae_mid, mask_mid = ae_sam_reference(mean_loss, params, batches, **hp, rho=rho, c=0.5, delta=0.9)
    masked = _sam_on_steps_reference(mean_loss, params, batches, **hp, rho=rho, sam_steps=mask_mid)
    row("ae_sam(c=0.5) vs SAM/SGD on its own mask", _max_diff(ae_mid, masked))
    print(f"ae_sam(c=0.5) SAM steps: {''.join('S' if s else '.' for s in mask_mid)}")

    # SAM every k (Composer)
    every1 = sam_every_reference(mean_loss, params, batches, **hp, rho=rho, every=1)
    row("sam_every(every=1) vs sam (sub_ vs copy restore)", _max_diff(every1, sam))
    every3 = sam_every_reference(mean_loss, params, batches, **hp, rho=rho, every=3)
    last3 = [(t + 1) % 3 == 0 for t in range(steps)]
    masked_last = _sam_on_steps_reference(
        mean_loss, params, batches, **hp, rho=rho, sam_steps=last3
    )
    row("sam_every(every=3) vs SAM on (t+1)%3==0", _max_diff(every3, masked_last))

    # Late-phase SAM
    late0 = late_phase_reference(mean_loss, params, batches, **hp, rho=rho, start_step=0)
    row("late_phase(start_step=0) vs sam", _max_diff(late0, sam))
    late_end = late_phase_reference(mean_loss, params, batches, **hp, rho=rho, start_step=steps)
    row("late_phase(start_step=len) vs sgd", _max_diff(late_end, sgd))
    s = 5
    late5 = late_phase_reference(mean_loss, params, batches, **hp, rho=rho, start_step=s)
    glued = sgd[:s] + sam_reference(mean_loss, sgd[s - 1], batches[s:], **hp, rho=rho)
    row("late_phase(5) vs sgd[:5] + fresh sam from there", _max_diff(late5, glued))

    # MESA
    mesa_kw: dict[str, Any] = {"decay": 0.9, "temperature": 5.0}
    mesa0 = mesa_reference(logits_fn, params, batches, **hp, **mesa_kw, weight=0.0, start_step=0)
    row("mesa(weight=0) vs sgd", _max_diff(mesa0, sgd))
    mesa_late = mesa_reference(
        logits_fn, params, batches, **hp, **mesa_kw, weight=0.8, start_step=steps
    )
    row("mesa(start_step=len) vs sgd", _max_diff(mesa_late, sgd))
    mesa_d0 = mesa_reference(
        logits_fn, params, batches, **hp, decay=0.0, temperature=5.0, weight=0.8, start_step=0
    )
    row("mesa(decay=0: teacher = w, KL grad = 0) vs sgd", _max_diff(mesa_d0, sgd))
    mesa = mesa_reference(logits_fn, params, batches, **hp, **mesa_kw, weight=0.8, start_step=2)
    print(f"mesa(weight=0.8, start_step=2) vs sgd (should differ): {_max_diff(mesa, sgd):.3e}")

    worst = max(value for _, value in rows)
    print(f"largest difference over the degenerate checks: {worst:.3e}")
    assert worst < 1e-12, rows


if __name__ == "__main__":
    _self_check()
