"""Every public function driven with random pytrees and drawn (sometimes invalid) arguments.

Each property calls samfunc the way a user would and holds samfunc to three promises:

* it either raises a documented error or returns a result. A documented error is a
  ``ValueError``, ``TypeError`` or ``NonFiniteGradientError`` raised by a ``raise`` statement
  in samfunc's own source (for ``samfunc.SAM``, also in ``torch.optim``'s, which checks the
  base optimizer's arguments). Anything else (a ``RuntimeError`` or ``TypeError`` from inside
  torch, a ``KeyError``, ...) is a samfunc bug. The test also knows which drawn arguments are
  outside their documented domain: an invalid argument must be rejected, a valid one must not;
* the result is finite where the inputs were finite. Valid arguments are drawn from boxes
  (``tests/strategies.py``) small enough that every result is far inside float64's range, so
  the same call on the inputs cast to float64 (the reference) must be finite everywhere.
  Tolerance for float16/bfloat16/float32: an element may overflow to inf (or become NaN from
  an overflow) only where the float64 reference is beyond half the dtype's largest finite
  value, that is where the true result does not fit the dtype. A non-finite element where the
  true result fits (a 16-bit underflow turned into a division by zero, an intermediate that
  overflows although the result does not) is a failure;
* no input is mutated: every tensor in params, gradients, optimizer states, batches and
  radii keeps its bits, its version counter, ``requires_grad`` and ``.grad``, and every
  container keeps its structure and its leaves (compared before and after each call).

``INPUTS_TRIED`` counts the inputs each property tried; ``tests/conftest.py`` prints the total.
What the properties found is pinned by the regression tests at the end of this file. A new
finding goes there as an ``xfail(strict=True)`` test with its minimal reproduction, and a
narrow ``assume`` keeps it out of the property until samfunc is fixed; then both go.
"""

from __future__ import annotations

import collections
import linecache
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import event, given
from hypothesis import strategies as st

import samfunc
from samfunc import _tree
from samfunc._schedule import schedule_range

from .strategies import (
    ADAPTIVE_ARG,
    ALPHA,
    BETA,
    DAMPENING,
    EPS,
    ETA,
    FLAG_ARG,
    FLOAT_DTYPES,
    GAMMA,
    LEARNING_RATE,
    MASK_ARG,
    MAX_NORM,
    MOMENTUM,
    NORM_ARG,
    OPTIMIZER_NAMES,
    RADIUS_ARG,
    REAL,
    RHO,
    SCHEDULE_NAMES,
    STEP_SIZE,
    TRANSFORM_NAMES,
    WEIGHT_DECAY,
    Arg,
    MaskRecipe,
    Recipe,
    at_most_one_invalid,
    flags,
    fuzz_pytrees,
    fuzz_tensors,
    hyperparameter_args,
    hyperparameters,
    is_positive_int,
    is_valid_radius,
    mostly,
    optimizer_recipes,
    positive_int_args,
    positive_ints,
    radii,
    schedule_recipes,
    transform_recipes,
    trees_like,
)

#: Inputs tried by each property in this run (printed by tests/conftest.py).
INPUTS_TRIED: collections.Counter[str] = collections.Counter()

DOCUMENTED_ERRORS = (ValueError, TypeError, samfunc.NonFiniteGradientError)
SAMFUNC_SOURCE = os.path.dirname(samfunc.__file__) + os.sep
TORCH_OPTIM_SOURCE = os.path.dirname(torch.optim.__file__) + os.sep
UPDATE_STEPS = 3

PARAMS = fuzz_pytrees(fuzz_tensors(parameters=True))


def tried(prop: str) -> None:
    INPUTS_TRIED[prop] += 1


# --- outcomes: a documented rejection, or a result ------------------------------------------------


class Rejected(NamedTuple):
    """A documented error raised by samfunc (or torch.optim) on purpose."""

    error: BaseException


def raise_site(error: BaseException) -> tuple[str, str]:
    """File and source line of the innermost frame of ``error``'s traceback."""
    tb = error.__traceback__
    assert tb is not None
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return filename, linecache.getline(filename, tb.tb_lineno).strip()


def attempt(call: Callable[[], Any], origins: Sequence[str] = (SAMFUNC_SOURCE,)) -> Any:
    """``call()``, or ``Rejected`` if it raised a documented error from a ``raise`` in ``origins``.

    An error of a documented type raised anywhere else (inside torch, say) propagates: the
    test fails with its traceback.
    """
    try:
        return call()
    except DOCUMENTED_ERRORS as error:
        filename, line = raise_site(error)
        if not (line.startswith("raise") and filename.startswith(tuple(origins))):
            raise
        return Rejected(error)


def expect(result: Any, invalid: list[str]) -> bool:
    """Asserts that ``result`` was rejected exactly when some argument was ``invalid``.

    Returns whether there is a result to check further.
    """
    if isinstance(result, Rejected):
        event(f"rejected: {type(result.error).__name__}")
        assert invalid, f"a valid input was rejected: {result.error!r}"
        return False
    event("accepted")
    assert not invalid, f"invalid arguments were accepted: {'; '.join(invalid)}"
    return True


# --- mutation: snapshots of inputs, compared bitwise ----------------------------------------------

_INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = _INT_VIEWS[a.element_size()] if a.dtype != torch.bool else torch.bool
    return torch.equal(a.detach().contiguous().view(as_int), b.detach().contiguous().view(as_int))


class Snapshot(NamedTuple):
    spec: Any
    leaves: list[Any]
    copies: list[Any]
    versions: list[int]
    requires_grad: list[bool]
    grads: list[Any]


