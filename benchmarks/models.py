"""The model zoo of the benchmarks: one spec per model, its batch and fresh instances."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from samfunc.models import WideResNet


class TokenClassifier(torch.nn.Module):
    """A small Transformer encoder over token ids, mean-pooled into a classifier."""

    def __init__(self, vocab: int = 1000, dim: int = 128, layers: int = 2, classes: int = 10):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        layer = torch.nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(784, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


def small_mlp(width: int) -> torch.nn.Module:
    """64-width-width-10, for the per-step overhead (python -m benchmarks.small_step)."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and the batch it trains on."""

    name: str  # the key on the command line and in the results ("mlp")
    label: str  # the heading in the report
    build: Callable[[], torch.nn.Module]
    batch: int
    shape: tuple[int, ...]  # of one example
    tokens: bool = False  # integer token ids in [0, 1000) instead of Gaussian inputs


def _mlp(device: str) -> ModelSpec:
    return ModelSpec("mlp", "MLP 784-1024-1024-10", mlp, 256, (784,))


def _wrn(device: str) -> ModelSpec:
    on_gpu = device.startswith("cuda")
    width = 8 if on_gpu else 2
    return ModelSpec(
        "wrn",
        f"WRN-16-{width}",
        lambda: WideResNet(16, width, 10),
        128 if on_gpu else 64,
        (3, 32, 32),
    )


def _transformer(device: str) -> ModelSpec:
    return ModelSpec(
        "transformer", "Transformer encoder (2x128, seq 64)", TokenClassifier, 64, (64,), True
    )


MODELS: dict[str, Callable[[str], ModelSpec]] = {
    "mlp": _mlp,
    "wrn": _wrn,
    "transformer": _transformer,
}


# The small models of python -m benchmarks.small_step, where a step's Python and dispatch
# overhead is a large share of it (not in MODELS: step_time does not run them by default).
SMALL_MODELS: dict[str, ModelSpec] = {
    "mlp64": ModelSpec("mlp64", "MLP 64-64-64-10", functools.partial(small_mlp, 64), 32, (64,)),
    "mlp512": ModelSpec(
        "mlp512", "MLP 64-512-512-10", functools.partial(small_mlp, 512), 32, (64,)
    ),
}


def model_spec(name: str, device: str) -> ModelSpec:
    """The spec of model ``name`` on ``device`` (a GPU gets the wider WRN and a larger batch)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](device)


def make_batch(spec: ModelSpec, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if spec.tokens:
        x = torch.randint(0, 1000, (spec.batch, *spec.shape), generator=generator)
    else:
        x = torch.randn(spec.batch, *spec.shape, generator=generator)
    y = torch.randint(0, 10, (spec.batch,), generator=generator)
    return x.to(device), y.to(device)


def fresh_model(spec: ModelSpec, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return spec.build().to(device).train()
