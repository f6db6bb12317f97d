"""Pytree helpers: the only module in samfunc that walks parameter trees.

A *pytree* here is anything ``torch.utils._pytree`` can flatten: a tensor, or
dicts, lists, tuples and NamedTuples nesting tensors. The arithmetic helpers
work on the flat list of leaves with ``torch._foreach_*`` ops, so one call
handles every leaf at once instead of a Python loop of small kernels.

Examples:
    >>> import torch
    >>> from samfunc import _tree
    >>> tree = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    >>> float(_tree.global_norm(tree))
    5.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, Union

import torch
import torch.utils._pytree as pytree

PyTree = Any
T = TypeVar("T")

#: A boolean mask over a tree: a tree of bools with the tree's structure, or a
#: predicate ``(path, leaf) -> bool`` on each leaf's dotted key path.
Mask = Union[PyTree, Callable[[str, torch.Tensor], bool]]

__all__ = [
    "PyTree",
    "Mask",
    "DictSpec",
    "Position",
    "Spec",
    "leaves",
    "flatten",
    "unflatten",
    "tree_map",
    "key_paths",
    "check_same_structure",
    "first_difference",
    "check_same_shapes",
    "check_detached",
    "detached",
    "find_leaf",
    "fused_ops",
    "global_norm",
    "vdot",
    "all_finite",
    "norm_is_finite",
    "where",
    "mul_leaves",
    "mul_lists",
    "add_leaves",
    "add_scaled",
    "scale",
    "is_dtensor",
    "copy_into",
    "scalar_like",
    "zeros_like",
    "resolve_mask",
    "select",
    "merge",
]


class Position(str):
    """A key that is a parameter's position, not its name (``samfunc.SAM`` without names).

    A mask predicate reads names; given positions it would select by accident,
    so ``resolve_mask`` refuses a predicate over them.
    """


#: The tensor types of ordinary leaves (never a DTensor: no torch.distributed import to check).
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})


class DictSpec:
    """The structure of a flat ``dict`` of tensors (the usual parameter tree): its keys.

    The common case gets this light spec instead of a ``TreeSpec``, so
    flattening and unflattening it costs no walk through ``torch.utils._pytree``
    (on a small model that walk was most of samfunc's time per step). The
    leaves and their order are the same: a dict flattens in insertion order.
    """

    __slots__ = ("keys",)

    def __init__(self, keys: tuple[Any, ...]) -> None:
        self.keys = keys


Spec = Union[pytree.TreeSpec, DictSpec]


def _is_flat_dict(tree: Any) -> bool:
    if type(tree) is not dict:
        return False
    if set(map(type, tree.values())) <= _PLAIN:  # the usual case, in C
        return True
    return all(isinstance(v, torch.Tensor) for v in tree.values())


def leaves(tree: PyTree) -> list[Any]:
    """Returns the leaves of ``tree`` in flattening order."""
    if _is_flat_dict(tree):
        return list(tree.values())
    return pytree.tree_leaves(tree)


def flatten(tree: PyTree) -> tuple[list[Any], Spec]:
    """Returns ``(leaves, spec)``; ``unflatten`` inverts it."""
    if _is_flat_dict(tree):
        return list(tree.values()), DictSpec(tuple(tree))
    return pytree.tree_flatten(tree)


def unflatten(leaves_: Sequence[Any], spec: Spec) -> PyTree:
    """Builds a tree of structure ``spec`` from ``leaves_``."""
    if isinstance(spec, DictSpec):
        return dict(zip(spec.keys, leaves_))
    return pytree.tree_unflatten(list(leaves_), spec)


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Maps ``fn`` over the leaves of ``tree`` and of trees with its structure.

    Examples:
        >>> import torch
        >>> tree_map(torch.add, [torch.ones(1)], [torch.ones(1)])
        [tensor([2.])]
    """
    if _is_flat_dict(tree) and all(
        _is_flat_dict(other) and other.keys() == tree.keys() for other in rest
    ):
        return {k: fn(v, *(other[k] for other in rest)) for k, v in tree.items()}
    return pytree.tree_map(fn, tree, *rest)


def _path_entry(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def key_paths(tree: PyTree) -> list[str]:
    """Returns each leaf's dotted key path, e.g. ``"layers.0.weight"``."""
    if _is_flat_dict(tree):
        return [key if isinstance(key, str) else str(key) for key in tree]
    with_path, _ = pytree.tree_flatten_with_path(tree)
    return [".".join(_path_entry(e) for e in path) for path, _ in with_path]


def _node_name(spec: pytree.TreeSpec) -> str:
    if spec.is_leaf():
        return "a leaf"
    return getattr(spec.type, "__name__", str(spec.type))


def _spec_difference(
    a: pytree.TreeSpec, b: pytree.TreeSpec, path: str, names: tuple[str, str]
) -> str | None:
    """Describes the first node, in flattening order, where two specs differ."""
    where = path or "<root>"
    if a.is_leaf() and b.is_leaf():
        return None
    if a.type is not b.type or a.is_leaf() != b.is_leaf():
        return f"at {where}: {_node_name(a)} vs {_node_name(b)}"
    if isinstance(a.context, list) and a.context != b.context:
        prefix = f"{path}." if path else ""
        for key in a.context:
            if key not in b.context:
                return f"at {prefix}{key}: in {names[0]} but not in {names[1]}"
        for key in b.context:
            if key not in a.context:
                return f"at {prefix}{key}: in {names[1]} but not in {names[0]}"
        return f"at {where}: keys in different order"
    if a.num_children != b.num_children:
        return f"at {where}: {a.num_children} vs {b.num_children} children"
    keys = a.context if isinstance(a.context, list) else range(a.num_children)
    fields = getattr(a.context, "_fields", None)
    if fields is not None:
        keys = fields
    for key, a_child, b_child in zip(keys, a.children(), b.children()):
        child_path = f"{path}.{key}" if path else str(key)
        found = _spec_difference(a_child, b_child, child_path, names)
        if found is not None:
            return found
    return None


def first_difference(a: PyTree, b: PyTree, names: tuple[str, str]) -> str | None:
    """Describes the first key path where the structures of ``a`` and ``b`` differ."""
    if _is_flat_dict(a) and _is_flat_dict(b) and tuple(a) == tuple(b):
        return None  # the usual case, without a walk: the same keys in the same order
    a_spec, b_spec = pytree.tree_structure(a), pytree.tree_structure(b)
    if a_spec == b_spec:
        return None
    return _spec_difference(a_spec, b_spec, "", names) or "somewhere"


def check_same_structure(
    reference: PyTree, other: PyTree, reference_name: str, other_name: str
) -> None:
    """Raises ``ValueError`` naming the first key path where the trees differ.

    Examples:
        >>> import torch
        >>> check_same_structure({"a": torch.ones(1)}, {"a": torch.ones(1)}, "params", "grads")
    """
    where = first_difference(reference, other, (reference_name, other_name))
    if where is not None:
        raise ValueError(
            f"{other_name} must have the same tree structure as {reference_name}; "
            f"they differ {where}"
        )


def check_same_shapes(
    reference: PyTree, other: PyTree, reference_name: str, other_name: str
) -> None:
    """``check_same_structure``, then the same shape leaf by leaf (no broadcasting).

    Python-side only (shapes are static under ``torch.compile``), so a compiled
    graph runs it once, when it is traced.

    Examples:
        >>> import torch
        >>> check_same_shapes({"b": torch.ones(2)}, {"b": torch.ones(3)}, "params", "updates")
        Traceback (most recent call last):
        ...
        ValueError: updates must have the shapes of params; at b: (3,) vs (2,)
    """
    check_same_structure(reference, other, reference_name, other_name)
    pairs = list(zip(leaves(reference), leaves(other)))
    for index, (ref, leaf) in enumerate(pairs):
        if getattr(ref, "shape", None) != getattr(leaf, "shape", None):
            path = key_paths(reference)[index]  # paths only on the error path
            raise ValueError(
                f"{other_name} must have the shapes of {reference_name}; "
                f"at {path or '<root>'}: {_shape_text(leaf)} vs {_shape_text(ref)}"
            )


def _shape_text(leaf: Any) -> str:
    shape = getattr(leaf, "shape", None)
    return str(tuple(shape)) if shape is not None else type(leaf).__name__


def check_detached(params: PyTree, name: str) -> None:
    """Rejects ``nn.Parameter`` leaves: a functional loop over them leaks memory.

    ``dict(model.named_parameters())`` keeps each leaf attached to autograd, so
    every step's result would chain onto the previous step's graph, two
    forward-backward passes per step, and memory would grow until it ran out.
    """
    found = find_leaf(
        params, lambda leaf: isinstance(leaf, torch.nn.Parameter) and leaf.requires_grad
    )
    if found is not None:
        raise ValueError(
            f"{name} hold an nn.Parameter that requires grad at {found[0]}: each step "
            "would chain onto the previous step's autograd graph and memory would grow "
            "without bound. Pass detached tensors: samfunc.module_params(model) or "
            "{k: v.detach() for k, v in model.named_parameters()}. (To differentiate "
            "through the step on purpose, pass tensors computed from the parameters.)"
        )


def find_leaf(tree: PyTree, predicate: Callable[[Any], bool]) -> tuple[str, Any] | None:
    """``(key path, leaf)`` of the first leaf for which ``predicate`` holds, else None.

    Key paths are computed only when a leaf is found (checks on the hot path
    cost one pass over the leaves).

    Examples:
        >>> import torch
        >>> find_leaf({"a": torch.ones(1), "b": torch.ones(2)}, lambda t: t.numel() == 2)
        ('b', tensor([1., 1.]))
    """
    for index, leaf in enumerate(leaves(tree)):
        if predicate(leaf):
            return key_paths(tree)[index] or "<root>", leaf
    return None


def fused_ops() -> bool:
    """Whether ``torch._foreach_*`` ops can run here: not inside a function transform.

    ``torch.func.vmap`` has no batching rule for foreach ops, so inside any
    functorch transform (and while ``torch.compile`` traces, where the level
    cannot be read and inductor fuses per-leaf ops itself) the helpers below
    use per-leaf ops instead. Callers never choose.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.maybe_current_level() is None


def global_norm(tree: PyTree) -> torch.Tensor:
    """Returns the L2 norm of all leaves together, as a 0-d tensor.

    The per-leaf norms come from one fused ``torch._foreach_norm`` per device.
    They are accumulated in float32 whatever the leaves' dtype (float64 when
    a leaf is float64), and leaves on several devices are reduced on the
    device of the first leaf.

    Examples:
        >>> import torch
        >>> float(global_norm([torch.tensor([3.0]), torch.tensor([4.0])]))
        5.0
    """
    tensors = leaves(tree)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norm: torch.Tensor = torch.linalg.vector_norm(
        _leaf_norms(tensors, 2, _accumulation_dtype(tensors))
    )
    return norm


def _accumulation_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32: what sums over a tree use."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def vdot(a: PyTree, b: PyTree, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The inner product ``<a, b>`` over every leaf of two trees of one structure.

    Accumulated in ``dtype``: by default float32, or float64 when a leaf of
    ``a`` is float64 (as ``global_norm``).

    Examples:
        >>> import torch
        >>> float(vdot([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])]))
        11.0
    """
    a_leaves, b_leaves = leaves(a), leaves(b)
    wide = _accumulation_dtype(a_leaves) if dtype is None else dtype
    both = [*a_leaves, *b_leaves]
    if _plain_on_one_device(both) and all(t.dtype == wide for t in both):  # one op for all
        rows = [x.reshape(1, -1) for x in a_leaves]
        columns = [y.reshape(-1, 1) for y in b_leaves]
        return torch.cat(torch._foreach_mm(rows, columns)).sum()
    terms = [(x.to(wide) * y.to(wide)).sum() for x, y in zip(a_leaves, b_leaves)]
    return torch.stack(terms).sum()


def _by_device(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by device, in order of first appearance (one foreach call each)."""
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return list(groups.values())


def _leaf_norms(
    tensors: Sequence[torch.Tensor], ord: float, dtype: torch.dtype | None
) -> torch.Tensor:
    """Each leaf's norm (one fused ``_foreach_norm`` per device), on the first leaf's device."""
    home = tensors[0].device
    fused = fused_ops()
    if fused and all(t.device == home for t in tensors):  # one device: one call, no move
        return torch.stack(list(torch._foreach_norm(list(tensors), ord, dtype=dtype)))
    stacks = []
    for device_tensors in _by_device(tensors):
        if fused:
            norms = torch._foreach_norm(device_tensors, ord, dtype=dtype)
        else:
            norms = tuple(torch.linalg.vector_norm(t, ord, dtype=dtype) for t in device_tensors)
        stacks.append(torch.stack(list(norms)).to(home))
    return stacks[0] if len(stacks) == 1 else torch.cat(stacks)


def all_finite(tree: PyTree) -> torch.Tensor:
    """A 0-d bool tensor: True when every element of every leaf is finite.

    Exact, with no device sync: ``0 * x`` is 0 for a finite ``x`` and NaN for
    an inf or NaN, so the largest element of ``0 * leaf`` (one fused
    ``torch._foreach_max``) is 0 exactly when the leaf is finite; finite values
    of any size count as finite (no norm to overflow). Empty leaves count as
    finite. Where a sync is fine, ``norm_is_finite`` first is cheaper.

    Examples:
        >>> import torch
        >>> bool(all_finite({"w": torch.tensor([1.0, -float("inf")])}))
        False
        >>> huge = {"w": torch.full((1000,), 3e38), "v": torch.tensor([1e300], dtype=torch.float64)}
        >>> bool(all_finite(huge))
        True
    """
    tensors = [t for t in leaves(tree) if t.numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    home = tensors[0].device
    flags = []
    fused = fused_ops()  # also: Dynamo cannot trace _foreach_max
    for device_tensors in _by_device(tensors):
        if fused:
            maxima = torch._foreach_max(torch._foreach_mul(device_tensors, 0.0))
        else:
            maxima = tuple((t * 0.0).max() for t in device_tensors)
        flags.append(torch.isfinite(torch.stack(list(maxima))).all().to(home))
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


#: Up to this many elements ``norm_is_finite`` runs GradScaler's fused check (it reads and
#: writes each element once); beyond, the norm (read only) was faster (2 CPU cores: 1.2x at
#: 4.3M elements, while the fused check was 1.3x faster at 0.3M and 3x at 9K).
FUSED_CHECK_MAX = 1 << 20


def norm_is_finite(tree: PyTree) -> bool:
    """Whether every element of ``tree`` is finite, read on the host (a device sync).

    Eager, over plain dense tensors on one device of up to ``FUSED_CHECK_MAX``
    elements, it is one fused kernel
    (``torch._amp_foreach_non_finite_check_and_unscale_``, ``GradScaler``'s
    check, with a scale of 1: it rewrites each element as itself) and one read;
    beyond that, where memory traffic outweighs the ops, and elsewhere, the
    global L2 norm (fused, read only) is finite only if every element is;
    only when it is not (a NaN or inf, or a norm beyond float32) does the exact
    ``all_finite`` run. Either way finite values of any size pass.

    Examples:
        >>> import torch
        >>> norm_is_finite({"w": torch.tensor([1.0, 3e38]), "b": torch.tensor([2.0])})
        True
        >>> norm_is_finite([torch.tensor([1.0, float("nan")])])
        False
    """
    tensors = leaves(tree)
    if (
        _plain_on_one_device(tensors)
        and all(map(_rewritable, tensors))
        and sum(t.numel() for t in tensors) <= FUSED_CHECK_MAX
    ):
        found = torch.zeros(1, device=tensors[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, found.new_ones(()))
        return not bool(found)
    return bool(torch.isfinite(global_norm(tree))) or bool(all_finite(tree))


def _plain_on_one_device(tensors: Sequence[torch.Tensor]) -> bool:
    """Plain tensors (no subclass) on one device, outside transforms: one fused op takes them."""
    if not tensors or not fused_ops():
        return False
    device = tensors[0].device
    return all(type(t) is torch.Tensor and t.device == device for t in tensors)


def _rewritable(t: torch.Tensor) -> bool:
    """Whether a fused op may rewrite ``t`` in place: dense, floating, contiguous, no autograd.

    Contiguous (an expanded gradient shares memory between elements), outside
    autograd (no version counter a graph would check) and not an inference tensor.
    """
    return (
        t.layout == torch.strided
        and t.is_floating_point()
        and t.is_contiguous()
        and not t.requires_grad
        and not t.is_inference()
    )


def where(condition: torch.Tensor, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where the 0-d bool ``condition`` is True, else ``old``, leaf by leaf.

    No device sync and no Python branch on the value, so a compiled step can
    keep or drop a whole update. Non-tensor leaves come from ``new``. Eager on
    the CPU, where reading the flag is free, it returns ``new`` or ``old`` whole.

    Examples:
        >>> import torch
        >>> where(torch.tensor(False), {"w": torch.ones(1)}, {"w": torch.zeros(1)})
        {'w': tensor([0.])}
    """
    if condition.device.type == "cpu" and fused_ops():
        # Eager on the CPU, reading the flag costs nothing (no device to wait
        # for), and choosing a whole tree beats a torch.where per leaf.
        return new if bool(condition) else old
    new_leaves, spec = flatten(new)
    chosen = [
        torch.where(condition.to(n.device), n, o)
        if isinstance(n, torch.Tensor) and n is not o
        else n
        for n, o in zip(new_leaves, leaves(old))
    ]
    return unflatten(chosen, spec)


def mul_leaves(tensors: Sequence[torch.Tensor], factor: float | torch.Tensor) -> list[torch.Tensor]:
    """``[factor * t for t in tensors]``, fused where ``fused_ops()``.

    A tensor ``factor`` is moved to each leaf's device when they differ.
    """
    if isinstance(factor, torch.Tensor) and any(t.device != factor.device for t in tensors):
        return [t * factor.to(t.device) for t in tensors]
    if fused_ops():
        return list(torch._foreach_mul(list(tensors), factor))
    return [t * factor for t in tensors]


def mul_lists(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[x * y for x, y in zip(a, b)]``, fused where ``fused_ops()``."""
    if fused_ops():
        return list(torch._foreach_mul(list(a), list(b)))
    return [x * y for x, y in zip(a, b)]


def add_leaves(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[x + y for x, y in zip(a, b)]``, fused where ``fused_ops()``."""
    if fused_ops():
        return list(torch._foreach_add(list(a), list(b)))
    return [x + y for x, y in zip(a, b)]


def add_scaled(tree: PyTree, other: PyTree, factor: float | torch.Tensor) -> PyTree:
    """Returns ``tree + factor * other`` leafwise, out of place.

    ``factor`` may be a Python number or a 0-d tensor (so it can change
    between calls under ``torch.compile`` without a recompile).
    """
    a, spec = flatten(tree)
    b = leaves(other)
    if isinstance(factor, torch.Tensor) or not fused_ops():
        return unflatten(add_leaves(a, mul_leaves(b, factor)), spec)
    return unflatten(torch._foreach_add(a, b, alpha=factor), spec)


def scale(tree: PyTree, factor: float | torch.Tensor) -> PyTree:
    """Returns ``factor * tree`` leafwise, out of place."""
    a, spec = flatten(tree)
    if not a:
        return tree
    return unflatten(mul_leaves(a, factor), spec)


def is_dtensor(leaf: Any) -> bool:
    """Whether ``leaf`` is a ``torch.distributed.tensor.DTensor`` (FSDP2, tensor parallel)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(leaf, DTensor)


def copy_into(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``target.copy_(source)`` for each pair, in place.

    One fused ``torch._foreach_copy_``, except for DTensors (FSDP2's sharded
    parameters), for which that op has no sharding strategy: one copy each.
    """
    _in_place(torch._foreach_copy_, torch.Tensor.copy_, targets, sources)


def add_into(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``target.add_(source)`` for each pair, in place (one fused op; one each for DTensors)."""
    _in_place(torch._foreach_add_, torch.Tensor.add_, targets, sources)


def _in_place(
    fused: Callable[..., Any],
    each: Callable[..., Any],
    targets: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
) -> None:
    """``fused(targets, sources)``, or ``each(target, source)`` per pair where one is a DTensor.

    DTensors (FSDP2's sharded parameters) have no sharding strategy for the
    foreach ops.
    """
    if any(type(t) not in _PLAIN and is_dtensor(t) for t in targets):
        for target, source in zip(targets, sources):
            each(target, source)
        return
    fused(list(targets), list(sources))


def scalar_like(reference: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor of ``reference``'s dtype and device (a number kept in state).

    A float, eager, is one ``torch.full``. A tensor, or a float the compiler
    made symbolic, is ``ones_like * value``: under ``torch.compile``
    ``torch.full`` baked a symbolic float into the graph as a constant (torch 2.13).

    Examples:
        >>> scalar_like(torch.zeros(()), 0.5)
        tensor(0.5000)
    """
    if isinstance(value, float) and not torch.compiler.is_compiling():
        return torch.full((), value, dtype=reference.dtype, device=reference.device)
    return (torch.ones_like(reference) * value).to(reference.dtype)


def detached(tree: PyTree) -> PyTree:
    """``tree`` with every tensor detached (other leaves as they are).

    The usual shapes (a tensor, a dict of tensors, a tuple or named tuple of
    those) without a pytree walk; anything else through one.

    Examples:
        >>> w = torch.ones(2, requires_grad=True)
        >>> detached({"y": w * 2})["y"].requires_grad
        False
    """
    kind = type(tree)
    if kind is torch.Tensor:
        return tree.detach()
    if kind is dict and set(map(type, tree.values())) <= {torch.Tensor}:
        return {k: v.detach() for k, v in tree.items()}
    if isinstance(tree, tuple) and (kind is tuple or hasattr(tree, "_fields")):
        items = [detached(item) for item in tree]
        return kind(*items) if kind is not tuple else tuple(items)
    return tree_map(_detach_leaf, tree)


def _detach_leaf(leaf: Any) -> Any:
    return leaf.detach() if isinstance(leaf, torch.Tensor) else leaf


def zeros_like(tree: PyTree) -> PyTree:
    """Returns a tree of zeros with the structure, shapes and dtypes of ``tree``."""
    return tree_map(torch.zeros_like, tree)


def resolve_mask(mask: Mask, tree: PyTree, name: str = "mask") -> list[bool]:
    """Turns a mask into one Python bool per leaf of ``tree``.

    Args:
        mask: a tree of bools with the structure of ``tree``, or a predicate
            ``(path, leaf) -> bool`` called with each leaf's dotted key path.
        tree: the tree the mask selects from.
        name: the argument's name, for error messages.

    Examples:
        >>> import torch
        >>> resolve_mask(lambda path, leaf: path != "b", {"w": torch.ones(1), "b": torch.ones(1)})
        [True, False]
    """
    tree_leaves = leaves(tree)
    if callable(mask) and not isinstance(mask, torch.Tensor):
        paths = key_paths(tree)
        if any(isinstance(path, Position) for path in paths):
            raise TypeError(
                f"{name} is a predicate of the parameters' names, but these parameters have "
                f"none (their keys are positions, such as {str(paths[0])!r}): build samfunc.SAM "
                "with model.named_parameters() instead of model.parameters()"
            )
        return [bool(mask(path, leaf)) for path, leaf in zip(paths, tree_leaves)]
    check_same_structure(tree, mask, "params", name)
    flags = leaves(mask)
    for path, flag in zip(key_paths(mask), flags):
        if not isinstance(flag, bool):
            raise TypeError(
                f"{name} must hold Python bools, got {type(flag).__name__} at {path or '<root>'}"
            )
    return list(flags)


def select(tree: PyTree, flags: Sequence[bool]) -> list[Any]:
    """Returns the leaves of ``tree`` whose flag is True, as a flat list."""
    return [leaf for leaf, keep in zip(leaves(tree), flags) if keep]


def merge(tree: PyTree, selected: Sequence[Any], flags: Sequence[bool]) -> PyTree:
    """Inverse of ``select``: puts ``selected`` back where ``flags`` is True."""
    tree_leaves, spec = flatten(tree)
    it = iter(selected)
    return unflatten([next(it) if keep else leaf for leaf, keep in zip(tree_leaves, flags)], spec)
