"""``samfunc.SAM``'s ``param_groups`` as what a method sees: one tree, its names, its options.

The class hands the interpreter a flat dict of its trainable parameters in
group order, keyed by their names (given ``model.named_parameters()``, torch
keeps them in ``param_names``) or by their positions. Without ``method=``, the
groups' own ``rho``, ``adaptive`` and ``eta`` make SAM's ascent (the seed's
per-group options); with it, the method's pieces are checked here once.

Examples:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    >>> for group in opt.param_groups:
    ...     group.update(SAM_DEFAULTS)
    >>> leaves_of(opt.param_groups).keys
    ['weight', 'bias']
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from . import _tree
from ._ascent import normalize, sam_ascent, scale_by_param_abs, scale_by_radius
from ._base import GradientTransformation, Pieces
from ._combine import chain, masked
from ._phases import pieces_of
from ._validate import check_bool, check_nonnegative

__all__ = [
    "SAM_OPTIONS",
    "SAM_DEFAULTS",
    "Leaves",
    "leaves_of",
    "check_group",
    "check_method",
    "groups_ascent",
]

#: The per-group options SAM adds to the base optimizer's.
SAM_OPTIONS = ("rho", "adaptive", "eta")
SAM_DEFAULTS = {"rho": 0.05, "adaptive": False, "eta": 0.0}

#: One parameter's group options: ``(rho, adaptive, eta)``.
Options = tuple[float, bool, float]


class Leaves(NamedTuple):
    """What the method sees: the trainable parameters, their names and their groups' options."""

    keys: list[str]
    params: list[torch.Tensor]
    options: list[Options]

    def tree(self, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``values`` keyed like the parameters."""
        return dict(zip(self.keys, values))


def leaves_of(groups: list[dict[str, Any]]) -> Leaves:
    """The trainable parameters of ``groups`` in order, keyed by name or by position."""
    keys: list[str] = []
    params: list[torch.Tensor] = []
    options: list[Options] = []
    for g, group in enumerate(groups):
        names = group.get("param_names")
        option = (float(group["rho"]), bool(group["adaptive"]), float(group["eta"]))
        for i, p in enumerate(group["params"]):
            if p.requires_grad:
                keys.append(
                    names[i] if names else _tree.Position(f"param_groups[{g}]['params'][{i}]")
                )
                params.append(p)
                options.append(option)
    return Leaves(keys, params, options)


def check_group(index: int, group: dict[str, Any]) -> None:
    """A group's SAM options: ``rho`` and ``eta`` >= 0, ``adaptive`` a bool."""
    where = f"param_groups[{index}]"
    check_nonnegative(f"{where}['rho']", group["rho"])
    check_nonnegative(f"{where}['eta']", group["eta"])
    check_bool(f"{where}['adaptive']", group["adaptive"])


def check_method(method: Any, rho: float, adaptive: bool, eta: float) -> Optional[Pieces]:
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


def groups_ascent(keys: list[str], options: list[Options]) -> GradientTransformation:
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