def snapshot(tree: Any) -> Snapshot:
    leaves, spec = pytree.tree_flatten(tree)
    tensors = [leaf if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
    return Snapshot(
        spec=spec,
        leaves=list(leaves),
        copies=[t.detach().clone() if t is not None else None for t in tensors],
        versions=[t._version if t is not None else 0 for t in tensors],
        requires_grad=[t is not None and t.requires_grad for t in tensors],
        grads=[t.grad if t is not None and t.is_leaf else None for t in tensors],
    )


def assert_unchanged(tree: Any, before: Snapshot, name: str) -> None:
    """``tree`` has the structure, leaf objects and leaf contents it had at ``before``."""
    leaves, spec = pytree.tree_flatten(tree)
    assert spec == before.spec, f"{name}: its tree structure changed"
    paths = _tree.key_paths(tree)
    for index, (path, leaf) in enumerate(zip(paths, leaves)):
        where = f"{name} at {path or '<root>'}"
        assert leaf is before.leaves[index], f"{where}: the leaf was replaced"
        if not isinstance(leaf, torch.Tensor):
            continue
        assert leaf._version == before.versions[index], f"{where}: modified in place"
        assert same_bits(leaf, before.copies[index]), f"{where}: its values changed"
        assert leaf.requires_grad == before.requires_grad[index], f"{where}: requires_grad"
        if leaf.is_leaf:
            assert leaf.grad is before.grads[index], f"{where}: its .grad was set"


class Inputs:
    """Snapshots of named inputs, checked together."""

    def __init__(self, **trees: Any) -> None:
        self.trees = trees
        self.before = {name: snapshot(tree) for name, tree in trees.items()}

    def assert_unchanged(self) -> None:
        for name, tree in self.trees.items():
            assert_unchanged(tree, self.before[name], name)


# --- finiteness against a float64 reference -------------------------------------------------------


def upcast(tree: Any) -> Any:
    """Floating tensors as detached float64 copies (the reference run's inputs)."""

    def to_float64(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.detach().to(torch.float64)
        return leaf

    return pytree.tree_map(to_float64, tree)


def float_leaves(tree: Any) -> list[tuple[str, torch.Tensor]]:
    return [
        (path or "<root>", leaf.detach())
        for path, leaf in zip(_tree.key_paths(tree), _tree.leaves(tree))
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
    ]


def assert_finite(tree: Any, what: str) -> None:
    for path, leaf in float_leaves(tree):
        assert bool(torch.isfinite(leaf).all()), f"{what}: not finite at {path}: {leaf}"


def assert_finite_where_representable(actual: Any, reference: Any, what: str) -> None:
    """``actual`` is finite wherever the float64 ``reference`` fits its dtype (see the top)."""
    assert_finite(reference, f"{what} (float64 reference)")
    actual_leaves, reference_leaves = float_leaves(actual), float_leaves(reference)
    assert len(actual_leaves) == len(reference_leaves), f"{what}: leaves differ from reference"
    for (path, leaf), (_, ref) in zip(actual_leaves, reference_leaves):
        assert leaf.shape == ref.shape, f"{what}: shape at {path} differs from the reference"
        fits = ref.abs() <= torch.finfo(leaf.dtype).max / 2
        broken = ~torch.isfinite(leaf) & fits
        assert not bool(broken.any()), (
            f"{what}: not finite at {path} where the float64 result fits {leaf.dtype}: "
            f"{leaf} vs reference {ref}"
        )


def overflows_somewhere(reference: Any, dtypes: Sequence[torch.dtype]) -> bool:
    """Whether some reference value does not fit the narrowest of ``dtypes``."""
    narrowest = min(torch.finfo(d).max for d in dtypes) if dtypes else math.inf
    return any(bool((ref.abs() > narrowest / 2).any()) for _, ref in float_leaves(reference))


def assert_like(actual: Any, params: Any, what: str) -> None:
    """``actual`` has the structure of ``params`` and each leaf its shape and dtype."""
    _tree.check_same_structure(params, actual, "params", what)
    for path, p, a in zip(_tree.key_paths(params), _tree.leaves(params), _tree.leaves(actual)):
        assert a.shape == p.shape and a.dtype == p.dtype, (
            f"{what} at {path}: {tuple(a.shape)} {a.dtype} vs params {tuple(p.shape)} {p.dtype}"
        )


def dtypes_of(tree: Any) -> list[torch.dtype]:
    return [leaf.dtype for leaf in _tree.leaves(tree) if isinstance(leaf, torch.Tensor)]


def has_parameter(tree: Any) -> bool:
    return any(isinstance(leaf, torch.nn.Parameter) for leaf in _tree.leaves(tree))


# --- the loss: a sum of squares over every leaf, scaled by the batch ------------------------------


def sum_of_squares(params: Any) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for leaf in _tree.leaves(params):
        total = total + leaf.double().square().sum()
    return total


def batch_factor(batch: torch.Tensor) -> torch.Tensor:
    """``c`` in ``L(w) = c * sum(w ** 2)``: the Hessian is ``2 c I``."""
    return 1.0 + batch.square().mean()


def quadratic_loss(params: Any, batch: torch.Tensor) -> torch.Tensor:
    return sum_of_squares(params) * batch_factor(batch)


def quadratic_loss_with_aux(params: Any, batch: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return quadratic_loss(params, batch), {"batch_sum": batch.sum()}


def make_batch(size: int, seed: int) -> torch.Tensor:
    return torch.rand(size, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- building recipes, and knowing which arguments are invalid ------------------------------------

SCHEDULES: dict[str, Callable[..., Any]] = {
    "constant": samfunc.constant_schedule,
    "linear": samfunc.linear_schedule,
    "cosine": samfunc.cosine_decay_schedule,
    "step": samfunc.step_schedule,
    "multistep": samfunc.multistep_schedule,
    "warmup_cosine": samfunc.warmup_cosine_decay_schedule,
    "join": samfunc.join_schedules,
}
TRANSFORMS: dict[str, Callable[..., Any]] = {
    "sgd": samfunc.sgd,
    "adam": samfunc.adam,
    "adamw": samfunc.adamw,
    "trace": samfunc.trace,
    "scale_by_adam": samfunc.scale_by_adam,
    "clip_by_global_norm": samfunc.clip_by_global_norm,
    "add_decayed_weights": samfunc.add_decayed_weights,
    "decoupled_weight_decay": samfunc.decoupled_weight_decay,
    "scale": samfunc.scale,
    "scale_by_learning_rate": samfunc.scale_by_learning_rate,
    "scale_by_schedule": samfunc.scale_by_schedule,
    "identity": samfunc.identity,
    "masked": samfunc.masked,
    "apply_if_finite": samfunc.apply_if_finite,
}
#: The documented domain of each numeric argument, by recipe.
DOMAINS: dict[str, dict[str, Any]] = {
    "constant": {"value": REAL},
    "linear": {"init_value": REAL, "end_value": REAL},
    "cosine": {"init_value": REAL, "alpha": ALPHA},
    "step": {"init_value": REAL, "gamma": GAMMA},
    "multistep": {"init_value": REAL, "gamma": GAMMA},
    "warmup_cosine": {"init_value": REAL, "peak_value": REAL, "end_value": REAL},
    "sgd": {"momentum": MOMENTUM, "dampening": DAMPENING, "weight_decay": WEIGHT_DECAY},
    "adam": {"b1": BETA, "b2": BETA, "eps": EPS, "weight_decay": WEIGHT_DECAY},
    "adamw": {"b1": BETA, "b2": BETA, "eps": EPS, "weight_decay": WEIGHT_DECAY},
    "trace": {"decay": MOMENTUM, "dampening": DAMPENING},
    "scale_by_adam": {"b1": BETA, "b2": BETA, "eps": EPS},
    "clip_by_global_norm": {"max_norm": MAX_NORM},
    "add_decayed_weights": {"weight_decay": WEIGHT_DECAY},
    "decoupled_weight_decay": {"weight_decay": WEIGHT_DECAY},
    "scale": {"step_size": REAL},
}
POSITIVE_INTS: dict[str, tuple[str, ...]] = {
    "linear": ("transition_steps",),
    "cosine": ("decay_steps",),
    "step": ("step_size",),
    "warmup_cosine": ("warmup_steps", "decay_steps"),
}
BOOL_FLAGS = ("nesterov", "flip_sign")


def mask_flags(recipe: MaskRecipe, tree: Any) -> list[bool]:
    count = len(_tree.leaves(tree))
    return [recipe.bits[i % len(recipe.bits)] for i in range(count)]


def build_mask(recipe: MaskRecipe, tree: Any) -> Any:
    flags_ = mask_flags(recipe, tree)
    spec = pytree.tree_structure(tree)
    if recipe.kind == "predicate":
        index = {path: i for i, path in enumerate(_tree.key_paths(tree))}
        return lambda path, leaf: flags_[index[path]]
    if recipe.kind == "tree":
        return pytree.tree_unflatten(flags_, spec)
    if recipe.kind == "ints":
        return pytree.tree_unflatten([int(f) for f in flags_], spec)
    if recipe.kind == "reordered":
        return reversed_first_dict(pytree.tree_unflatten(flags_, spec))
    return [*flags_, True]  # wrong_structure


def mask_errors(recipe: Any, name: str, tree: Any) -> list[str]:
    """Why a mask recipe is rejected when resolved against ``tree``."""
    if not isinstance(recipe, MaskRecipe):
        return []
    if recipe.kind == "wrong_structure" or (recipe.kind == "ints" and _tree.leaves(tree)):
        return [f"{name}: {recipe}"]
    if recipe.kind == "reordered":
        reordered = reversed_first_dict(tree)
        if pytree.tree_structure(reordered) != pytree.tree_structure(tree):
            return [f"{name}: keys in another order than params"]
    return []


def selected_leaves(mask: MaskRecipe, params: Any) -> list[Any]:
    """What ``masked``'s inner transform sees: a flat list of the selected leaves."""
    return [leaf for leaf, keep in zip(_tree.leaves(params), mask_flags(mask, params)) if keep]


def build(recipe: Any, params: Any) -> Any:
    """The samfunc object a recipe describes (masks are built against ``params``)."""
    if isinstance(recipe, MaskRecipe):
        return build_mask(recipe, params)
    if isinstance(recipe, list):
        return [build(item, params) for item in recipe]
    if not isinstance(recipe, Recipe):
        return recipe
    if recipe.name == "masked":
        # The inner transform sees a flat list of the selected leaves: its masks select from it.
        selected = selected_leaves(recipe.kwargs["mask"], params)
        return samfunc.masked(
            build(recipe.kwargs["inner"], selected), build(recipe.kwargs["mask"], params)
        )
    kwargs = {key: build(value, params) for key, value in recipe.kwargs.items()}
    if recipe.name == "chain":
        return samfunc.chain(*kwargs["transforms"])
    return {**SCHEDULES, **TRANSFORMS}[recipe.name](**kwargs)


def _number_errors(recipe: Recipe) -> list[str]:
    errors = [
        f"{recipe.name}({key}={recipe.kwargs[key]!r})"
        for key, domain in DOMAINS.get(recipe.name, {}).items()
        if key in recipe.kwargs and not domain.contains(recipe.kwargs[key])
    ]
    errors += [
        f"{recipe.name}({key}={recipe.kwargs[key]!r})"
        for key in POSITIVE_INTS.get(recipe.name, ())
        if not is_positive_int(recipe.kwargs[key])
    ]
    errors += [
        f"{recipe.name}({key}={recipe.kwargs[key]!r})"
        for key in BOOL_FLAGS
        if key in recipe.kwargs and not isinstance(recipe.kwargs[key], bool)
    ]
    return errors


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def schedule_errors(recipe: Recipe) -> list[str]:
    """The documented reasons for the schedule builder to reject ``recipe``."""
    errors = _number_errors(recipe)
    kwargs = recipe.kwargs
    if recipe.name == "linear":
        begin = kwargs["transition_begin"]
        if not (_is_int(begin) and begin >= 0):
            errors.append(f"linear(transition_begin={begin!r})")
    if recipe.name == "multistep" and not all(_is_int(m) and m >= 0 for m in kwargs["milestones"]):
        errors.append(f"multistep(milestones={kwargs['milestones']!r})")
    if recipe.name == "warmup_cosine":
        warmup, total = kwargs["warmup_steps"], kwargs["decay_steps"]
        if is_positive_int(warmup) and is_positive_int(total) and total <= warmup:
            errors.append(f"warmup_cosine(decay_steps={total} <= warmup_steps={warmup})")
    if recipe.name == "join":
        schedules, boundaries = kwargs["schedules"], kwargs["boundaries"]
        if len(schedules) != len(boundaries) + 1:
            errors.append(f"join: {len(schedules)} schedules, {len(boundaries)} boundaries")
        if boundaries != sorted(boundaries) or any(b < 0 for b in boundaries):
            errors.append(f"join(boundaries={boundaries})")
        for child in schedules:
            errors += schedule_errors(child)
    return errors


def learning_rate_errors(learning_rate: Any, name: str) -> list[str]:
    if not isinstance(learning_rate, Recipe):
        return [] if LEARNING_RATE.contains(learning_rate) else [f"{name}={learning_rate!r}"]
    errors = schedule_errors(learning_rate)
    if not errors:
        low, _ = schedule_range(build(learning_rate, None))  # type: ignore[misc]
        if low < 0:
            errors.append(f"{name} schedule goes below 0 ({learning_rate!r})")
    return errors


def transform_errors(recipe: Recipe, params: Any) -> list[str]:
    """The documented reasons for ``recipe`` (a transform or optimizer) to be rejected."""
    errors = _number_errors(recipe)
    kwargs = recipe.kwargs
    if "learning_rate" in kwargs:
        errors += learning_rate_errors(kwargs["learning_rate"], f"{recipe.name}(learning_rate)")
    if recipe.name in ("sgd", "trace") and kwargs["nesterov"] is True:
        momentum = kwargs["momentum" if recipe.name == "sgd" else "decay"]
        if not (MOMENTUM.contains(momentum) and momentum > 0 and kwargs["dampening"] == 0):
            errors.append(f"{recipe.name}: nesterov=True needs momentum > 0 and dampening == 0")
    if recipe.name == "scale_by_schedule":
        errors += schedule_errors(kwargs["step_size_fn"])
    if recipe.name == "masked":
        errors += transform_errors(kwargs["inner"], selected_leaves(kwargs["mask"], params))
        errors += mask_errors(kwargs["mask"], "masked", params)
    if recipe.name == "apply_if_finite":
        errors += transform_errors(kwargs["inner"], params)
    if recipe.name == "chain":
        for child in kwargs["transforms"]:
            errors += transform_errors(child, params)
    return errors


# --- 1-2. optimizers and transforms: init, several updates, apply_updates -------------------------


def reversed_first_dict(tree: Any) -> Any:
    """``tree`` with the keys of its first dict of two or more keys in reverse order."""
    done = False

    def visit(node: Any) -> Any:
        nonlocal done
        if isinstance(node, dict):
            items = [(key, visit(value)) for key, value in node.items()]
            if not done and len(items) > 1:
                done = True
                items.reverse()
            return dict(items)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(visit(child) for child in node))
        if isinstance(node, (list, tuple)):
            return type(node)(visit(child) for child in node)
        return node

    return visit(tree)


class Trajectory(NamedTuple):
    updates: list[Any]
    params: list[Any]
    states: list[Any]


def run_optimizer(
    recipe: Recipe, params: Any, grads: list[Any], pass_params: bool = True
) -> Trajectory:
    """init, then update and apply_updates once per gradient; every input checked after.

    Without ``pass_params``, ``update(grads, state)`` is called without params.
    """
    optimizer = build(recipe, params)
    init_inputs = Inputs(params=params)
    state = optimizer.init(params)
    init_inputs.assert_unchanged()
    trajectory = Trajectory([], [], [state])
    for step_grads in grads:
        inputs = Inputs(params=params, grads=step_grads, state=state)
        try:
            if pass_params:
                updates, state = optimizer.update(step_grads, state, params)
            else:
                updates, state = optimizer.update(step_grads, state)
            params = samfunc.apply_updates(params, updates)
        finally:
            inputs.assert_unchanged()
        trajectory.updates.append(updates)
        trajectory.params.append(params)
        trajectory.states.append(state)
    return trajectory


def check_optimizer(
    recipe: Recipe, params: Any, grads: list[Any], invalid: list[str], pass_params: bool
) -> None:
    if not pass_params and needs_params(recipe, params):
        invalid = [*invalid, "weight decay without params"]
    result = attempt(lambda: run_optimizer(recipe, params, grads, pass_params))
    if not expect(result, invalid):
        return
    reference = run_optimizer(recipe, upcast(params), [upcast(g) for g in grads], pass_params)
    for step, (new_params, ref_params) in enumerate(zip(result.params, reference.params)):
        assert_like(new_params, params, f"params after update {step + 1}")
        assert_finite_where_representable(new_params, ref_params, f"params after {step + 1}")
        assert_finite_where_representable(
            result.updates[step], reference.updates[step], f"updates {step + 1}"
        )
    assert_finite_where_representable(result.states[-1], reference.states[-1], "state")


@st.composite
def gradient_steps(draw: st.DrawFn, params: Any) -> tuple[list[Any], bool]:
    """Gradients for each step; sometimes one dict has its keys in another order than params."""
    grads = [draw(trees_like(params)) for _ in range(UPDATE_STEPS)]
    reorder = draw(st.integers(0, 9)) == 0
    if reorder:
        grads[-1] = reversed_first_dict(grads[-1])
    changed = pytree.tree_structure(grads[-1]) != pytree.tree_structure(params)
    return grads, changed


def needs_params(recipe: Recipe, params: Any) -> bool:
    """Whether ``recipe`` decays weights, so that ``update`` needs params (documented)."""
    kwargs = recipe.kwargs
    if recipe.name in ("add_decayed_weights", "decoupled_weight_decay", *OPTIMIZER_NAMES):
        return kwargs.get("weight_decay", 0) != 0
    if recipe.name == "masked":
        selected = selected_leaves(kwargs["mask"], params)
        return bool(selected) and needs_params(kwargs["inner"], selected)
    if recipe.name == "apply_if_finite":
        return needs_params(kwargs["inner"], params)
    if recipe.name == "chain":
        return any(needs_params(child, params) for child in kwargs["transforms"])
    return False


def optimizer_input_errors(params: Any, reordered: bool) -> list[str]:
    errors = ["an nn.Parameter leaf"] if has_parameter(params) else []
    return errors + (["gradient keys in another order than params"] if reordered else [])


PASS_PARAMS = mostly(st.just(True), st.just(False), one_in=4)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@given(params=PARAMS, pass_params=PASS_PARAMS, data=st.data())
def test_optimizer_aliases(name: str, params: Any, pass_params: bool, data: st.DataObject) -> None:
    """sgd, adam, adamw: init + 3 x (update, with or without params, + apply_updates)."""
    tried("optimizer_aliases")
    recipe = data.draw(optimizer_recipes(name), label="optimizer")
    grads, reordered = data.draw(gradient_steps(params), label="grads")
    invalid = transform_errors(recipe, params) + optimizer_input_errors(params, reordered)
    check_optimizer(recipe, params, grads, invalid, pass_params)


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
@given(params=PARAMS, pass_params=PASS_PARAMS, data=st.data())
def test_transforms(name: str, params: Any, pass_params: bool, data: st.DataObject) -> None:
    """Every transform and combinator (nested): init + 3 x (update + apply_updates)."""
    tried("transforms")
    recipe = data.draw(transform_recipes(name), label="transform")
    grads, reordered = data.draw(gradient_steps(params), label="grads")
    invalid = transform_errors(recipe, params) + optimizer_input_errors(params, reordered)
    check_optimizer(recipe, params, grads, invalid, pass_params)


@st.composite
def with_one_nonfinite_step(draw: st.DrawFn, grads: list[Any]) -> tuple[list[Any], int | None]:
    """``grads`` with a NaN or inf put into one element of one step, if any leaf has one."""
    step = draw(st.integers(0, len(grads) - 1))
    leaves, spec = pytree.tree_flatten(grads[step])
    holders = [i for i, leaf in enumerate(leaves) if leaf.numel()]
    if not holders:
        return grads, None
    index = draw(st.sampled_from(holders))
    bad = leaves[index].detach().clone().contiguous()
    bad.view(-1)[draw(st.integers(0, bad.numel() - 1))] = draw(NON_FINITE_VALUES)
    leaves[index] = bad
    return [*grads[:step], pytree.tree_unflatten(leaves, spec), *grads[step + 1 :]], step


NON_FINITE_VALUES = st.sampled_from([math.nan, math.inf, -math.inf])


@given(inner=transform_recipes(), params=fuzz_pytrees(), data=st.data())
def test_apply_if_finite_skips_nonfinite_updates(
    inner: Recipe, params: Any, data: st.DataObject
) -> None:
    """apply_if_finite: a gradient with a NaN or inf gives zero updates and keeps the inner
    state (the counts say so); the steps around it run as the inner transform alone."""
    tried("apply_if_finite")
    recipe = Recipe("apply_if_finite", {"inner": inner})
    grads, _ = data.draw(gradient_steps(params), label="grads")
    grads = [g for g in grads if pytree.tree_structure(g) == pytree.tree_structure(params)]
    grads, bad_step = data.draw(with_one_nonfinite_step(grads), label="non-finite step")
    result = attempt(lambda: run_optimizer(recipe, params, grads))
    if not expect(result, transform_errors(inner, params)):
        return
    reference = run_optimizer(recipe, upcast(params), [upcast(g) for g in grads])
    for step, state in enumerate(result.states[1:]):
        before = result.states[step]
        if step == bad_step:
            assert not bool(state.last_finite)
            assert int(state.notfinite_count) == int(before.notfinite_count) + 1
            assert_same_values(result.updates[step], _tree.zeros_like(result.updates[step]), "u")
            assert_same_values(state.inner_state, before.inner_state, "inner state")
        else:
            assert bool(state.last_finite) and int(state.notfinite_count) == 0
            assert_finite_where_representable(
                result.updates[step], reference.updates[step], f"updates {step + 1}"
            )
    assert int(result.states[-1].total_notfinite) == (bad_step is not None)


# --- 3. schedules -------------------------------------------------------------------------------


def geometric(init_value: float, gamma: float, k: int) -> float:
    """``init_value * gamma**k``, exact in range however large ``gamma**k`` alone is."""
    if init_value == 0:
        return 0.0
    log_magnitude = math.log(abs(init_value)) + k * math.log(gamma)
    return math.copysign(math.exp(min(log_magnitude, 709.0)), init_value)  # 709: below inf


def schedule_reference(recipe: Recipe, count: int) -> float:
    """The schedule's value at ``count``, written out from its docstring in Python floats."""
    k = recipe.kwargs
    if recipe.name == "constant":
        return float(k["value"])
    if recipe.name == "linear":
        progress = min(max((count - k["transition_begin"]) / k["transition_steps"], 0.0), 1.0)
        return k["init_value"] + (k["end_value"] - k["init_value"]) * progress
    if recipe.name == "cosine":
        return cosine_between(
            k["init_value"], k["alpha"] * k["init_value"], k["decay_steps"], count
        )
    if recipe.name == "step":
        return geometric(k["init_value"], k["gamma"], math.floor(count / k["step_size"]))
    if recipe.name == "multistep":
        passed = sum(count >= m for m in k["milestones"])
        return geometric(k["init_value"], k["gamma"], passed)
    if recipe.name == "warmup_cosine":
        warmup = k["warmup_steps"]
        if count < warmup:
            return k["init_value"] + (k["peak_value"] - k["init_value"]) * count / warmup
        steps = k["decay_steps"] - warmup
        return cosine_between(k["peak_value"], k["end_value"], steps, count - warmup)
    schedules, boundaries = k["schedules"], k["boundaries"]
    index = sum(count >= b for b in boundaries)
    start = boundaries[index - 1] if index else 0
    return schedule_reference(schedules[index], count - start)


def cosine_between(start: float, end: float, steps: int, count: int) -> float:
    progress = min(max(count, 0), steps) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


#: Counts up to this are exact in float32 (schedules compute in float32).
EXACT_COUNTS = 2**24
FLOAT32_MAX = torch.finfo(torch.float32).max

counts = st.one_of(st.integers(0, 60), st.integers(0, 2**31 - 1))
count_types = st.sampled_from(["int", "int64", "int32"])


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@given(data=st.data(), count=counts, count_type=count_types)
def test_schedules(name: str, data: st.DataObject, count: int, count_type: str) -> None:
    """Every schedule: built from drawn arguments, called at a drawn count (int or tensor).

    Its value is a finite 0-d float32 tensor (unless the true value overflows float32), within
    the range the schedule reports for build-time checks, and the documented formula's value.
    """
    tried("schedules")
    recipe = data.draw(schedule_recipes(name), label="schedule")
    invalid = schedule_errors(recipe)
    schedule = attempt(lambda: build(recipe, None))
    if not expect(schedule, invalid):
        return
    step = count if count_type == "int" else torch.tensor(count, dtype=getattr(torch, count_type))
    inputs = Inputs(count=step)
    value = attempt(lambda: schedule(step))
    inputs.assert_unchanged()
    assert not isinstance(value, Rejected), f"a valid schedule rejected a count: {value}"
    assert isinstance(value, torch.Tensor) and value.shape == () and value.dtype == torch.float32
    expected = schedule_reference(recipe, count)
    if abs(expected) >= FLOAT32_MAX / 2:
        return  # the true value does not fit float32
    assert math.isfinite(float(value)), f"{recipe!r} at {count}: {value}, expected {expected}"
    low, high = schedule_range(schedule)  # type: ignore[misc]
    slack = 1e-6 * max(abs(low), abs(high), 1.0)
    assert low - slack <= float(value) <= high + slack, f"{float(value)} outside [{low}, {high}]"
    if count < EXACT_COUNTS and count <= 1000:
        assert math.isclose(float(value), expected, rel_tol=1e-4, abs_tol=1e-5), (
            f"{recipe!r} at count {count}: {float(value)}, expected {expected}"
        )


# --- 4. sam_grad, sam_grad_and_value, perturbation, perturbed_params -----------------------------


class SamOptions(NamedTuple):
    """Drawn SAM options; masks are recipes, built against the params of each call."""

    rho: Any
    adaptive: Any
    eta: Any
    norm: Any
    mask: Any

    def build(self, params: Any) -> dict[str, Any]:
        return {
            "rho": self.rho,
            "adaptive": build(self.adaptive, params),
            "eta": self.eta,
            "norm": self.norm,
            "mask": build(self.mask, params),
        }

    def errors(self) -> list[str]:
        """Arguments rejected when the options are checked."""
        errors = [] if is_valid_radius(self.rho) else [f"rho={self.rho!r}"]
        errors += [] if ETA.contains(self.eta) else [f"eta={self.eta!r}"]
        errors += [] if self.norm in ("l2", "none", "inf") else [f"norm={self.norm!r}"]
        if not isinstance(self.adaptive, (bool, MaskRecipe)):
            errors.append(f"adaptive={self.adaptive!r}")
        return errors

    def mask_errors(self, params: Any) -> list[str]:
        """Masks rejected when they are resolved against ``params`` (when perturbing)."""
        errors = mask_errors(self.adaptive, "adaptive", params)
        errors += mask_errors(self.mask, "mask", params)
        if isinstance(self.mask, MaskRecipe) and not any(mask_flags(self.mask, params)):
            errors.append("mask selects no leaf")
        return errors

    def selected(self, params: Any) -> list[bool]:
        if isinstance(self.mask, MaskRecipe):
            return mask_flags(self.mask, params)
        return [True] * len(_tree.leaves(params))


sam_options = at_most_one_invalid(
    SamOptions,
    rho=RADIUS_ARG,
    adaptive=ADAPTIVE_ARG,
    eta=hyperparameter_args(ETA),
    norm=NORM_ARG,
    mask=MASK_ARG,
)


@pytest.mark.parametrize("function", ["perturbation", "perturbed_params"])
@given(params=PARAMS, options=sam_options, data=st.data())
def test_perturbation(params: Any, options: SamOptions, function: str, data: st.DataObject) -> None:
    """perturbation / perturbed_params: e (or w + e) for drawn radius, ASAM, norm and mask."""
    tried("perturbation")
    grads = data.draw(trees_like(params, requires_grad=st.booleans()), label="grads")
    if data.draw(st.integers(0, 9), label="reorder") == 0:
        grads = reversed_first_dict(grads)
    invalid = options.errors() + options.mask_errors(params)
    if pytree.tree_structure(grads) != pytree.tree_structure(params):
        invalid.append("grads keys in another order than params")
    call = getattr(samfunc, function)
    inputs = Inputs(params=params, grads=grads, rho=options.rho)
    result = attempt(lambda: call(params, grads, **options.build(params)))
    inputs.assert_unchanged()
    if not expect(result, invalid):
        return
    assert_like(result, params, function)
    reference = call(upcast(params), upcast(grads), **options.build(params))
    assert_finite_where_representable(result, reference, function)
    if function == "perturbed_params":
        selected = options.selected(params)
        for p, new, keep in zip(_tree.leaves(params), _tree.leaves(result), selected):
            assert keep or new is p, "a leaf the mask leaves out must come back as it is"
        return
    if options.adaptive is False:
        radius = float(options.rho.detach() if torch.is_tensor(options.rho) else options.rho)
        assert_perturbation_formula(reference, upcast(grads), radius, options)


def assert_perturbation_formula(e: Any, grads: Any, rho: float, options: SamOptions) -> None:
    """e without ASAM, as documented: 0 off the mask, else rho g / ||g||, rho g or rho sign g."""
    selected = options.selected(grads)
    chosen = [(x, g) for x, g, keep in zip(_tree.leaves(e), _tree.leaves(grads), selected) if keep]
    for x, keep in zip(_tree.leaves(e), selected):
        assert keep or not bool(x.any()), "e must be 0 on leaves the mask leaves out"
    if options.norm == "l2":
        grad_norm = float(_tree.global_norm([g for _, g in chosen]))
        for x, g in chosen:
            torch.testing.assert_close(x, rho * g / (grad_norm + 1e-12), rtol=1e-9, atol=1e-12)
    else:
        for x, g in chosen:
            expected = rho * (g.sign() if options.norm == "inf" else g)
            torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-12)


class ChunkOptions(NamedTuple):
    batch_size: int
    num_chunks: Any
    accum_steps: Any
    vectorize_chunks: Any
    reuse_rng: Any
    has_aux: Any
    nonfinite: Any

    def errors(self) -> list[str]:
        """Arguments rejected when the options are checked."""
        errors = [
            f"{name}={getattr(self, name)!r}"
            for name in ("num_chunks", "accum_steps")
            if not is_positive_int(getattr(self, name))
        ]
        counts = (self.num_chunks, self.accum_steps)
        if all(is_positive_int(c) and c > 1 for c in counts):
            errors.append("num_chunks and accum_steps both > 1")
        errors += [
            f"{name}={getattr(self, name)!r}"
            for name in ("vectorize_chunks", "reuse_rng", "has_aux")
            if not isinstance(getattr(self, name), bool)
        ]
        if self.nonfinite not in ("propagate", "raise"):
            errors.append(f"nonfinite={self.nonfinite!r}")
        return errors

    def split_errors(self) -> list[str]:
        """The batch cannot be split: rejected when the SAM passes run."""
        return [
            f"{name}={getattr(self, name)} does not divide the batch size {self.batch_size}"
            for name in ("num_chunks", "accum_steps")
            if is_positive_int(getattr(self, name)) and self.batch_size % getattr(self, name)
        ]

    def sam_kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields[1:]}


def batch_size_for(parts: Any, multiple: int, indivisible: bool) -> int:
    """A batch of ``multiple`` parts' worth, one example more if ``indivisible``."""
    parts = parts if is_positive_int(parts) else 1
    return parts * multiple + (1 if indivisible and parts > 1 else 0)


def chunking(**values: Any) -> ChunkOptions:
    multiple, indivisible = values.pop("batch_multiple"), values.pop("indivisible")
    parts = max(
        p if is_positive_int(p) else 1 for p in (values["num_chunks"], values["accum_steps"])
    )
    return ChunkOptions(batch_size=batch_size_for(parts, multiple, indivisible), **values)


#: 1, or now and then 2 to 4 parts of the batch.
PARTS_ARG = Arg(mostly(st.just(1), st.integers(2, 4), one_in=4), positive_int_args().invalid)
INDIVISIBLE_ARG = Arg(st.just(False), st.just(True))
chunk_options = at_most_one_invalid(
    chunking,
    batch_multiple=st.integers(1, 3),
    indivisible=INDIVISIBLE_ARG,
    num_chunks=PARTS_ARG,
    accum_steps=PARTS_ARG,
    vectorize_chunks=FLAG_ARG,
    reuse_rng=FLAG_ARG,
    has_aux=FLAG_ARG,
    nonfinite=Arg(st.sampled_from(["propagate", "raise"]), st.just("skip")),
)


def sam_call(
    function: str, params: Any, batch: Any, options: SamOptions, chunks: ChunkOptions, rho: Any
) -> Any:
    loss_fn = quadratic_loss_with_aux if chunks.has_aux is True else quadratic_loss
    kwargs = {**options.build(params), **chunks.sam_kwargs()}
    if function == "sam_grad":
        return samfunc.sam_grad(loss_fn, params, batch, **kwargs)
    sam_fn = samfunc.sam_grad_and_value(loss_fn, **kwargs)
    return sam_fn(params, batch) if rho is None else sam_fn(params, batch, rho)


@pytest.mark.parametrize("function", ["sam_grad", "sam_grad_and_value"])
@given(
    params=PARAMS,
    options=sam_options,
    chunks=chunk_options,
    call_rho=st.one_of(st.none(), radii()),
    seed=st.integers(0, 2**16),
)
def test_sam_grad(
    function: str,
    params: Any,
    options: SamOptions,
    chunks: ChunkOptions,
    call_rho: Any,
    seed: int,
) -> None:
    """sam_grad / sam_grad_and_value (with a per-call rho) on L(w) = c sum(w**2)."""
    tried("sam_grad")
    batch = make_batch(chunks.batch_size, seed)
    rho = call_rho if function == "sam_grad_and_value" else None
    invalid = options.errors() + options.mask_errors(params) + chunks.errors()
    invalid += chunks.split_errors()
    if rho is not None and not is_valid_radius(rho):
        invalid.append(f"rho={rho!r} in the call")
    if has_parameter(params):
        invalid.append("an nn.Parameter leaf")
    inputs = Inputs(params=params, batch=batch, rho=options.rho, call_rho=rho)
    result = attempt(lambda: sam_call(function, params, batch, options, chunks, rho))
    inputs.assert_unchanged()
    if isinstance(result, Rejected) and isinstance(result.error, samfunc.NonFiniteGradientError):
        assert not invalid, f"NonFiniteGradientError instead of rejecting {invalid}"
        propagating = chunks._replace(nonfinite="propagate")
        reference, _ = sam_call(function, upcast(params), batch, options, propagating, rho)
        assert overflows_somewhere(reference, dtypes_of(params)), (
            f"NonFiniteGradientError although the float64 gradient fits: {result.error}"
        )
        return
    if not expect(result, invalid):
        return
    grads, value = result
    assert_like(grads, params, "sam grads")
    reference_grads, reference_value = sam_call(
        function, upcast(params), batch, options, chunks, rho
    )
    assert_finite_where_representable(grads, reference_grads, function)
    assert_finite_where_representable(value, reference_value, f"{function} loss (and aux)")
    loss = (value[0] if chunks.has_aux else value).detach()
    assert loss.shape == ()
    torch.testing.assert_close(loss, quadratic_loss(upcast(params), batch), rtol=1e-6, atol=1e-9)


# --- 5. make_train_step and init_train_state -----------------------------------------------------


class UserSchedule:
    """A rho schedule samfunc cannot inspect: ``values[count % len(values)]``."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)

    def __call__(self, count: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.value_at(int(count)), dtype=torch.float32)

    def __repr__(self) -> str:
        return f"UserSchedule({self.values})"

    def value_at(self, count: int) -> float:
        return self.values[count % len(self.values)]


train_rhos = st.one_of(
    hyperparameter_args(RHO).valid,
    schedule_recipes(),
    st.lists(
        mostly(st.floats(0.0, 1.0), st.sampled_from([-0.1, math.nan])), min_size=1, max_size=3
    ).map(UserSchedule),
)


class StepOptions(NamedTuple):
    sam: Any
    rho: Any
    nonfinite: Any

    def errors(self) -> list[str]:
        errors = [] if isinstance(self.sam, bool) else [f"sam={self.sam!r}"]
        if self.nonfinite not in ("skip", "raise", "propagate"):
            errors.append(f"nonfinite={self.nonfinite!r}")
        if isinstance(self.rho, Recipe):
            errors += learning_rate_errors(self.rho, "rho")
        elif not isinstance(self.rho, UserSchedule) and not RHO.contains(self.rho):
            errors.append(f"rho={self.rho!r}")
        return errors

    def bad_radius_at(self, count: int) -> bool:
        """A user schedule's rho is negative or NaN at ``count`` (found only when run)."""
        return isinstance(self.rho, UserSchedule) and not RHO.contains(self.rho.value_at(count))


step_options = at_most_one_invalid(
    StepOptions,
    sam=FLAG_ARG,
    rho=Arg(train_rhos, hyperparameter_args(RHO).invalid),
    nonfinite=Arg(st.sampled_from(["skip", "raise", "propagate"]), st.just("ignore")),
)


def run_train_steps(
    recipe: Recipe,
    params: Any,
    batches: list[torch.Tensor],
    options: SamOptions,
    chunks: ChunkOptions,
    step_options: StepOptions,
) -> list[tuple[Any, Any]]:
    """make_train_step, init_train_state, then one step per batch; inputs checked after each."""
    sam_options = options.build(params)
    del sam_options["rho"]
    train_step = samfunc.make_train_step(
        quadratic_loss,
        build(recipe, params),
        sam=step_options.sam,
        rho=build(step_options.rho, params),
        num_chunks=chunks.num_chunks,
        accum_steps=chunks.accum_steps,
        vectorize_chunks=chunks.vectorize_chunks,
        nonfinite=step_options.nonfinite,
        **sam_options,
    )
    inputs = Inputs(params=params)
    state = samfunc.init_train_state(params, build(recipe, params))
    inputs.assert_unchanged()
    history = []
    for batch in batches:
        inputs = Inputs(state=state, batch=batch)
        try:
            new_state, metrics = train_step(state, batch)
        finally:
            inputs.assert_unchanged()
        history.append((state, new_state, metrics))
        state = new_state
    return history


def assert_same_values(actual: Any, expected: Any, what: str) -> None:
    _tree.check_same_structure(expected, actual, "expected", what)
    for path, a, e in zip(_tree.key_paths(actual), _tree.leaves(actual), _tree.leaves(expected)):
        assert same_bits(a, e), f"{what} at {path or '<root>'} changed"


@given(
    recipe=optimizer_recipes(),
    params=PARAMS,
    options=sam_options,
    chunks=chunk_options.map(lambda c: c._replace(has_aux=False, nonfinite="propagate")),
    step_options=step_options,
    seed=st.integers(0, 2**16),
)
def test_train_step(
    recipe: Recipe,
    params: Any,
    options: SamOptions,
    chunks: ChunkOptions,
    step_options: StepOptions,
    seed: int,
) -> None:
    """make_train_step + init_train_state + 2 steps, every option drawn.

    A user's rho schedule that goes negative or NaN is caught when run: the step is skipped
    (``nonfinite="skip"``), raises (``"raise"``) or goes on with NaN (``"propagate"``).
    """
    tried("train_step")
    options = options._replace(rho=0.05)  # the radius comes from step_options
    chunks = chunks._replace(reuse_rng=False)
    batches = [make_batch(chunks.batch_size, seed + i) for i in range(2)]
    sam = step_options.sam is True
    invalid = transform_errors(recipe, params) + step_options.errors() + options.errors()
    invalid += chunks.errors()
    if sam:  # masks are resolved and the batch split by the SAM passes only
        invalid += options.mask_errors(params) + chunks.split_errors()
    if has_parameter(params):
        invalid.append("an nn.Parameter leaf")
    # A NaN radius shows only through an element of a perturbed leaf.
    perturbed = [leaf for leaf, k in zip(_tree.leaves(params), options.selected(params)) if k]
    observable = sam and sum(leaf.numel() for leaf in perturbed) > 0
    bad_steps = [i for i in range(len(batches)) if observable and step_options.bad_radius_at(i)]
    result = attempt(
        lambda: run_train_steps(recipe, params, batches, options, chunks, step_options)
    )
    narrowest = dtypes_of(params)
    if isinstance(result, Rejected) and isinstance(result.error, samfunc.NonFiniteGradientError):
        assert not invalid, f"NonFiniteGradientError instead of rejecting {invalid}"
        assert step_options.nonfinite == "raise"
        if not bad_steps:  # then only a gradient too big for the params' dtype may raise
            reference = run_train_steps(
                recipe, upcast(params), batches, options, chunks, step_options
            )
            assert any(overflows_somewhere(m.grad_norm, narrowest) for *_, m in reference), (
                f"NonFiniteGradientError although the float64 gradient fits: {result.error}"
            )
        return
    if not expect(result, invalid):
        return
    reference = run_train_steps(recipe, upcast(params), batches, options, chunks, step_options)
    for count, ((before, state, metrics), (_, ref_state, ref_metrics)) in enumerate(
        zip(result, reference)
    ):
        assert int(state.step) == count + 1
        assert_like(state.params, params, f"params after step {count + 1}")
        if count in bad_steps:
            assert step_options.nonfinite != "raise", "a negative or NaN rho must raise"
            assert not bool(metrics.finite), "a negative or NaN rho must show as not finite"
            if step_options.nonfinite == "skip":
                for name in ("params", "opt_state", "buffers"):
                    assert_same_values(getattr(state, name), getattr(before, name), name)
                continue
            break  # propagated: the radius made everything NaN
        if overflows_somewhere(ref_metrics.grad_norm, narrowest):
            break  # the gradient itself does not fit the params' dtype
        where = f"after step {count + 1}"
        assert_finite_where_representable(state, ref_state, f"train state {where}")
        if isinstance(step_options.rho, UserSchedule):
            metrics, ref_metrics = metrics._replace(rho=None), ref_metrics._replace(rho=None)
        assert_finite_where_representable(
            metrics._replace(finite=None), ref_metrics._replace(finite=None), f"metrics {where}"
        )
        assert bool(metrics.finite), f"step {count + 1} reported a non-finite gradient"


# --- 6. global_norm and apply_updates -------------------------------------------------------------


@given(params=PARAMS)
def test_global_norm(params: Any) -> None:
    """global_norm: the float64 norm of all leaves, as a finite 0-d tensor."""
    tried("global_norm")
    inputs = Inputs(params=params)
    norm = attempt(lambda: samfunc.global_norm(params))
    inputs.assert_unchanged()
    assert not isinstance(norm, Rejected), f"global_norm rejected a pytree: {norm}"
    wide = any(d == torch.float64 for d in dtypes_of(params))
    assert norm.shape == () and norm.dtype == (torch.float64 if wide else torch.float32)
    expected = math.sqrt(float(sum_of_squares(params).detach()))
    assert math.isclose(float(norm.detach()), expected, rel_tol=1e-5, abs_tol=1e-30)


@st.composite
def mismatched_updates(draw: st.DrawFn, params: Any) -> tuple[Any, list[str]]:
    """Updates for ``params``: like them, or (sometimes) with keys, a shape or dtypes changed."""
    updates = draw(trees_like(params, requires_grad=st.booleans()))
    change = draw(st.sampled_from(["none", "none", "none", "keys", "shape", "dtype"]))
    if change == "keys":
        updates = reversed_first_dict(updates)
        if pytree.tree_structure(updates) != pytree.tree_structure(params):
            return updates, ["updates keys in another order"]
    if change == "shape":
        leaves, spec = pytree.tree_flatten(updates)
        leaves[0] = torch.zeros((*leaves[0].shape, 1), dtype=leaves[0].dtype)
        return pytree.tree_unflatten(leaves, spec), ["an update of another shape"]
    if change == "dtype":
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
        updates = pytree.tree_map(lambda u: u.detach().to(dtype), updates)
    return updates, []


@given(params=PARAMS, data=st.data())
def test_apply_updates(params: Any, data: st.DataObject) -> None:
    """apply_updates: params + updates in the params' dtype, bitwise; mismatches rejected."""
    tried("apply_updates")
    updates, invalid = data.draw(mismatched_updates(params), label="updates")
    if has_parameter(params):
        invalid.append("an nn.Parameter leaf")
    inputs = Inputs(params=params, updates=updates)
    result = attempt(lambda: samfunc.apply_updates(params, updates))
    inputs.assert_unchanged()
    if not expect(result, invalid):
        return
    assert_like(result, params, "new params")
    for new, p, u in zip(_tree.leaves(result), _tree.leaves(params), _tree.leaves(updates)):
        assert same_bits(new, p.detach() + u.detach().to(p.dtype))


# --- 7. sharpness tools -------------------------------------------------------------------------

#: Relative rounding of one operation in each dtype, for comparisons with analytic results.
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-10}


