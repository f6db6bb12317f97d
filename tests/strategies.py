"""Hypothesis strategies for pytrees of tensors and optimizer hyperparameters."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from hypothesis import strategies as st

SHAPES = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


class Pair(NamedTuple):
    first: Any
    second: Any


@st.composite
def tensors(draw: st.DrawFn, dtype: torch.dtype = torch.float32, shape: Any = None) -> torch.Tensor:
    """A tensor of a drawn shape, filled from a drawn seed (cheap to shrink)."""
    shape = draw(SHAPES) if shape is None else shape
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def pytrees(dtype: torch.dtype = torch.float32, max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Nested dicts, lists, tuples and NamedTuples with at least one tensor leaf."""
    leaf = tensors(dtype)
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.dictionaries(
                st.text("abcdefgh", min_size=1, max_size=3), children, min_size=1, max_size=3
            ),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.tuples(children, children).map(lambda ab: Pair(*ab)),
        ),
        max_leaves=max_leaves,
    )


def named_parameter_dicts(dtype: torch.dtype = torch.float32) -> st.SearchStrategy[Any]:
    """Flat dicts shaped like ``dict(model.named_parameters())``."""
    names = st.sampled_from(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "norm.weight"])
    return st.dictionaries(names, tensors(dtype), min_size=1, max_size=5)


# --- fuzzing: leaves of every kind, pytrees of them, hyperparameters in and out of range ----------

#: The floating dtypes samfunc promises to handle.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Shapes with 0-d and empty (a 0 in the shape) tensors among them.
FUZZ_SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)

#: Largest magnitude of a "normal" leaf; with the hyperparameter boxes below it keeps every
#: quantity samfunc computes far from float64's range, so a float64 run must be finite.
LEAF_BOUND = 4.0
TINY_SCALE = 1e-4

SOMETIMES = st.booleans()
NEVER = st.just(False)
EMPTY_NODES = st.sampled_from([[], (), {}])
DICT_KEYS = st.text("abcdefgh", min_size=1, max_size=3)


def mostly(
    common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int = 5
) -> st.SearchStrategy[Any]:
    """``rare`` about once in ``one_in`` draws, ``common`` otherwise."""
    return st.integers(0, one_in - 1).flatmap(lambda i: rare if i == 0 else common)


#: Memory layouts: "element" is a 0-d view into a bigger tensor, "expanded" has stride 0.
LAYOUTS = ("contiguous", "element", "strided", "expanded", "transposed")


def _layouts_for(shape: tuple[int, ...]) -> list[str]:
    layouts = ["contiguous"]
    if not shape:
        layouts.append("element")  # a 0-d view into a bigger tensor
    if len(shape) >= 1:
        layouts += ["strided", "expanded"]
    if len(shape) >= 2:
        layouts.append("transposed")
    return layouts


