"""Plain reference loops for Friendly-SAM, VaSSO, ESAM and SAM, written from the official code.

These use torch only (never samfunc), so samfunc's implementations can be tested against
them. Each loop keeps the official structure where it matters: gradient at w, perturb the
parameters in place, gradient at w + e, restore w (the way the official code restores it),
then ``torch.optim.SGD.step()`` (weight_decay=0, nesterov=False).

Official sources read (the stored copies; line numbers are approximate, by the file as stored):

* Friendly-SAM: ``nblt/F-SAM``, ``utils.py`` class ``FriendlySAM`` (commits 08678790 and
  39e42171 agree on the maths; the latter adds ``if p.grad is None: continue`` to the momentum
  loop), ~lines 505-565 of 39e42171; driver ``train.py`` ``train()``
  (``loss.mean().backward(); optimizer.first_step(zero_grad=True); ...; second_step``).
* VaSSO: ``BingcongLi/VaSSO``, ``solver/vasso.py`` (lines 33-88), defaults in
  ``configs/defaulf_cfg.py`` (``--rho 0.05 --theta 0.9``); driver (from the SSAM code it is built
  on, ``Mi-Peng/Sparse-Sharpness-Aware-Minimization`` ``utils/engine.py``): forward,
  ``zero_grad()``, ``backward()``, then ``optimizer.step(closure)``.
* ESAM: ``dydjw9/Efficient_SAM``, ``utils/Esam.py`` (the class ``train.py`` imports), lines 1-130;
  defaults in ``utils/options.py`` (``--rho 0.05 --beta 1.0 --gamma 1.0``), ``run.sh`` uses
  ``--beta 0.6 --gamma 0.5 --rho 0.05``. (``utils/layer_dp_sam.py``, which README shows, is an
  older, broken draft: ``super(SAM, self)`` in class ESAM; not used.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

LossFn = Callable[[dict[str, Tensor], Any], Tensor]
Trajectory = list[dict[str, Tensor]]


def _leaves(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Independent leaf copies of ``params`` that require grad."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def _snapshot(leaves: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached clones of the current parameters."""
    return {k: v.detach().clone() for k, v in leaves.items()}


