"""Independent reference loops for GSAM, WSAM, SAM-ON and plain SAM, written from official code.

Nothing here imports samfunc: these are plain ``torch`` loops that mirror the authors' code
(perturb the parameters in place, backward at ``w + e``, restore ``w``, rewrite ``.grad``,
then ``base_optimizer.step()``) so that samfunc's implementations can be tested against them.

Every public loop has the same calling convention:

* ``loss_fn(params, batch) -> 0-d tensor``, differentiable in ``params`` (a ``dict[str, Tensor]``);
* ``params``: the initial parameters (cloned, never mutated);
* ``batches``: one batch per step;
* ``lr`` / ``momentum``: the ``torch.optim.SGD`` base optimizer (``weight_decay=0``);
* the method's hyperparameters as keyword arguments;

and returns a list with a detached clone of the parameters after each step.

Sources read (GitHub; line numbers refer to the stored versions named here):

* GSAM, PyTorch: ``juntang-zhuang/GSAM`` ``gsam/gsam.py`` @ 338ef83b (``update_rho_t`` L20-23,
  ``perturb_weights`` L25-38, ``unperturb`` L40-44, ``gradient_decompose`` L46-72, ``step`` at the
  end of the file) and ``gsam/scheduler.py`` (``ProportionScheduler.step``); usage in ``README.md``.
  Later upstream versions only add ``maybe_no_sync`` / ``_sync_grad`` (DDP); the math is unchanged.
* GSAM, JAX (the authors' original): ``google-research/big_vision``
  ``big_vision/trainers/proj/gsam/gsam.py`` (``dual_vector`` L19-27, rho schedule L72-75,
  perturbation L77-83, decomposition L90-117), ``.../proj/gsam/train.py`` and
  ``big_vision/configs/proj/gsam/vit_i1k_gsam_no_aug.py`` (rho_max=0.6, rho_min=0.1, alpha=0.6).
* WSAM: ``intelligent-machine-learning/dlrover`` ``atorch/atorch/optimizers/wsam.py`` @ 19e5d790
  (defaults L26-47, ``first_step`` L49-71, ``second_step`` L73-106), ``README_WSAM.md``.
* SAM-ON: ``mueller-mp/SAM-ON`` ``sam_on.py`` / ``sam_bn.py`` (``SAM_BN.ascent_step``,
  ``ASAM_BN.descent_step``), ``README.md``.
* SAM: ``davda54/sam`` ``sam.py`` (the seed's reference, see ``tests/seed_reference.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Params = dict[str, Tensor]
LossFn = Callable[[Params, Any], Tensor]

#: ``perturb_eps`` default of ``GSAM.__init__`` (juntang-zhuang/GSAM gsam/gsam.py L6) and the
#: ``eps`` default of ``gsam_gradient`` (big_vision gsam.py L30).
GSAM_EPS = 1e-12
#: ``sam_eps`` default of ``WeightedSAM.__init__`` (dlrover wsam.py L32).
WSAM_EPS = 1e-12
#: the constant added to the gradient norm in SAM-ON (``+ 1.e-16``, SAM-ON sam_on.py / sam_bn.py).
SAM_ON_EPS = 1e-16
#: davda54/sam ``first_step``: ``scale = rho / (grad_norm + 1e-12)``.
SAM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# shared plumbing
# ----------------------------------------------------------------------------------------------


def _leaves(params: Params) -> Params:
    """Fresh float leaves with ``requires_grad`` (the caller's tensors are never touched)."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def _snapshot(w: Params) -> Params:
    """Detached clone of the current parameters."""
    return {k: v.detach().clone() for k, v in w.items()}


def _sgd(w: Params, lr: float, momentum: float) -> torch.optim.SGD:
    """The base optimizer every reference loop uses."""
    return torch.optim.SGD(list(w.values()), lr=lr, momentum=momentum, weight_decay=0.0)


def _forward_backward(loss_fn: LossFn, w: Params, batch: Any) -> Tensor:
    """``zero_grad`` then one forward-backward pass (the official ``get_grad`` / closure)."""
    for p in w.values():
        p.grad = None
    with torch.enable_grad():
        loss = loss_fn(w, batch)
    loss.backward()
    return loss.detach()


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)``, as in all three repos."""
    return torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)


# ----------------------------------------------------------------------------------------------
# SAM (Foret et al.), davda54/sam
# ----------------------------------------------------------------------------------------------


def sam_reference(
    loss_fn: LossFn,
    params: Params,
    batches: Sequence[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
) -> list[Params]:
    """Plain SAM: ``e = rho * g / (||g|| + 1e-12)``, step with ``g(w + e)`` at ``w``."""
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    history: list[Params] = []
    for batch in batches:
        _forward_backward(loss_fn, w, batch)
        with torch.no_grad():
            live = [p for p in w.values() if p.grad is not None]
            grad_norm = _global_norm([p.grad for p in live if p.grad is not None])
            # davda54/sam first_step: scale = rho / (grad_norm + 1e-12); e_w = p.grad * scale
            scale = rho / (grad_norm + SAM_EPS)
            old_p = [p.detach().clone() for p in live]
            for p in live:
                assert p.grad is not None
                p.add_(p.grad * scale.to(p))
        _forward_backward(loss_fn, w, batch)
        with torch.no_grad():
            # davda54/sam second_step: p.data = self.state[p]["old_p"] (a saved copy, not w+e-e)
            for p, old in zip(live, old_p):
                p.copy_(old)
        opt.step()
        history.append(_snapshot(w))
    return history


# ----------------------------------------------------------------------------------------------
# GSAM (Zhuang et al., ICLR 2022)
# ----------------------------------------------------------------------------------------------


def gsam_rho_from_lr(
    lr_t: float, *, lr_max: float, lr_min: float, rho_max: float, rho_min: float
) -> float:
    """Rho tied to the learning rate, as ``ProportionScheduler.step`` / ``gsam_gradient`` do.

    ``rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)`` when
    ``lr_max > lr_min``, else ``rho_max`` (GSAM gsam/scheduler.py ``ProportionScheduler.step``;
    big_vision gsam.py L72-75 uses ``lr_max == lr_min`` as the test). No clamping: an ``lr_t``
    below ``lr_min`` (e.g. during warmup in big_vision) gives ``rho_t < rho_min``.

    Which ``lr_t``: in the PyTorch repo ``update_rho_t()`` is called once in ``GSAM.__init__`` and
    then after each ``lr_scheduler.step()`` (README step 7), so step ``t`` uses the lr that the
    base optimizer applies at step ``t`` (with ``ProportionScheduler``). big_vision passes
    ``sched_fns[0](step) * lr`` with a 1-based ``step`` while optax's update uses count
    ``step - 1``, i.e. rho there follows the *next* step's lr (an off-by-one that only matters
    with a schedule).
    """
    if lr_max > lr_min:
        return rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)
    return rho_max


def gsam_reference(
    loss_fn: LossFn,
    params: Params,
    batches: Sequence[Any],
    *,
    lr: float,
    momentum: float,
    rho_at: Callable[[int], float],
    alpha: float,
    adaptive: bool = False,
    perturb_eps: float = GSAM_EPS,
    lr_at: Callable[[int], float] | None = None,
) -> list[Params]:
    """GSAM as juntang-zhuang/GSAM ``GSAM.step`` does it; ``rho_at(t)`` is rho at step ``t``.

    ``lr_at(t)``: the base optimizer's learning rate at step ``t`` (what the README's
    ``lr_scheduler.step()`` sets), ``lr`` throughout when None.

    ``e = rho_t * g / (||g|| + eps)`` (adaptive: ``* w**2`` with ``||(|w| * g)||``), then
    ``grad = g_s - alpha * (g - cos * ||g|| * g_s / (||g_s|| + eps))`` with
    ``cos = <g, g_s> / (||g_s|| * ||g|| + eps)``, i.e. ``g_s - alpha * g_perp`` where ``g_perp`` is
    the component of the *clean* gradient ``g`` orthogonal to the *perturbed* gradient ``g_s``.
    """
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    history: list[Params] = []
    for t, batch in enumerate(batches):
        rho = rho_at(t)
        if lr_at is not None:
            opt.param_groups[0]["lr"] = lr_at(t)
        # step(): outputs, loss_value = get_grad()
        _forward_backward(loss_fn, w, batch)
        with torch.no_grad():
            live = [p for p in w.values() if p.grad is not None]
            grads = [p.grad for p in live if p.grad is not None]
            # perturb_weights (gsam.py L25-38):
            #   grad_norm = _grad_norm(weight_adaptive=adaptive)  # ||(|w| if adaptive else 1) * g||
            #   scale = rho / (grad_norm + perturb_eps)
            #   old_g = g.clone(); e_w = g * scale; if adaptive: e_w *= w**2; p.add_(e_w)
            grad_norm = _global_norm(
                [(p.abs() if adaptive else 1.0) * g for p, g in zip(live, grads)]
            )
            scale = rho / (grad_norm + perturb_eps)
            old_g = [g.clone() for g in grads]
            e_ws: list[Tensor] = []
            for p, g in zip(live, grads):
                e_w = g * scale.to(p)
                if adaptive:
                    e_w *= torch.pow(p, 2)
                p.add_(e_w)
                e_ws.append(e_w)
        # step(): get_grad() at the perturbed weights
        _forward_backward(loss_fn, w, batch)
        with torch.no_grad():
            new_g = [p.grad for p in live]
            # gradient_decompose (gsam.py L46-72):
            #   inner_prod = sum(<old_g, g_s>)
            #   new_grad_norm = ||g_s||, old_grad_norm = ||old_g||  (never weight-adaptive)
            #   cosine = inner_prod / (new_grad_norm * old_grad_norm + perturb_eps)
            #   vertical = old_g - cosine * old_grad_norm * g_s / (new_grad_norm + perturb_eps)
            #   p.grad.add_(vertical, alpha=-alpha)
            inner_prod = torch.zeros((), dtype=grad_norm.dtype, device=grad_norm.device)
            for og, ng in zip(old_g, new_g):
                assert ng is not None
                inner_prod = inner_prod + torch.sum(og * ng)
            new_grad_norm = _global_norm([ng for ng in new_g if ng is not None])
            old_grad_norm = _global_norm(old_g)
            cosine = inner_prod / (new_grad_norm * old_grad_norm + perturb_eps)
            for og, ng in zip(old_g, new_g):
                assert ng is not None
                vertical = og - cosine * old_grad_norm * ng / (new_grad_norm + perturb_eps)
                ng.add_(vertical, alpha=-alpha)
            # unperturb (gsam.py L40-44): p.data.sub_(e_w)  -- subtracts, does not restore a copy
            for p, e_w in zip(live, e_ws):
                p.sub_(e_w)
        # self.base_optimizer.step() with the decomposed gradient (weight decay, if any, is the
        # base optimizer's and is applied here, after the decomposition)
        opt.step()
        history.append(_snapshot(w))
    return history


def gsam_big_vision_reference(
    loss_fn: LossFn,
    params: Params,
    batches: Sequence[Any],
    *,
    lr: float,
    momentum: float,
    rho_at: Callable[[int], float],
    alpha: float,
    eps: float = GSAM_EPS,
    adaptive_perturbation: bool = False,
    minimize_fp: bool = True,
) -> list[Params]:
    """GSAM as big_vision's JAX ``gsam_gradient`` computes it, fed to the same SGD.

    ``e = rho_t * g / (||g|| + eps)`` (adaptive: ``|w| * rho_t * g / (||g|| + eps)``, note: *not*
    the PyTorch repo's ``w**2`` / ``||(|w| g)||``). ``minimize_fp=True`` (default, "original GSAM"):
    ``g_gsam = g_s - alpha * (g - <g, u> u)`` with ``u = g_s / ||g_s||`` (no eps at all there).
    ``minimize_fp=False``: ``g_gsam = g + alpha * (g_s - <g_s, v> v)`` with ``v = g / ||g||``.
    """
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    names = list(w)
    history: list[Params] = []
    for t, batch in enumerate(batches):
        sam_rho = rho_at(t)
        with torch.enable_grad():
            # l_clean, g_clean = jax.value_and_grad(loss_fn)(params, ...)
            g_clean = torch.autograd.grad(loss_fn(w, batch), [w[k] for k in names])
            with torch.no_grad():
                g_clean_length = _global_norm(g_clean)  # dual_vector: sqrt(sum(square)), no eps
                # L77-83: param_sam = a + [|a| *] sam_rho * b / (g_clean_length + eps)
                w_sam = {
                    k: w[k].detach()
                    + (w[k].detach().abs() if adaptive_perturbation else 1.0)
                    * sam_rho
                    * g
                    / (g_clean_length + eps)
                    for k, g in zip(names, g_clean)
                }
            for v in w_sam.values():
                v.requires_grad_(True)
            g_robust = torch.autograd.grad(loss_fn(w_sam, batch), [w_sam[k] for k in names])
        with torch.no_grad():
            if minimize_fp:
                # L90-104: decompose g_clean onto parallel and vertical to g_robust
                g_robust_length = _global_norm(g_robust)
                u = [g / g_robust_length for g in g_robust]
                proj = sum((torch.sum(a * b) for a, b in zip(u, g_clean)), 0.0 * g_robust_length)
                residual = [a - proj * b for a, b in zip(g_clean, u)]
                g_gsam = [a - b * alpha for a, b in zip(g_robust, residual)]
            else:
                # L106-117: decompose g_robust onto parallel and vertical to g_clean
                v_ = [g / g_clean_length for g in g_clean]
                proj = sum((torch.sum(a * b) for a, b in zip(v_, g_robust)), 0.0 * g_clean_length)
                residual = [a - proj * b for a, b in zip(g_robust, v_)]
                g_gsam = [a + b * alpha for a, b in zip(g_clean, residual)]
            for k, g in zip(names, g_gsam):
                w[k].grad = g.clone()
        opt.step()
        history.append(_snapshot(w))
    return history


# ----------------------------------------------------------------------------------------------
# WSAM (Yue et al., KDD 2023), dlrover atorch/atorch/optimizers/wsam.py
# ----------------------------------------------------------------------------------------------


def _wsam_loop(
    loss_fn: LossFn,
    params: Params,
    batches: Sequence[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    gamma: float,
    decouple: bool,
    adaptive: bool,
    sam_eps: float,
    max_norm: float | None,
) -> list[Params]:
    """``WeightedSAM.step`` (first_step + second_step), either form."""
    # __init__ (wsam.py L44): alpha = gamma / (1 - gamma)
    alpha = gamma / (1 - gamma)
    w = _leaves(params)
    ps = list(w.values())
    opt = _sgd(w, lr, momentum)
    history: list[Params] = []
    for batch in batches:
        _forward_backward(loss_fn, w, batch)
        with torch.no_grad():
            live = [p for p in ps if p.grad is not None]
            # first_step (wsam.py L49-71):
            #   scale = rho / (||(|w| if adaptive else 1) * g|| + sam_eps)
            #   e_w = (w**2 if adaptive else 1.0) * g * scale; p.add_(e_w)
            grad_norm = _global_norm(
                [(p.abs() if adaptive else 1.0) * p.grad for p in live if p.grad is not None]
            )
            scale = rho / (grad_norm + sam_eps)
            e_ws: list[Tensor] = []
            for p in live:
                assert p.grad is not None
                e_w = (torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale.to(p)
                p.add_(e_w, alpha=1.0)
                e_ws.append(e_w)
            # (all_reduce of g here under DDP), then clipping of g *after* e was computed (L63-64)
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(ps, max_norm)
            saved_g = [p.grad.detach().clone() for p in live if p.grad is not None]
        _forward_backward(loss_fn, w, batch)
        with torch.no_grad():
            # second_step (wsam.py L73-106): p.add_(e_w, alpha=-1.0)  -- subtracts e_w
            for p, e_w in zip(live, e_ws):
                p.add_(e_w, alpha=-1.0)
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(ps, max_norm)  # clips g_s on its own (L83-84)
            sharpness: list[Tensor] = []
            for p, g in zip(live, saved_g):
                assert p.grad is not None
                if not decouple:
                    # L90-91: p.grad = alpha * g_s + (1 - alpha) * g  == g + alpha * (g_s - g)
                    p.grad.mul_(alpha).add_(g, alpha=1.0 - alpha)
                else:
                    # L92-94: sharpness = g_s - g; p.grad = g
                    sharpness.append(p.grad.detach().clone() - g)
                    p.grad.mul_(0.0).add_(g, alpha=1.0)
        opt.step()
        if decouple:
            with torch.no_grad():
                # L98-103: p.add_(sharpness, alpha=-group["lr"] * group["alpha"]) after the step;
                # plain SGD on the sharpness term: no momentum, no weight decay
                for p, s in zip(live, sharpness):
                    p.add_(s, alpha=-opt.param_groups[0]["lr"] * alpha)
        history.append(_snapshot(w))
    return history


def wsam_reference(
    loss_fn: LossFn,
    params: Params,
    batches: Sequence[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    gamma: float,
    adaptive: bool = False,
    sam_eps: float = WSAM_EPS,
    max_norm: float | None = None,
) -> list[Params]:
    """WSAM, coupled form (``decouple=False``; the official default is ``decouple=True``).

    The base optimizer gets ``g + gamma / (1 - gamma) * (g_s - g)``; ``gamma=0.5`` is SAM.
    """
    return _wsam_loop(
        loss_fn,
        params,
        batches,
        lr=lr,
        momentum=momentum,
        rho=rho,
        gamma=gamma,
        decouple=False,
        adaptive=adaptive,
        sam_eps=sam_eps,
        max_norm=max_norm,
    )


def wsam_decoupled_reference(
    loss_fn: LossFn,
    params: Params,
    batches: Sequence[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    gamma: float,
    adaptive: bool = False,
    sam_eps: float = WSAM_EPS,
    max_norm: float | None = None,
) -> list[Params]:
    """WSAM, decoupled form (``decouple=True``, the official default and the paper's choice).

    ``base_optimizer.step()`` with the clean gradient ``g``, then
    ``w -= lr * gamma / (1 - gamma) * (g_s - g)``.
    """
    return _wsam_loop(
        loss_fn,
        params,
        batches,
        lr=lr,
        momentum=momentum,
        rho=rho,
        gamma=gamma,
        decouple=True,
        adaptive=adaptive,
        sam_eps=sam_eps,
        max_norm=max_norm,
    )


# ----------------------------------------------------------------------------------------------
# SAM-ON (Mueller et al., NeurIPS 2023), mueller-mp/SAM-ON sam_on.py SAM_BN(only_bn=True)
# ----------------------------------------------------------------------------------------------


def sam_on_name_selected(name: str) -> bool:
    """SAM-ON's selection: a parameter is perturbed iff ``'norm' in name or 'bn' in name``."""
    return "norm" in name or "bn" in name


def sam_on_reference(
    loss_fn: LossFn,
    params: Params,
    batches: Sequence[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    selected: Callable[[str], bool] = sam_on_name_selected,
) -> list[Params]:
    """SAM-ON (non-adaptive ``SAM_BN`` with ``only_bn``): perturb only the selected parameters.

    ``e = rho * g_N / (||g_N|| + 1e-16)`` on the selected set ``N`` only (norm over ``N`` only);
    every parameter then steps with its gradient at the perturbed point.
    """
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    history: list[Params] = []
    for batch in batches:
        _forward_backward(loss_fn, w, batch)
        with torch.no_grad():
            chosen = [p for n, p in w.items() if p.grad is not None and selected(n)]
            # SAM_BN.ascent_step: grad_norm = norm(stack(norms)) + 1.e-16; eps = g * rho/grad_norm
            grad_norm = _global_norm([p.grad for p in chosen if p.grad is not None]) + SAM_ON_EPS
            old_p = [p.detach().clone() for p in chosen]
            for p in chosen:
                assert p.grad is not None
                p.add_(p.grad * (rho / grad_norm))
        _forward_backward(loss_fn, w, batch)
        with torch.no_grad():
            # ASAM_BN.descent_step: p.data = self.state[p]['old_p'] for perturbed p only
            for p, old in zip(chosen, old_p):
                p.copy_(old)
        opt.step()
        history.append(_snapshot(w))
    return history


# ----------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------


def _demo_problem(
    steps: int = 12, seed: int = 0
) -> tuple[LossFn, Params, list[tuple[Tensor, Tensor]]]:
    """A 2-layer tanh MLP with a LayerNorm-style affine, on random float64 regression data."""
    gen = torch.Generator().manual_seed(seed)
    d_in, d_h, d_out, n = 5, 8, 3, 16

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    params: Params = {
        "fc1.weight": randn(d_in, d_h) / d_in**0.5,
        "fc1.bias": 0.1 * randn(d_h),
        "norm.weight": 1.0 + 0.1 * randn(d_h),
        "norm.bias": 0.1 * randn(d_h),
        "fc2.weight": randn(d_h, d_out) / d_h**0.5,
        "fc2.bias": 0.1 * randn(d_out),
    }
    batches = [(randn(n, d_in), randn(n, d_out)) for _ in range(steps)]

    def loss_fn(p: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        h = torch.tanh(x @ p["fc1.weight"] + p["fc1.bias"])
        h = torch.nn.functional.layer_norm(h, (d_h,)) * p["norm.weight"] + p["norm.bias"]
        return ((h @ p["fc2.weight"] + p["fc2.bias"] - y) ** 2).mean()

    return loss_fn, params, batches


def _max_diff(a: list[Params], b: list[Params]) -> float:
    """Largest absolute difference over all steps and parameters."""
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)


def _main() -> None:
    """Run every reference on the demo problem and print the consistency checks."""
    loss_fn, params, batches = _demo_problem()
    frozen = {k: v.clone() for k, v in params.items()}
    lr, momentum, rho = 0.1, 0.9, 0.05
    kw: dict[str, Any] = dict(lr=lr, momentum=momentum)

    sam = sam_reference(loss_fn, params, batches, rho=rho, **kw)
    checks: list[tuple[str, float, float]] = []  # (what, max abs diff, tolerance)

    gsam0 = gsam_reference(loss_fn, params, batches, rho_at=lambda t: rho, alpha=0.0, **kw)
    checks.append(("gsam(alpha=0) vs sam", _max_diff(gsam0, sam), 1e-12))
    wsam_half = wsam_reference(loss_fn, params, batches, rho=rho, gamma=0.5, **kw)
    checks.append(("wsam coupled(gamma=0.5) vs sam", _max_diff(wsam_half, sam), 1e-12))

    kw0: dict[str, Any] = dict(lr=lr, momentum=0.0)
    sam_nomom = sam_reference(loss_fn, params, batches, rho=rho, **kw0)
    wsam_dec = wsam_decoupled_reference(loss_fn, params, batches, rho=rho, gamma=0.5, **kw0)
    checks.append(
        ("wsam decoupled(gamma=0.5, momentum=0) vs sam", _max_diff(wsam_dec, sam_nomom), 1e-12)
    )

    gsam_pt = gsam_reference(loss_fn, params, batches, rho_at=lambda t: rho, alpha=0.3, **kw)
    gsam_bv = gsam_big_vision_reference(
        loss_fn, params, batches, rho_at=lambda t: rho, alpha=0.3, **kw
    )
    # differ only through the eps placements (PyTorch repo) vs none (big_vision decomposition)
    checks.append(("gsam(alpha=0.3) pytorch vs big_vision", _max_diff(gsam_pt, gsam_bv), 1e-10))
    gsam_bv0 = gsam_big_vision_reference(
        loss_fn, params, batches, rho_at=lambda t: rho, alpha=0.0, **kw
    )
    checks.append(("gsam big_vision(alpha=0) vs sam", _max_diff(gsam_bv0, sam), 1e-12))

    samon_all = sam_on_reference(loss_fn, params, batches, rho=rho, selected=lambda n: True, **kw)
    checks.append(("sam_on(select all) vs sam", _max_diff(samon_all, sam), 1e-12))

    for what, diff, tol in checks:
        status = "ok" if diff <= tol else "FAIL"
        print(f"{what:48s} max|diff| = {diff:.3e}  [{status}]")

    # the variants must actually differ from SAM when their knob is on
    spread = {
        "gsam(alpha=0.3)": _max_diff(gsam_pt, sam),
        "wsam coupled(gamma=0.9)": _max_diff(
            wsam_reference(loss_fn, params, batches, rho=rho, gamma=0.9, **kw), sam
        ),
        "wsam decoupled(gamma=0.9)": _max_diff(
            wsam_decoupled_reference(loss_fn, params, batches, rho=rho, gamma=0.9, **kw), sam
        ),
        "sam_on(norm.* only)": _max_diff(
            sam_on_reference(loss_fn, params, batches, rho=rho, **kw), sam
        ),
    }
    for what, diff in spread.items():
        print(f"{what + ' vs sam (must differ)':48s} max|diff| = {diff:.3e}")

    sched = [
        gsam_rho_from_lr(x, lr_max=0.1, lr_min=0.001, rho_max=0.6, rho_min=0.1)
        for x in (0.1, 0.0505, 0.001)
    ]
    print(f"gsam_rho_from_lr at lr = 0.1, 0.0505, 0.001: {sched}")

    unchanged = all(torch.equal(params[k], frozen[k]) for k in params)
    print(f"inputs left unchanged: {unchanged}")
    failed = [what for what, diff, tol in checks if diff > tol]
    failed += [what for what, diff in spread.items() if diff < 1e-6]
    if failed or not unchanged:
        raise SystemExit(f"self-check FAILED: {failed}")
    print("self-check passed")


if __name__ == "__main__":
    _main()