def assert_close_per_dtype(actual: Any, expected: Any, what: str) -> None:
    for path, a, e in zip(_tree.key_paths(actual), _tree.leaves(actual), _tree.leaves(expected)):
        rtol = RTOL[a.dtype]
        torch.testing.assert_close(
            a.detach().double(),
            e.double(),
            rtol=rtol,
            atol=1e-6,
            msg=lambda m, p=path: f"{what} at {p}: {m}",  # type: ignore[misc]
        )


@pytest.mark.parametrize(
    "tool", ["hessian_vector_product", "hessian_trace", "top_hessian_eigenvalue"]
)
@given(
    params=PARAMS,
    samples=positive_ints(3),
    has_aux=flags(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_hessian_tools(
    tool: str, params: Any, samples: Any, has_aux: Any, seed: int, data: st.DataObject
) -> None:
    """hessian_vector_product, hessian_trace (few samples), top_hessian_eigenvalue (few iters).

    The Hessian of c sum(w**2) is 2c I: H v = 2c v, tr(H) = 2c n, top eigenvalue 2c.
    """
    tried("hessian_tools")
    n = sum(leaf.numel() for leaf in _tree.leaves(params))
    batch = make_batch(3, seed)
    c = float(batch_factor(batch))
    loss_fn = quadratic_loss_with_aux if has_aux is True else quadratic_loss
    invalid = [] if isinstance(has_aux, bool) else [f"has_aux={has_aux!r}"]
    vector = data.draw(trees_like(params, requires_grad=st.booleans()), label="vector")
    if tool == "hessian_vector_product" and data.draw(st.integers(0, 9), label="reorder") == 0:
        vector = reversed_first_dict(vector)
        if pytree.tree_structure(vector) != pytree.tree_structure(params):
            invalid.append("vector keys in another order than params")
    if tool != "hessian_vector_product" and not is_positive_int(samples):
        invalid.append(f"samples/iters={samples!r}")
    if tool == "top_hessian_eigenvalue" and n == 0:
        invalid.append("params with no element have no Hessian eigenvalue")
    inputs = Inputs(params=params, vector=vector, batch=batch)

    def call() -> Any:
        if tool == "hessian_vector_product":
            return samfunc.hessian_vector_product(loss_fn, params, batch, vector, has_aux=has_aux)
        if tool == "hessian_trace":
            return samfunc.hessian_trace(loss_fn, params, batch, samples=samples, has_aux=has_aux)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # not converged in so few iterations
            return samfunc.top_hessian_eigenvalue(
                loss_fn, params, batch, iters=samples, seed=seed, has_aux=has_aux
            )

    result = attempt(call)
    inputs.assert_unchanged()
    if not expect(result, invalid):
        return
    if tool == "hessian_vector_product":
        assert_like(result, params, "H v")
        assert_close_per_dtype(
            result, pytree.tree_map(lambda v: 2 * c * v.detach().double(), vector), "H v"
        )
    elif tool == "hessian_trace":
        assert_finite(result, "hessian_trace")
        assert math.isclose(float(result.trace), 2 * c * n, rel_tol=1e-2, abs_tol=1e-6)
    else:
        eigenvalue, eigenvector = result
        assert_like(eigenvector, params, "eigenvector")
        assert_finite(result, "top_hessian_eigenvalue")
        assert math.isclose(float(eigenvalue), 2 * c, rel_tol=2e-2)


class WorstCaseArgs(NamedTuple):
    rho: Any
    steps: Any
    step_size: Any
    num_chunks: Any
    batch_size: int

    def errors(self) -> list[str]:
        errors = [] if RHO.contains(self.rho) else [f"rho={self.rho!r}"]
        errors += [] if is_positive_int(self.steps) else [f"steps={self.steps!r}"]
        if self.step_size is not None and not STEP_SIZE.contains(self.step_size):
            errors.append(f"step_size={self.step_size!r}")
        if not is_positive_int(self.num_chunks):
            errors.append(f"num_chunks={self.num_chunks!r}")
        elif self.batch_size % self.num_chunks:
            errors.append(f"num_chunks={self.num_chunks} does not divide {self.batch_size}")
        return errors


def worst_case(**values: Any) -> WorstCaseArgs:
    multiple, indivisible = values.pop("batch_multiple"), values.pop("indivisible")
    size = batch_size_for(values["num_chunks"], multiple, indivisible)
    return WorstCaseArgs(batch_size=size, **values)


step_size_arg = hyperparameter_args(STEP_SIZE)
worst_case_args = at_most_one_invalid(
    worst_case,
    rho=hyperparameter_args(RHO),
    steps=positive_int_args(3),
    step_size=Arg(st.one_of(st.none(), step_size_arg.valid), step_size_arg.invalid),
    num_chunks=PARTS_ARG,
    batch_multiple=st.integers(1, 3),
    indivisible=INDIVISIBLE_ARG,
)


@given(params=PARAMS, args=worst_case_args, seed=st.integers(0, 2**16))
def test_worst_case_loss(params: Any, args: WorstCaseArgs, seed: int) -> None:
    """worst_case_loss: the loss at w, and a worst loss between it and the ball's maximum."""
    tried("worst_case_loss")
    batch = make_batch(args.batch_size, seed)
    invalid = args.errors()
    rho, num_chunks = args.rho, args.num_chunks
    inputs = Inputs(params=params, batch=batch)
    result = attempt(
        lambda: samfunc.worst_case_loss(
            quadratic_loss,
            params,
            batch,
            rho,
            steps=args.steps,
            step_size=args.step_size,
            num_chunks=num_chunks,
        )
    )
    inputs.assert_unchanged()
    if not expect(result, invalid):
        return
    assert_finite(result, "worst_case_loss")
    chunks = batch.chunk(num_chunks)
    norm = math.sqrt(float(sum_of_squares(params).detach()))
    loss = sum(float(batch_factor(b)) * norm**2 for b in chunks) / num_chunks
    ball_max = sum(float(batch_factor(b)) * (norm + rho) ** 2 for b in chunks) / num_chunks
    rtol = max(RTOL[d] for d in dtypes_of(params)) * 4
    assert math.isclose(float(result.loss), loss, rel_tol=1e-9, abs_tol=1e-12)
    assert float(result.sharpness) >= 0.0
    assert float(result.worst_loss) <= ball_max * (1 + rtol) + 1e-9, "worse than the ball allows"


@given(
    params=PARAMS,
    seed=st.integers(0, 2**16),
    filter_normalize=flags(),
    ignore_1d=flags(),
    alphas=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=4),
    as_tensor=st.booleans(),
)
def test_random_direction_and_landscapes(
    params: Any,
    seed: int,
    filter_normalize: Any,
    ignore_1d: Any,
    alphas: list[float],
    as_tensor: bool,
) -> None:
    """random_direction, then loss_landscape_1d and _2d along it: finite, the right shapes."""
    tried("random_direction_and_landscapes")
    invalid = [
        f"{name}={value!r}"
        for name, value in (("filter_normalize", filter_normalize), ("ignore_1d", ignore_1d))
        if not isinstance(value, bool)
    ]
    batch = make_batch(2, seed)
    inputs = Inputs(params=params, batch=batch)
    direction = attempt(
        lambda: samfunc.random_direction(
            params, seed=seed, filter_normalize=filter_normalize, ignore_1d=ignore_1d
        )
    )
    inputs.assert_unchanged()
    if not expect(direction, invalid):
        return
    assert_like(direction, params, "direction")
    assert_finite(direction, "random_direction")
    for d, w in zip(_tree.leaves(direction), _tree.leaves(params)):
        if w.ndim <= 1 and ignore_1d:
            assert not bool(d.any()), "ignore_1d leaves a 0-d or 1-d leaf's direction at zero"
        elif w.ndim <= 1 or filter_normalize:
            assert_filter_norms(d, w)
    points = torch.tensor(alphas, dtype=torch.float64) if as_tensor else alphas
    inputs = Inputs(params=params, batch=batch, direction=direction, alphas=points)
    line = samfunc.loss_landscape_1d(quadratic_loss, params, batch, direction, points)
    plane = samfunc.loss_landscape_2d(
        quadratic_loss, params, batch, (direction, direction), points, points
    )
    inputs.assert_unchanged()
    assert line.shape == (len(alphas),) and plane.shape == (len(alphas), len(alphas))
    assert_finite(line, "loss_landscape_1d")
    assert_finite(plane, "loss_landscape_2d")
    for alpha, value in zip(alphas, line.tolist()):
        if alpha == 0.0:
            at_w = float(quadratic_loss(params, batch).detach())
            assert value == at_w, "L(w + 0 d) must be L(w)"


def assert_filter_norms(direction: torch.Tensor, weight: torch.Tensor) -> None:
    """Each filter (slice along dim 0; the whole leaf if 0-d or 1-d) has the weight's norm."""

    def filters(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().double()
        return x.reshape(1, -1) if x.ndim <= 1 else x.flatten(1)

    d_norms, w_norms = filters(direction).norm(dim=1), filters(weight).norm(dim=1)
    torch.testing.assert_close(d_norms, w_norms, rtol=8 * RTOL[weight.dtype], atol=1e-4)


# --- 8. samfunc.SAM ------------------------------------------------------------------------------

SAM_LAYOUTS = ("contiguous", "element", "strided", "transposed")  # no stride-0 parameters


class BaseOptimizer(NamedTuple):
    cls: Any
    kwargs: dict[str, Any]
    in_domain: bool


@st.composite
def base_optimizers(draw: st.DrawFn) -> BaseOptimizer:
    """torch.optim.SGD / Adam / AdamW with drawn kwargs; rarely not an optimizer class."""
    if draw(st.integers(0, 19)) == 0:
        return BaseOptimizer("SGD", {"lr": 0.1}, in_domain=False)
    lr = draw(hyperparameters(LEARNING_RATE._replace(box=(0.0, 1.0)), numbers_only=True))
    decay = draw(_mostly_zero(WEIGHT_DECAY))
    if draw(st.booleans()):
        momentum = draw(_mostly_zero(MOMENTUM))
        nesterov = draw(st.booleans()) and isinstance(momentum, float) and momentum > 0
        kwargs = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": decay}
        domains = {"lr": LEARNING_RATE, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}
        cls = torch.optim.SGD
    else:
        # torch.optim wants both betas floats (or both tensors).
        b1 = float(draw(hyperparameters(BETA, numbers_only=True)))
        b2 = float(draw(hyperparameters(BETA, numbers_only=True)))
        eps = draw(hyperparameters(EPS, numbers_only=True))
        kwargs = {"lr": lr, "betas": (b1, b2), "eps": eps, "weight_decay": decay}
        domains = {"lr": LEARNING_RATE, "eps": EPS, "weight_decay": WEIGHT_DECAY}
        cls = draw(st.sampled_from([torch.optim.Adam, torch.optim.AdamW]))
        if not (BETA.contains(b1) and BETA.contains(b2)):
            domains = {**domains, "betas": None}
    in_domain = all(
        domain is not None and domain.contains(kwargs[name]) for name, domain in domains.items()
    )
    return BaseOptimizer(cls, kwargs, in_domain)


def _mostly_zero(domain: Any) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(0.0), hyperparameters(domain, numbers_only=True))


class GroupOptions(NamedTuple):
    rho: Any
    adaptive: Any
    eta: Any

    def errors(self, where: str) -> list[str]:
        errors = [] if RHO.contains(self.rho) else [f"{where} rho={self.rho!r}"]
        errors += [] if ETA.contains(self.eta) else [f"{where} eta={self.eta!r}"]
        if not isinstance(self.adaptive, bool):
            errors.append(f"{where} adaptive={self.adaptive!r}")
        return errors


group_options = at_most_one_invalid(
    GroupOptions, rho=hyperparameter_args(RHO), adaptive=FLAG_ARG, eta=hyperparameter_args(ETA)
)


def sam_closure(
    optimizer: samfunc.SAM, params: list[torch.nn.Parameter], batch: torch.Tensor
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = quadratic_loss(params, batch)
        loss.backward()
        return loss

    return closure


@given(
    tensors=st.lists(
        fuzz_tensors(
            dtypes=(torch.float32, torch.float64), requires_grad=st.just(False), layouts=SAM_LAYOUTS
        ),
        min_size=1,
        max_size=4,
    ),
    frozen=st.lists(st.booleans(), min_size=4, max_size=4),
    defaults=group_options,
    second_group=st.one_of(st.none(), group_options),
    base=base_optimizers(),
    nonfinite=mostly(st.sampled_from(["raise", "skip", "propagate"]), st.just("ignore"), 10),
    patterns=st.lists(st.sampled_from(["closure", "seed", "two_steps"]), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_sam_class(
    tensors: list[torch.Tensor],
    frozen: list[bool],
    defaults: GroupOptions,
    second_group: GroupOptions | None,
    base: BaseOptimizer,
    nonfinite: str,
    patterns: list[str],
    seed: int,
) -> None:
    """samfunc.SAM around torch.optim optimizers, stepped in each documented way."""
    tried("sam_class")
    starts = [t.clone() for t in tensors]  # the parameters share the tensors' memory
    params = [
        torch.nn.Parameter(t, requires_grad=index == 0 or not frozen[index])
        for index, t in enumerate(tensors)
    ]
    groups: Any = params
    invalid = defaults.errors("SAM(...)")
    invalid += [] if nonfinite in ("raise", "skip", "propagate") else [f"nonfinite={nonfinite}"]
    if second_group is not None and len(params) > 1:
        groups = [{"params": params[:1]}, {"params": params[1:], **second_group._asdict()}]
        invalid += second_group.errors("param_groups[1]")
    batch = make_batch(3, seed)
    inputs = Inputs(batch=batch)

    def run() -> samfunc.SAM:
        optimizer = samfunc.SAM(
            groups,
            base.cls,
            rho=defaults.rho,
            adaptive=defaults.adaptive,
            eta=defaults.eta,
            nonfinite=nonfinite,
            **base.kwargs,
        )
        closure = sam_closure(optimizer, params, batch)
        for pattern in patterns:
            if pattern == "closure":
                optimizer.step(closure)
            elif pattern == "seed":
                closure()
                optimizer.step(closure)
            else:
                closure()
                optimizer.first_step(zero_grad=True)
                closure()
                optimizer.second_step(zero_grad=True)
        return optimizer

    result = attempt(run, origins=(SAMFUNC_SOURCE, TORCH_OPTIM_SOURCE))
    inputs.assert_unchanged()
    if not base.in_domain:
        return  # torch.optim may reject the kwargs, or accept them and diverge
    if not expect(result, invalid):
        return
    for p, t in zip(params, tensors):
        assert p.shape == t.shape and p.dtype == t.dtype
    assert_finite(params, "parameters after SAM steps")
    assert result.skipped_steps == 0
    rhos = [defaults.rho] + ([second_group.rho] if groups is not params else [])
    if all(rho == 0 for rho in rhos):  # documented: rho = 0 is the base optimizer, bitwise
        expected = base_optimizer_run(starts, params, groups, base, batch, len(patterns))
        for p, e in zip(params, expected):
            assert torch.equal(p.detach(), e.detach()), "SAM with rho=0 differs from the base"


def base_optimizer_run(
    starts: list[torch.Tensor],
    sam_params: list[torch.nn.Parameter],
    groups: Any,
    base: BaseOptimizer,
    batch: torch.Tensor,
    steps: int,
) -> list[torch.nn.Parameter]:
    """The base optimizer alone, from the same starting point, for ``steps`` steps."""
    params = [
        torch.nn.Parameter(t.clone(), requires_grad=p.requires_grad)
        for t, p in zip(starts, sam_params)
    ]
    if groups is sam_params:
        optimizer = base.cls(params, **base.kwargs)
    else:
        optimizer = base.cls([{"params": params[:1]}, {"params": params[1:]}], **base.kwargs)
    for _ in range(steps):
        optimizer.zero_grad()
        quadratic_loss(params, batch).backward()
        optimizer.step()
    return params


# --- what the properties found, fixed in samfunc since: regression tests -------------------------


def square_loss(params: Any, batch: Any) -> torch.Tensor:
    return sum_of_squares(params)


@pytest.mark.parametrize("init_value", [0.0, 1e-300])
def test_found_10_step_schedule_with_gamma_above_one_at_large_counts(init_value: float) -> None:
    """Was NaN (0 * inf) for ``step_schedule(0.0, 1, gamma=2.0)(1024)``, true value 0, and
    inf for ``step_schedule(1e-300, 1, gamma=2.0)(1024)``, true value 1.8e8 (fits float32)."""
    value = float(samfunc.step_schedule(init_value, step_size=1, gamma=2.0)(1024))
    assert math.isclose(value, geometric(init_value, 2.0, 1024), rel_tol=1e-4)


@pytest.mark.parametrize("has_aux", [1, 0, "False"])
def test_found_1_sharpness_tools_reject_flags_that_are_not_bools(has_aux: Any) -> None:
    with pytest.raises(TypeError, match="has_aux"):
        samfunc.hessian_vector_product(
            square_loss, {"w": torch.ones(2)}, None, {"w": torch.ones(2)}, has_aux=has_aux
        )


def test_found_1_random_direction_rejects_flags_that_are_not_bools() -> None:
    with pytest.raises(TypeError, match="filter_normalize"):
        samfunc.random_direction({"w": torch.ones(2, 2)}, filter_normalize="False")


def test_found_2_hessian_vector_product_of_an_expanded_leaf() -> None:
    """Was a RuntimeError from jvp: a stride-0 tensor cannot become a dual tensor."""
    params = {"w": torch.ones(1).expand(3)}
    hvp = samfunc.hessian_vector_product(square_loss, params, None, {"w": torch.ones(3)})
    torch.testing.assert_close(hvp["w"], torch.full((3,), 2.0))


@pytest.mark.parametrize(
    "kwargs",
    [{"weight_decay": None}, {"weight_decay": False}, {"dampening": 5.0}, {"dampening": math.nan}],
)
def test_found_3_sgd_rejects_weight_decay_and_dampening_on_every_path(
    kwargs: dict[str, Any],
) -> None:
    with pytest.raises((ValueError, TypeError)):
        samfunc.sgd(0.1, **kwargs)


def test_found_4_top_hessian_eigenvalue_of_params_with_no_element() -> None:
    """Was a ZeroDivisionError."""
    result = attempt(
        lambda: samfunc.top_hessian_eigenvalue(square_loss, {"w": torch.ones(0)}, None)
    )
    assert isinstance(result, Rejected) and isinstance(result.error, ValueError)


def test_found_5_random_direction_of_a_leaf_with_no_filters() -> None:
    """Was a RuntimeError: reshape(0, -1) is ambiguous."""
    direction = samfunc.random_direction({"w": torch.ones(0, 3)})
    assert direction["w"].shape == (0, 3)


def test_found_6_multistep_milestones_are_checked_before_sorting() -> None:
    """Was a TypeError from sorted() that did not name the argument."""
    result = attempt(lambda: samfunc.multistep_schedule(1.0, [1, "4"]))
    assert isinstance(result, Rejected) and "milestones" in str(result.error)


@pytest.mark.parametrize("gradient", [0.0, 1e-4])
def test_found_7_adam_stays_finite_on_float16_params(gradient: float) -> None:
    """Was NaN (zero gradient) or -inf (small gradient), as torch.optim.Adam still gives: eps
    rounded to 0 and the second moment underflowed in float16. The update is -lr or 0."""
    opt = samfunc.adam(1e-3)
    params = {"w": torch.ones(1, dtype=torch.float16)}
    updates, _ = opt.update(
        {"w": torch.full((1,), gradient, dtype=torch.float16)}, opt.init(params)
    )
    assert bool(torch.isfinite(updates["w"]).all()), updates


@pytest.mark.parametrize("init_value", [0.0, 1e-10])
def test_found_8_step_schedule_is_finite_where_its_value_fits(init_value: float) -> None:
    """Was NaN (0 * inf) and inf: gamma ** k overflowed float32 before the product."""
    value = samfunc.step_schedule(init_value, step_size=1, gamma=3.0)(81)
    assert math.isclose(float(value), init_value * 3.0**81, rel_tol=1e-4)


def test_found_9_vmapped_chunks_with_reuse_rng_and_raise() -> None:
    """Was a RuntimeError: the finite check ran a foreach op (no vmap batching rule) in vmap."""

    def loss_fn(params: Any, batch: torch.Tensor) -> torch.Tensor:
        return (params["w"] ** 2).sum() * batch.mean()

    params, batch = {"w": torch.ones(2)}, torch.ones(4)
    expected, _ = samfunc.sam_grad(loss_fn, params, batch, num_chunks=2, reuse_rng=True)
    grads, _ = samfunc.sam_grad(
        loss_fn, params, batch, num_chunks=2, reuse_rng=True, nonfinite="raise"
    )
    torch.testing.assert_close(grads, expected)