def _sgd(leaves: dict[str, Tensor], lr: float, momentum: float) -> torch.optim.SGD:
    """The base optimizer used by all official drivers (weight decay left out here)."""
    return torch.optim.SGD(list(leaves.values()), lr=lr, momentum=momentum, weight_decay=0.0)


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)``, as every repo does it."""
    return torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)


def sam_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    eps: float = 1e-12,
) -> Trajectory:
    """Plain SAM: e = rho g / (||g|| + eps), restore w by copying the saved weights.

    ``eps`` defaults to 1e-12 (davda54/sam and nblt/F-SAM ``utils.py`` class ``SAM``); the
    VaSSO repo's ``solver/sam.py`` and ESAM use 1e-7 (pass ``eps=1e-7`` to compare with them).
    """
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    out: Trajectory = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()
        with torch.no_grad():
            grad_norm = _global_norm([p.grad for p in w.values() if p.grad is not None])
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
    return out


def friendly_sam_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    sigma: float,
    lmbda: float,
) -> Trajectory:
    """Friendly-SAM (Li et al., CVPR 2024) as nblt/F-SAM ``utils.py`` class ``FriendlySAM`` does it.

    Step 1:  d = g;  m = g.                       (no subtraction at the first step)
    Step t:  d = g - sigma * m_{t-1};  m_t = lmbda * m_{t-1} + (1 - lmbda) * g   (raw g)
    Then e = rho * d / (||d|| + 1e-12) (adaptive=False), gradient at w + e, restore w, SGD step.

    Official defaults: class ``rho=0.05, sigma=1, lmbda=0.9``; ``train.py`` argparse
    ``--rho 0.1 --sigma 1 --lmbda 0.95``; ``run.sh`` ``rho=0.2 sigma=1 lmbda=0.95``.

    On aliasing: the official code takes ``grad = p.grad.clone()`` BEFORE ``p.grad -= ...``, so
    its momentum already averages the RAW gradient g (no aliasing bug in the official code; the
    literal code and the intended algorithm agree). Forks that write ``grad = p.grad`` (no clone)
    would average d = g - sigma m instead; that is not followed here.
    """
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    momentum_state: dict[str, Tensor] = {}
    out: Trajectory = []
    for batch in batches:
        # train.py: predictions = model(x); loss = criterion(...); loss.mean().backward()
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()
        with torch.no_grad():
            # utils.py FriendlySAM.first_step, first loop:
            #   grad = p.grad.clone()
            #   if "momentum" not in state: state["momentum"] = grad
            #   else: p.grad -= state["momentum"] * sigma                      (uses m_{t-1})
            #         state["momentum"] = state["momentum"] * lmbda + grad * (1 - lmbda)
            for k, p in w.items():
                if p.grad is None:
                    continue
                grad = p.grad.clone()  # the raw gradient g (a copy: no aliasing)
                if k not in momentum_state:
                    momentum_state[k] = grad
                else:
                    p.grad -= momentum_state[k] * sigma
                    momentum_state[k] = momentum_state[k] * lmbda + grad * (1 - lmbda)
            # FriendlySAM.first_step, second loop: scale = rho / (grad_norm + 1e-12), where
            # grad_norm = ||p.grad|| (the direction d, adaptive=False); old_p saved; p += d*scale
            grad_norm = _global_norm([p.grad for p in w.values() if p.grad is not None])
            scale = rho / (grad_norm + 1e-12)
            old_p: dict[str, Tensor] = {}
            for k, p in w.items():
                if p.grad is None:
                    continue
                old_p[k] = p.detach().clone()
                p.add_(p.grad * scale)
        # first_step(zero_grad=True); second forward-backward at w + e
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()
        with torch.no_grad():
            # FriendlySAM.second_step: p.data = state["old_p"]; base_optimizer.step()
            for k, p in w.items():
                if p.grad is None:
                    continue
                p.copy_(old_p[k])
        opt.step()
        out.append(_snapshot(w))
    return out


def vasso_reference(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[Any],
    *,
    lr: float,
    momentum: float,
    rho: float,
    theta: float,
    eps: float = 1e-7,
) -> Trajectory:
    """VaSSO (Li & Giannakis, NeurIPS 2023) as BingcongLi/VaSSO ``solver/vasso.py`` does it.

    Step 1:  d = g.   Step t:  d_t = (1 - theta) d_{t-1} + theta g_t   (EMA updated BEFORE use)
    e = rho * d / (||d|| + 1e-7); gradient at w + e; restore by ``p.sub_(e)``; SGD step.

    Official defaults: ``configs/defaulf_cfg.py`` ``--rho 0.05 --theta 0.9`` (``train.sh``:
    ``--rho 0.2 --theta 0.9``). No ``adaptive`` option. theta=1 gives SAM with eps 1e-7 (the
    repo's own ``solver/sam.py`` also uses 1e-7 and ``p.sub_(e_w)``), not SAM with 1e-12.
    """
    w = _leaves(params)
    opt = _sgd(w, lr, momentum)
    ema: dict[str, Tensor] = {}
    out: Trajectory = []
    for batch in batches:
        # engine.py: output = model(x); loss = criterion(...); optimizer.zero_grad(); backward()
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()
        with torch.no_grad():
            # vasso.py first_step lines ~35-43:
            #   if 'ema' not in state: state['ema'] = p.grad.clone().detach()
            #   else: state['ema'].mul_(1 - theta); state['ema'].add_(p.grad, alpha=theta)
            for k, p in w.items():
                if p.grad is None:
                    continue
                if k not in ema:
                    ema[k] = p.grad.clone().detach()
                else:
                    ema[k].mul_(1 - theta)
                    ema[k].add_(p.grad, alpha=theta)
            # vasso.py lines ~46-53 and _avg_grad_norm: scale = rho / (||ema|| + 1e-7);
            #   e_w = ema * scale; p.add_(e_w); state["e_w"] = e_w
            avg_grad_norm = _global_norm([ema[k] for k, p in w.items() if p.grad is not None])
            scale = rho / (avg_grad_norm + eps)
            e_w: dict[str, Tensor] = {}
            for k, p in w.items():
                if p.grad is None:
                    continue
                e_w[k] = ema[k] * scale
                p.add_(e_w[k])
        # first_step(True) zeroes the grads; closure() = forward + backward at w + e
        opt.zero_grad(set_to_none=True)
        loss_fn(w, batch).backward()
        with torch.no_grad():
            # vasso.py second_step: p.sub_(state["e_w"]); base_optimizer.step()
            for k, p in w.items():
                if p.grad is None:
                    continue
                p.sub_(e_w[k])
        opt.step()
        out.append(_snapshot(w))
    return out


def esam_reference(
    per_sample_loss_fn: LossFn,
    params: dict[str, Tensor],
    batches: list[tuple[Tensor, ...]],
    *,
    lr: float,
    momentum: float,
    rho: float,
    beta: float,
    gamma: float,
    joins: list[list[bool]],
    eps: float = 1e-7,
    strict_cutoff: bool = True,
) -> Trajectory:
    """ESAM (Du et al., ICLR 2022) as dydjw9/Efficient_SAM ``utils/Esam.py`` does it.

    ``joins[step][i]`` says whether leaf i (dict order) joins the perturbation at ``step``.
    Officially this is ``p.requires_grad`` during the first pass: it is drawn at the END of the
    previous step in ``second_step`` as ``if random.random() > beta: p.requires_grad = False``
    (Python's ``random``, one draw per parameter tensor, in order; join with probability beta),
    and every parameter joins at the very first step. Feed ``joins[0]`` all True to match that.

    Per step:
      1. per-sample losses l_before at w; backward of their mean: only joining leaves get g.
      2. e_i = rho * g_i / (||g_J|| + 1e-7) / beta for joining leaves (norm over joining leaves
         only), e_i = 0 for the others; then ALL leaves get requires_grad = True again.
      3. SDS: l_after at w + e (no grad); s = l_after - l_before. If gamma >= 0.99 keep all
         samples, else k = int(n * gamma), cutoff = topk(s, k).values[-1], keep s > cutoff
         (strictly: at most k - 1 samples; k = 0 raises IndexError like the official code).
      4. Second pass: mean per-sample loss over the kept samples at w + e; backward gives every
         leaf (joining or not) its gradient at w + e; restore w by ``p.sub_(e)``; SGD step.
    Non-joining leaves are therefore updated with their second-pass gradient, like the rest.

    ``eps`` (official 1e-7) and ``strict_cutoff`` (official True) can be changed to compare
    with samfunc, which uses 1e-12 and keeps the top ``max(1, int(n * gamma))`` samples.
    """
    w = _leaves(params)
    names = list(w)
    opt = _sgd(w, lr, momentum)
    state: dict[str, dict[str, Any]] = {}
    out: Trajectory = []
    for step, batch in enumerate(batches):
        mask = joins[step]
        if len(mask) != len(names):
            raise ValueError(f"joins[{step}] has {len(mask)} entries, expected {len(names)}")
        if not any(mask):
            # The official code would fail here (backward of a loss that needs no grad).
            raise ValueError(f"joins[{step}]: no leaf joins; the official ESAM cannot run this")
        # Esam.py second_step of the previous step: p.requires_grad = False for leavers.
        for k, j in zip(names, mask):
            w[k].requires_grad_(bool(j))
        opt.zero_grad(set_to_none=True)
        # Esam.py step(): logits = model(inputs); loss = loss_fct(logits, targets) (per sample);
        #   l_before = loss.clone().detach(); loss = loss.mean(); defined_backward(loss)
        per_sample = per_sample_loss_fn(w, batch)
        l_before = per_sample.clone().detach()
        per_sample.mean().backward()
        with torch.no_grad():
            # Esam.py first_step: scale = rho / (grad_norm + 1e-7) / beta, grad_norm over the
            #   params with p.grad (the joining ones); p.requires_grad = True for every p;
            #   e_w = p.grad * scale; p.add_(e_w * 1); state["e_w"] = e_w
            grad_norm = _global_norm([p.grad for p in w.values() if p.grad is not None])
            scale = rho / (grad_norm + eps) / beta
            for k, p in w.items():
                p.requires_grad_(True)
                if p.grad is None:
                    continue
                e_w = p.grad * scale
                p.add_(e_w * 1)
                state.setdefault(k, {})["e_w"] = e_w
        opt.zero_grad(set_to_none=True)  # first_step(True)
        with torch.no_grad():
            # Esam.py: l_after = loss_fct(model(inputs), targets); instance_sharpness = ...
            l_after = per_sample_loss_fn(w, batch)
            instance_sharpness = l_after - l_before
            n = instance_sharpness.shape[0]
            top = max(1, int(n * gamma))
            if not strict_cutoff:  # samfunc: the top k samples
                selected = (
                    tuple(batch)
                    if top >= n
                    else tuple(t[torch.topk(instance_sharpness, top).indices] for t in batch)
                )
            elif gamma >= 0.99:
                selected: tuple[Tensor, ...] = tuple(batch)  # indices = range(len(targets))
            else:
                position = int(n * gamma)
                cutoff = torch.topk(instance_sharpness, position).values[-1]
                keep = instance_sharpness > cutoff  # indices = [instance_sharpness > cutoff]
                selected = tuple(t[keep] for t in batch)
        # Esam.py: loss = loss_fct(model(inputs[indices]), targets[indices]).mean(); backward
        per_sample_loss_fn(w, selected).mean().backward()
        with torch.no_grad():
            # Esam.py second_step: skip p if p.grad is None or not state[p];
            #   p.sub_(state["e_w"]); state["e_w"] = 0; (random draw for next step);
            #   base_optimizer.step()
            for k, p in w.items():
                if p.grad is None or not state.get(k):
                    continue
                p.sub_(state[k]["e_w"])
                state[k]["e_w"] = 0
        opt.step()
        out.append(_snapshot(w))
    return out


def _max_diff(a: Trajectory, b: Trajectory) -> float:
    """Largest absolute difference over all steps and leaves."""
    assert len(a) == len(b)
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)


def tiny_problem(steps: int = 12) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
    """The self-checks' float64 MLP (5-7-3) and ``steps`` batches of 16, seeded."""
    torch.manual_seed(0)
    dtype = torch.float64
    n_in, n_hidden, n_out, n = 5, 7, 3, 16
    params = {
        "w1": torch.randn(n_in, n_hidden, dtype=dtype) * 0.5,
        "b1": torch.zeros(n_hidden, dtype=dtype),
        "w2": torch.randn(n_hidden, n_out, dtype=dtype) * 0.5,
        "b2": torch.zeros(n_out, dtype=dtype),
    }
    batches = [
        (torch.randn(n, n_in, dtype=dtype), torch.randint(0, n_out, (n,))) for _ in range(steps)
    ]
    return params, batches


def _self_check() -> None:
    """Run the degenerate cases against plain SAM on a tiny float64 MLP."""
    params, batches = tiny_problem()
    steps = len(batches)

    def per_sample(p: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        x, y = batch
        logits = torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")

    def mean_loss(p: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        return per_sample(p, batch).mean()

    hp: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "rho": 0.05}
    sam = sam_reference(mean_loss, params, batches, **hp)
    sam_7 = sam_reference(mean_loss, params, batches, **hp, eps=1e-7)
    all_join = [[True] * len(params) for _ in range(steps)]

    fsam0 = friendly_sam_reference(mean_loss, params, batches, **hp, sigma=0.0, lmbda=0.9)
    print(f"friendly_sam(sigma=0) vs sam(eps=1e-12):       {_max_diff(fsam0, sam):.3e}")
    fsam1 = friendly_sam_reference(mean_loss, params, batches, **hp, sigma=1.0, lmbda=0.95)
    print(f"friendly_sam(sigma=1) vs sam, step 1 only:     {_max_diff(fsam1[:1], sam[:1]):.3e}")
    print(f"friendly_sam(sigma=1) vs sam, all steps:       {_max_diff(fsam1, sam):.3e}")

    vasso1 = vasso_reference(mean_loss, params, batches, **hp, theta=1.0)
    print(f"vasso(theta=1) vs sam(eps=1e-12):              {_max_diff(vasso1, sam):.3e}")
    print(f"vasso(theta=1) vs sam(eps=1e-7):               {_max_diff(vasso1, sam_7):.3e}")

    esam1 = esam_reference(per_sample, params, batches, **hp, beta=1.0, gamma=1.0, joins=all_join)
    print(f"esam(beta=1, gamma=1) vs sam(eps=1e-12):       {_max_diff(esam1, sam):.3e}")
    print(f"esam(beta=1, gamma=1) vs sam(eps=1e-7):        {_max_diff(esam1, sam_7):.3e}")
    esam_b = esam_reference(per_sample, params, batches, **hp, beta=0.5, gamma=1.0, joins=all_join)
    sam_2rho = sam_reference(mean_loss, params, batches, lr=0.1, momentum=0.9, rho=0.1, eps=1e-7)
    print(f"esam(beta=0.5, all join) vs sam(2 rho, 1e-7):  {_max_diff(esam_b, sam_2rho):.3e}")
    esam_g = esam_reference(per_sample, params, batches, **hp, beta=1.0, gamma=0.5, joins=all_join)
    print(f"esam(gamma=0.5) vs sam(eps=1e-7) (should differ): {_max_diff(esam_g, sam_7):.3e}")


if __name__ == "__main__":
    _self_check()
