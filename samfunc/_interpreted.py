"""A method as data, run by the interpreter: ``Interpreted``, ``method_from`` and the defaults.

``method_from(pieces)`` is the ``Method`` whose ``grad`` is the interpreter
(``samfunc._engine.interpret``) running ``pieces``: every built-in method is
one. The drivers' defaults are built here too (``sam_method``, SAM, when no
method is given; ``plain_gradient_method`` for ``sam=False``), so a driver
imports the interpreter and the base types, never the methods package.

Examples:
    >>> import torch
    >>> method = sam_method(0.05)
    >>> params = {"w": torch.tensor([3.0, 4.0])}
    >>> grads, loss, state = method.grad(
    ...     lambda p, b: (p["w"] ** 2).sum(), params, None, method.init(params)
    ... )
    >>> float(loss)
    25.0
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from typing_extensions import Unpack

from ._ascent import sam_ascent
from ._base import EngineOptions, LossFn, Method, OptState, Params, PerturbationOptions, Pieces, Rho
from ._engine import interpret
from ._options import run_options
from ._phases import IDENTITY, ascent_pieces, init_state
from ._tree import PyTree
from ._validate import check_bool

__all__ = ["Interpreted", "method_from", "sam_method", "plain_gradient_method"]


@dataclasses.dataclass(frozen=True)
class Interpreted:
    """A method's ``grad`` and ``init``: the interpreter running its ``pieces``.

    Plain data (it pickles when the pieces do), so a method object travels
    with ``pickle``, ``copy.deepcopy`` and ``torch.save``.
    """

    pieces: Pieces

    def init(self, params: Params) -> Any:
        """The method's first state."""
        return init_state(self.pieces, params)

    def __call__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Any,
        state: OptState,
        *,
        full: Optional[bool] = None,
        **options: Unpack[EngineOptions],
    ) -> tuple[PyTree, Any, Any]:
        """``(grads, loss, new_state)``; ``(grads, (loss, aux), new_state)`` with ``has_aux``.

        ``full`` forces the kind of step (True: both passes; False: one pass at
        ``w``, the gradient from the combiner's ``reuse``); None lets the
        method's policy choose (every step is full without one).
        """
        if full is not None:
            full = check_bool("full", full)
        return interpret(self.pieces, loss_fn, params, batch, state, run_options(options), full)


def method_from(pieces: Pieces) -> Method:
    """The ``Method`` that runs ``pieces`` through the interpreter."""
    interpreted = Interpreted(pieces)
    return Method(interpreted.init, interpreted, pieces)


def sam_method(rho: Rho = 0.05, **options: Unpack[PerturbationOptions]) -> Method:
    """SAM's record (``samfunc.sam``): the method a driver runs when given none."""
    return method_from(ascent_pieces("sam", sam_ascent(rho, **options)))


def plain_gradient_method() -> Method:
    """One pass at ``w`` (``samfunc.plain_gradient``): the train steps' ``sam=False``."""
    return method_from(Pieces("plain_gradient", None, IDENTITY))