def arrange(values: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """``values`` in ``dtype``, laid out in memory as ``layout`` says.

    Views into a bigger tensor have NaN in the elements they skip: reading outside the view
    shows up as a non-finite result.
    """
    data = values.to(dtype)
    shape = tuple(data.shape)
    if layout == "transposed":
        return data.mT.contiguous().mT
    if layout == "strided":
        bigger = torch.full((2 * shape[0], *shape[1:]), math.nan, dtype=dtype)
        bigger[::2] = data
        return bigger[::2]
    if layout == "expanded":  # stride 0 along dim 0: every row is the first one
        return data[:1].expand(shape)
    if layout == "element":
        bigger = torch.full((3,), math.nan, dtype=dtype)
        bigger[1] = data
        return bigger[1]
    return data


def _values(shape: tuple[int, ...], seed: int, magnitude: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    values = values.clamp(-LEAF_BOUND, LEAF_BOUND)
    if magnitude == "tiny":
        return values * TINY_SCALE
    if magnitude == "zeros":
        return torch.zeros(shape, dtype=torch.float64)
    return values


@st.composite
def fuzz_tensors(
    draw: st.DrawFn,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    shapes: st.SearchStrategy[tuple[int, ...]] = FUZZ_SHAPES,
    requires_grad: st.SearchStrategy[bool] = SOMETIMES,
    parameters: bool = False,
    layouts: tuple[str, ...] = LAYOUTS,
) -> torch.Tensor:
    """A tensor of any shape (0-d and empty too), dtype and memory layout.

    Values are within ``LEAF_BOUND``; some leaves are tiny or all zeros. With ``parameters``,
    about one leaf in forty is an ``nn.Parameter`` (which samfunc rejects on purpose).
    """
    shape = draw(shapes)
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from([lay for lay in _layouts_for(shape) if lay in layouts]))
    magnitude = draw(mostly(st.just("normal"), st.sampled_from(["tiny", "zeros"])))
    seed = draw(st.integers(0, 2**31 - 1))
    tensor = arrange(_values(shape, seed, magnitude), dtype, layout)
    if parameters and draw(st.integers(0, 39)) == 0:
        return torch.nn.Parameter(tensor)
    return tensor.requires_grad_(draw(requires_grad))


@st.composite
def tensors_like(
    draw: st.DrawFn, like: torch.Tensor, requires_grad: st.SearchStrategy[bool] = NEVER
) -> torch.Tensor:
    """A tensor with the shape and dtype of ``like``, new values, any layout."""
    shape = tuple(like.shape)
    layout = draw(st.sampled_from(_layouts_for(shape)))
    magnitude = draw(mostly(st.just("normal"), st.sampled_from(["tiny", "zeros"])))
    seed = draw(st.integers(0, 2**31 - 1))
    return arrange(_values(shape, seed, magnitude), like.dtype, layout).requires_grad_(
        draw(requires_grad)
    )


@st.composite
def trees_like(draw: st.DrawFn, tree: Any, requires_grad: st.SearchStrategy[bool] = NEVER) -> Any:
    """A tree with the structure, shapes and dtypes of ``tree`` (gradients, directions)."""
    leaves, spec = pytree.tree_flatten(tree)
    return pytree.tree_unflatten([draw(tensors_like(leaf, requires_grad)) for leaf in leaves], spec)


def _shuffled_dicts(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts whose keys come in a drawn order (not sorted, not the order they were drawn in)."""
    dicts = st.dictionaries(DICT_KEYS, children, min_size=1, max_size=3)
    return dicts.flatmap(lambda d: st.permutations(list(d.items())).map(dict))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    child = mostly(children, EMPTY_NODES, one_in=10)
    return st.one_of(
        _shuffled_dicts(child),
        st.lists(child, min_size=1, max_size=3),
        st.lists(child, min_size=1, max_size=3).map(tuple),
        st.tuples(child, child).map(lambda ab: Pair(*ab)),
    )


@st.composite
def _maybe_tied(draw: st.DrawFn, tree: Any) -> Any:
    """Sometimes one leaf is the same tensor object as another (tied weights)."""
    leaves, spec = pytree.tree_flatten(tree)
    if len(leaves) < 2 or draw(st.integers(0, 4)) != 0:
        return tree
    source, target = draw(st.permutations(range(len(leaves))))[:2]
    leaves[target] = leaves[source]
    return pytree.tree_unflatten(leaves, spec)


def fuzz_pytrees(
    leaf: st.SearchStrategy[torch.Tensor] | None = None, max_leaves: int = 6
) -> st.SearchStrategy[Any]:
    """Nested dicts (keys in random order), lists, tuples and NamedTuples of fuzz tensors.

    Empty containers may sit among the children and two leaves may be one tensor; every
    tree has at least one tensor leaf.
    """
    leaf = fuzz_tensors() if leaf is None else leaf
    trees = st.recursive(leaf, _containers, max_leaves=max_leaves).flatmap(_maybe_tied)
    return trees.filter(lambda tree: len(pytree.tree_leaves(tree)) > 0)


class Interval(NamedTuple):
    """A hyperparameter's documented domain, and the box valid draws come from.

    The box keeps valid values small enough that float64 arithmetic stays finite.
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    box: tuple[float, float] = (-10.0, 10.0)

    def contains(self, value: Any) -> bool:
        """Whether samfunc must accept ``value`` (a finite real number in the domain)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < self.high if self.high_open else value <= self.high
        return above_low and below_high


NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NOT_NUMBERS = st.sampled_from([None, "0.1", True, False, [0.1]])


class Arg(NamedTuple):
    """The values an argument may take: ``valid`` ones and ``invalid`` ones."""

    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any]

    def mixed(self, one_in: int = 8) -> st.SearchStrategy[Any]:
        """Valid values, and an invalid one about once in ``one_in`` draws."""
        return mostly(self.valid, self.invalid, one_in)


@st.composite
def _one_broken(draw: st.DrawFn, build: Any, args: dict[str, Any]) -> Any:
    values = {name: draw(arg.valid if isinstance(arg, Arg) else arg) for name, arg in args.items()}
    breakable = sorted(name for name, arg in args.items() if isinstance(arg, Arg))
    if breakable and draw(st.integers(0, 3)) == 3:
        name = draw(st.sampled_from(breakable))
        values[name] = draw(args[name].invalid)
    return build(**values)


def at_most_one_invalid(build: Any, **args: Any) -> st.SearchStrategy[Any]:
    """``build(**values)`` with valid values, except, in one draw of four, one invalid ``Arg``.

    Arguments given as plain strategies are drawn as they are. One broken argument at a time
    keeps most draws valid however many arguments a call has, and each error is met alone.
    """
    return _one_broken(build, args)


def hyperparameter_args(domain: Interval, numbers_only: bool = False) -> Arg:
    """Values in ``domain`` (within its box); out of range, non-finite or not numbers."""
    low = max(domain.low, domain.box[0])
    high = min(domain.high, domain.box[1])
    inside = st.floats(
        low,
        high,
        exclude_min=domain.low_open and low == domain.low,
        exclude_max=domain.high_open and high == domain.high,
    )
    edges = [v for v in (domain.low, domain.high, 0, 1) if domain.contains(v)]
    valid = st.one_of(inside, st.sampled_from(edges)) if edges else inside
    outside: list[st.SearchStrategy[Any]] = (
        [NON_FINITE] if numbers_only else [NON_FINITE, NOT_NUMBERS]
    )
    if math.isfinite(domain.low):  # just below the domain (or at an open end)
        outside.append(st.floats(domain.low - 10, domain.low, exclude_max=not domain.low_open))
    if math.isfinite(domain.high):
        outside.append(st.floats(domain.high, domain.high + 10, exclude_min=not domain.high_open))
    return Arg(valid, st.one_of(outside))


def hyperparameters(domain: Interval, numbers_only: bool = False) -> st.SearchStrategy[Any]:
    """Mostly values in ``domain`` (within its box), sometimes out of range or not numbers."""
    return hyperparameter_args(domain, numbers_only).mixed()


def positive_int_args(high: int = 5) -> Arg:
    return Arg(st.integers(1, high), st.sampled_from([0, -1, 2.0, True, "2"]))


def positive_ints(high: int = 5) -> st.SearchStrategy[Any]:
    """Mostly ints in ``[1, high]``; sometimes 0, negative, a float or a bool."""
    return positive_int_args(high).mixed()


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


#: Bools; or values that are truthy or falsy without being bools.
FLAG_ARG = Arg(st.booleans(), st.sampled_from([0, 1, "False", None]))


def flags() -> st.SearchStrategy[Any]:
    return FLAG_ARG.mixed(one_in=10)


# Documented domains of the hyperparameters, each with the box valid draws come from.
INF = math.inf
LEARNING_RATE = Interval(0.0, INF, box=(0.0, 10.0))
MOMENTUM = Interval(0.0, 1.0, high_open=True)
DAMPENING = Interval(0.0, 1.0)
BETA = Interval(0.0, 1.0, high_open=True)
EPS = Interval(0.0, INF, low_open=True, box=(1e-12, 1.0))  # a tiny eps makes g / eps overflow
WEIGHT_DECAY = Interval(0.0, INF, box=(0.0, 1.0))
MAX_NORM = Interval(0.0, INF, low_open=True, box=(0.0, 10.0))
REAL = Interval(-INF, INF)
GAMMA = Interval(0.0, INF, low_open=True, box=(0.0, 3.0))
ALPHA = Interval(0.0, INF, box=(0.0, 2.0))
RHO = Interval(0.0, INF, box=(0.0, 10.0))
ETA = Interval(0.0, INF, box=(0.0, 10.0))
STEP_SIZE = Interval(0.0, INF, low_open=True, box=(0.0, 10.0))


class Recipe(NamedTuple):
    """A samfunc call written down (``name`` and its keyword arguments), built by the test.

    Arguments may be recipes themselves; building may raise, which the test checks.
    """

    name: str
    kwargs: dict[str, Any]

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.name}({args})"


class MaskRecipe(NamedTuple):
    """A mask over a tree's leaves: leaf ``i`` is selected if ``bits[i % len(bits)]``.

    ``kind`` is how it is given: a ``"predicate"`` on key paths, a ``"tree"`` of bools, or
    one of the invalid ``"ints"`` (a tree of 0/1), ``"wrong_structure"`` (one bool too many)
    and ``"reordered"`` (a tree of bools whose first dict has its keys in another order).
    """

    kind: str
    bits: tuple[bool, ...]


VALID_MASK_KINDS = ("predicate", "tree")
INVALID_MASK_KINDS = ("ints", "wrong_structure", "reordered")


def mask_recipes(kinds: tuple[str, ...] = VALID_MASK_KINDS) -> st.SearchStrategy[MaskRecipe]:
    bit = st.integers(0, 3).map(lambda i: i != 0)  # mostly True: masks seldom select nothing
    bits = st.lists(bit, min_size=1, max_size=4).map(tuple)
    return st.builds(MaskRecipe, st.sampled_from(kinds), bits)


#: ``mask=``: None (every leaf) or a mask; invalid: ints, the wrong structure, keys reordered.
MASK_ARG = Arg(st.one_of(st.none(), mask_recipes()), mask_recipes(INVALID_MASK_KINDS))
#: ASAM's ``adaptive``: a bool or a mask; invalid: neither, or an invalid mask.
ADAPTIVE_ARG = Arg(
    st.one_of(st.booleans(), mask_recipes()),
    st.one_of(mask_recipes(INVALID_MASK_KINDS), st.sampled_from(["False", None, 1])),
)
NORM_ARG = Arg(st.sampled_from(["l2", "none", "inf"]), st.sampled_from(["L2", "linf", None, 2]))


@st.composite
def radius_tensors(draw: st.DrawFn, values: st.SearchStrategy[float]) -> torch.Tensor:
    """0-d tensors of every float dtype, some requiring grad."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    return torch.tensor(draw(values), dtype=dtype).requires_grad_(draw(st.booleans()))


#: SAM's ``rho``: a float or a 0-d tensor; invalid: out of range, or a 1-d or integer tensor.
RADIUS_ARG = Arg(
    st.one_of(hyperparameter_args(RHO).valid, radius_tensors(st.floats(0.0, RHO.box[1]))),
    st.one_of(
        hyperparameter_args(RHO).invalid,
        radius_tensors(st.sampled_from([-0.5, math.nan, math.inf])),
        st.sampled_from([torch.full((2,), 0.05), torch.tensor(1)]),
    ),
)


def radii() -> st.SearchStrategy[Any]:
    return RADIUS_ARG.mixed()


def is_valid_radius(rho: Any) -> bool:
    if isinstance(rho, torch.Tensor):
        if rho.ndim != 0 or not rho.is_floating_point():
            return False
        return RHO.contains(float(rho.detach()))
    return RHO.contains(rho)


# --- recipes: schedules, transforms and optimizers with drawn (and sometimes invalid) arguments ---


def recipe(name: str, **args: st.SearchStrategy[Any]) -> st.SearchStrategy[Recipe]:
    """``Recipe(name, kwargs)`` with each keyword argument drawn from its strategy."""
    return st.fixed_dictionaries(args).map(lambda kwargs: Recipe(name, kwargs))


def _ints_at_least_zero() -> st.SearchStrategy[Any]:
    return mostly(st.integers(0, 20), st.sampled_from([-1, 1.5, "3"]))


def _milestones() -> st.SearchStrategy[Any]:
    milestone = mostly(st.integers(0, 30), st.sampled_from([-2, 2.5, "4"]), one_in=10)
    return st.lists(milestone, max_size=3)


def _simple_schedules() -> dict[str, st.SearchStrategy[Recipe]]:
    value = hyperparameters(REAL)
    return {
        "constant": recipe("constant", value=value),
        "linear": recipe(
            "linear",
            init_value=value,
            end_value=value,
            transition_steps=positive_ints(20),
            transition_begin=_ints_at_least_zero(),
        ),
        "cosine": recipe(
            "cosine", init_value=value, decay_steps=positive_ints(20), alpha=hyperparameters(ALPHA)
        ),
        "step": recipe(
            "step", init_value=value, step_size=positive_ints(20), gamma=hyperparameters(GAMMA)
        ),
        "multistep": recipe(
            "multistep", init_value=value, milestones=_milestones(), gamma=hyperparameters(GAMMA)
        ),
        "warmup_cosine": recipe(
            "warmup_cosine",
            init_value=value,
            peak_value=value,
            warmup_steps=positive_ints(10),
            decay_steps=positive_ints(30),
            end_value=value,
        ),
    }


@st.composite
def _joined(draw: st.DrawFn, children: st.SearchStrategy[Recipe]) -> Recipe:
    schedules = draw(st.lists(children, min_size=1, max_size=3))
    count = len(schedules) - 1
    valid = st.lists(st.integers(0, 30), min_size=count, max_size=count).map(sorted)
    invalid = st.one_of(
        st.lists(st.integers(0, 30), min_size=count + 1, max_size=count + 1),  # one too many
        st.lists(st.integers(-5, 30), min_size=count, max_size=count),  # any order, negatives
    )
    boundaries = draw(mostly(valid, invalid))
    return Recipe("join", {"schedules": schedules, "boundaries": boundaries})


SCHEDULE_NAMES = (*_simple_schedules(), "join")


def schedule_recipes(name: str | None = None) -> st.SearchStrategy[Recipe]:
    """A schedule (``name``'s, or any), ``join_schedules`` of schedules included."""
    simple = _simple_schedules()
    any_schedule = st.recursive(st.one_of(*simple.values()), _joined, max_leaves=4)
    if name is None:
        return any_schedule
    return _joined(any_schedule) if name == "join" else simple[name]


def learning_rates() -> st.SearchStrategy[Any]:
    """A learning rate: mostly a number, sometimes a schedule."""
    return mostly(hyperparameters(LEARNING_RATE), schedule_recipes())


def _simple_transforms() -> dict[str, st.SearchStrategy[Recipe]]:
    beta, eps = hyperparameters(BETA), hyperparameters(EPS)
    decay = hyperparameters(WEIGHT_DECAY)
    return {
        "trace": recipe(
            "trace",
            decay=hyperparameters(MOMENTUM),
            dampening=mostly(st.just(0.0), hyperparameters(DAMPENING), 2),
            nesterov=flags(),
        ),
        "scale_by_adam": recipe("scale_by_adam", b1=beta, b2=beta, eps=eps),
        "clip_by_global_norm": recipe("clip_by_global_norm", max_norm=hyperparameters(MAX_NORM)),
        "add_decayed_weights": recipe("add_decayed_weights", weight_decay=decay),
        "decoupled_weight_decay": recipe(
            "decoupled_weight_decay", learning_rate=learning_rates(), weight_decay=decay
        ),
        "scale": recipe("scale", step_size=hyperparameters(REAL)),
        "scale_by_learning_rate": recipe(
            "scale_by_learning_rate", learning_rate=learning_rates(), flip_sign=flags()
        ),
        "scale_by_schedule": recipe("scale_by_schedule", step_size_fn=schedule_recipes()),
        "identity": st.just(Recipe("identity", {})),
    }


def _combinators(inner: st.SearchStrategy[Recipe]) -> dict[str, st.SearchStrategy[Recipe]]:
    return {
        "masked": recipe(
            "masked", inner=inner, mask=mostly(mask_recipes(), mask_recipes(INVALID_MASK_KINDS))
        ),
        "chain": recipe("chain", transforms=st.lists(inner, min_size=0, max_size=3)),
        "apply_if_finite": recipe("apply_if_finite", inner=inner),
    }


TRANSFORM_NAMES = (*_simple_transforms(), "masked", "chain", "apply_if_finite")


def transform_recipes(name: str | None = None) -> st.SearchStrategy[Recipe]:
    """A transform (``name``'s, or any); combinators take any transform, nested."""
    simple = _simple_transforms()
    any_transform = st.recursive(
        st.one_of(*simple.values()),
        lambda inner: st.one_of(*_combinators(inner).values()),
        max_leaves=4,
    )
    if name is None:
        return any_transform
    return simple[name] if name in simple else _combinators(any_transform)[name]


OPTIMIZER_NAMES = ("sgd", "adam", "adamw")


def optimizer_recipes(name: str | None = None) -> st.SearchStrategy[Recipe]:
    """``sgd``, ``adam`` or ``adamw`` with drawn (sometimes invalid) hyperparameters."""
    if name is None:
        return st.one_of(*(optimizer_recipes(n) for n in OPTIMIZER_NAMES))
    decay = mostly(st.just(0.0), hyperparameters(WEIGHT_DECAY), 2)
    if name == "sgd":
        return recipe(
            "sgd",
            learning_rate=learning_rates(),
            momentum=mostly(st.just(0.0), hyperparameters(MOMENTUM), 2),
            dampening=mostly(st.just(0.0), hyperparameters(DAMPENING), 2),
            nesterov=flags(),
            weight_decay=decay,
        )
    beta = hyperparameters(BETA)
    return recipe(
        name,
        learning_rate=learning_rates(),
        b1=beta,
        b2=beta,
        eps=hyperparameters(EPS),
        weight_decay=decay,
    )
