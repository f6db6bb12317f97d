"""PNG plots for the demo: learning curves and loss landscapes of SGD vs SAM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import samfunc

from .data import Dataset
from .train import RunResult

F = nn.functional


def new_figure(**figure_kwargs: Any) -> Any:
    """A matplotlib ``Figure`` that is not registered with pyplot.

    The demo only writes PNG files, so it never touches pyplot's global state or its backend:
    importing or running it inside Jupyter leaves inline figures working, and nothing needs closing.
    """
    from matplotlib.figure import Figure

    return Figure(**figure_kwargs)


def learning_curves(results: list[RunResult], out: Path) -> Path:
    """Clean test accuracy and (noisy) training loss per epoch, mean over seeds."""
    fig = new_figure(figsize=(10, 4))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        acc = torch.tensor([r.test_curve for r in runs]).mean(0)
        loss = torch.tensor([r.loss_curve for r in runs]).mean(0)
        epochs = range(1, len(acc) + 1)
        acc_ax.plot(epochs, acc.numpy(), label=method)
        loss_ax.plot(epochs, loss.numpy(), label=method)
    acc_ax.set(xlabel="epoch", ylabel="clean test accuracy", title="Test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="training loss (noisy labels)", title="Training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=120)
    return path


def landscapes(
    models: dict[str, tuple[nn.Module, RunResult]],
    data: Dataset,
    out: Path,
    points: int = 21,
    span: float = 1.0,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """1-D and 2-D training-loss slices along filter-normalized random directions."""
    alphas = torch.linspace(-span, span, points)
    batch = (data.x_train, data.y_train)
    surfaces, lines = {}, {}
    for name, (model, result) in models.items():
        state = result.state
        loss_fn, _ = samfunc.module_sharpness_loss(model, F.cross_entropy, state.buffers)
        d1 = samfunc.random_direction(state.params, seed=1)
        d2 = samfunc.random_direction(state.params, seed=2)
        lines[name] = samfunc.loss_landscape_1d(loss_fn, state.params, batch, d1, alphas)
        surfaces[name] = samfunc.loss_landscape_2d(
            loss_fn, state.params, batch, (d1, d2), alphas, alphas
        )
    fig = new_figure(figsize=(5 * (1 + len(surfaces)), 4.2))
    axes = fig.subplots(1, 1 + len(surfaces))
    for name, line in lines.items():
        axes[0].plot(alphas.numpy(), line.numpy(), label=name)
    axes[0].set(
        xlabel="alpha (filter-normalized direction)", ylabel="training loss", title="1-D slice"
    )
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    top = max(float(s.max()) for s in surfaces.values())
    low = min(float(s.min()) for s in surfaces.values())
    levels = torch.linspace(low, min(top, low + 3.0), 15).numpy()
    for ax, (name, surface) in zip(axes[1:], surfaces.items()):
        contour = ax.contourf(
            alphas.numpy(),
            alphas.numpy(),
            surface.T.numpy(),
            levels=levels,
            cmap="viridis",
            extend="max",
        )
        ax.set(xlabel="direction 1", ylabel="direction 2", title=f"{name}: 2-D slice")
        fig.colorbar(contour, ax=ax)
    fig.tight_layout()
    path = out / "loss_landscape.png"
    fig.savefig(path, dpi=120)
    return path, lines
