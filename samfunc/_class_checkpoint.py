"""``samfunc.SAM``'s checkpoints: its ``state_dict``, the seed's and a base optimizer's, pickling.

A ``state_dict`` holds the groups (with ``rho``, ``adaptive``, ``eta``), the
base optimizer's whole state and the method's state with the method's name,
so a resumed run is bitwise an uninterrupted one. Three kinds load:

* this class's ``state_dict``;
* the seed's SAM (no ``eta``, per-parameter ``old_p`` copies, no base
  state): its groups load, ``eta`` takes this optimizer's default, and the
  base optimizer starts fresh (a warning says so: the seed never saved its
  momentum);
* a plain base-optimizer ``state_dict`` (e.g. ``torch.optim.SGD``'s, to go on
  from SGD with SAM): it loads into ``base_optimizer``, and each group keeps
  its current ``rho``, ``adaptive`` and ``eta``.

Examples:
    >>> import torch
    >>> import samfunc
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = samfunc.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    >>> sorted(state_dict_of(opt))
    ['base_optimizer', 'param_groups', 'state']
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from . import _tree
from ._groups import SAM_OPTIONS, check_group, leaves_of
from ._phases import init_state, pieces_of

if TYPE_CHECKING:
    from ._stateful import SAM

__all__ = ["state_dict_of", "load_state_dict_into", "pickled_state", "unpickle_into"]


def state_dict_of(opt: SAM) -> dict[str, Any]:
    """The optimizer's groups plus the base optimizer's whole state (and the method's)."""
    state = torch.optim.Optimizer.state_dict(opt)
    state["base_optimizer"] = opt.base_optimizer.state_dict()
    if opt._method_pieces is not None:
        state["method_state"] = opt.method_state
        state["method"] = opt._method_pieces.name
    return state


def load_state_dict_into(opt: SAM, state_dict: dict[str, Any]) -> None:
    """Loads any of the three kinds of checkpoint (see the module's docstring)."""
    state_dict = dict(state_dict)
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or "state" not in state_dict:
        raise ValueError(
            "state_dict must be an optimizer state_dict with 'state' and 'param_groups', "
            f"got keys {sorted(state_dict)}"
        )
    base_state = state_dict.pop("base_optimizer", None)
    saved_method = state_dict.pop("method", None)
    _load_method_state(opt, state_dict.pop("method_state", None), saved_method)
    current = [{key: group[key] for key in SAM_OPTIONS} for group in opt.param_groups]
    if base_state is None and not all(SAM_OPTIONS[0] in group for group in groups):
        opt.base_optimizer.load_state_dict(state_dict)  # a plain base optimizer's
        opt.param_groups = opt.base_optimizer.param_groups
        _fill_options(opt, current)
        return
    state_dict["state"] = {}  # SAM keeps nothing per parameter (the seed's old_p is w)
    torch.optim.Optimizer.load_state_dict(opt, state_dict)
    _fill_options(opt, current)
    if base_state is None:
        warnings.warn(
            "the state_dict has no base optimizer state (a checkpoint of the seed's SAM, "
            "which does not save it): the base optimizer's state, such as momentum, "
            "starts fresh",
            UserWarning,
            stacklevel=3,
        )
        opt.base_optimizer.state.clear()
    else:
        opt.base_optimizer.load_state_dict(base_state)
    opt.base_optimizer.param_groups = opt.param_groups


def _load_method_state(opt: SAM, method_state: Any, saved_method: Any) -> None:
    """The method's state, if it fits this optimizer's method and parameters."""
    pieces = opt._method_pieces
    if pieces is None:
        if method_state is not None:
            raise ValueError(
                f"the state_dict holds the state of a method ({saved_method}), but this SAM "
                "has no method: build it with the same method=..."
            )
        return
    if method_state is not None:
        leaves = leaves_of(opt.param_groups)
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
    opt.method_state = method_state


def _fill_options(opt: SAM, current: list[dict[str, Any]]) -> None:
    """Groups loaded without SAM's options take the ones they had before."""
    for index, (group, before) in enumerate(zip(opt.param_groups, current)):
        for key, value in before.items():
            group.setdefault(key, value)
        check_group(index, group)


#: What pickling keeps beside torch.optim.Optimizer's own state, with each one's default.
_KEPT = {
    "nonfinite": "raise",
    "skipped_steps": 0,
    "method": None,
    "method_state": None,
    "reuse_rng": False,
}


def pickled_state(opt: SAM) -> dict[str, Any]:
    """``torch.save(opt)``, ``copy.deepcopy``: the base optimizer and the method go along."""
    state: dict[str, Any] = torch.optim.Optimizer.__getstate__(opt)
    state["base_optimizer"] = opt.base_optimizer
    for name in _KEPT:
        state[name] = getattr(opt, name)
    return state


def unpickle_into(opt: SAM, state: dict[str, Any]) -> None:
    """The inverse of ``pickled_state``; what is not in ``state`` stays as it is.

    ``Optimizer.load_state_dict`` calls ``__setstate__`` with the groups only.
    """
    state = dict(state)
    base = state.pop("base_optimizer", None)
    for name, default in _KEPT.items():
        setattr(opt, name, state.pop(name, getattr(opt, name, default)))
    opt._method_pieces = None if opt.method is None else pieces_of(opt.method)
    torch.optim.Optimizer.__setstate__(opt, state)
    if base is not None:
        opt.base_optimizer = base
        # One pickle shares one list object, so these are the same groups again.
        opt.param_groups = base.param_groups
