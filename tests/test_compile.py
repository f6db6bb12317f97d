"""torch.compile(fullgraph=True) over a whole SAM train step equals eager.

Compiling costs 10-30 s on the CPU here, so one compiled function is shared.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo

import samfunc

from .helpers import max_abs_diff

torch.manual_seed(0)
MODEL = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
OPTIMIZER = samfunc.sgd(samfunc.cosine_decay_schedule(0.1, 20), momentum=0.9, weight_decay=5e-4)


def loss_fn(params: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(torch.func.functional_call(MODEL, params, (x,)), y)


def train_step(params: Any, opt_state: Any, batch: Any, rho: torch.Tensor) -> Any:
    grads, loss = samfunc.sam_grad(loss_fn, params, batch, rho=rho, adaptive=True)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return samfunc.apply_updates(params, updates), opt_state, loss


@pytest.fixture(scope="module")
def compiled_step() -> Any:
    torch._dynamo.reset()
    return torch.compile(train_step, fullgraph=True)


def test_compiled_sam_step_equals_eager_without_recompiles(compiled_step: Any) -> None:
    params = {k: v.detach().clone() for k, v in MODEL.named_parameters()}
    eager = (params, OPTIMIZER.init(params))
    compiled = (params, OPTIMIZER.init(params))
    generator = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(6):
            batch = (
                torch.randn(32, 10, generator=generator),
                torch.randint(0, 3, (32,), generator=generator),
            )
            rho = torch.tensor(0.05 + 0.01 * step)  # a rho schedule: a tensor, no recompile
            *eager, eager_loss = train_step(*eager, batch, rho)
            *compiled, compiled_loss = compiled_step(*compiled, batch, rho)
            assert compiled_loss.item() == pytest.approx(eager_loss.item(), abs=1e-5)
    assert max_abs_diff(eager[0], compiled[0]) <= 1e-5
    assert max_abs_diff(eager[1], compiled[1]) <= 1e-5
