"""Which radii train a model with the cheap methods: a short sweep on scikit-learn's digits.

Usage (from the repository root):

    python -m benchmarks.cheap_rho                     # the run in benchmarks/results/cheap_rho.md
    python -m benchmarks.cheap_rho --models cnn --lrs 0.1 --epochs 5 --seeds 1 --out /tmp/cheap_rho

Momentum-SAM's default ``rho=3.0`` is its paper's radius for CIFAR ResNets; the
perturbation ``-rho v / ||v||`` has norm ``rho`` whatever the size of ``v``, so what
a radius does depends on the size of the weights it is added to. This script trains
small models on the bundled digits (8x8 images, clean labels, the demo's stratified
split: 1258 training and 539 test images) with SGD, SAM, LookSAM (alpha 0.7, the
paper's, and 0.3), AE-SAM and Momentum-SAM at several radii, and reports clean test
accuracy, the final training loss, the weights' global L2 norm ``||w||`` at
initialization and at the end, and the mean length of a step ``||w_{t+1} - w_t||``.
Every run: SGD with momentum 0.9, a cosine learning rate from each of ``--lrs``,
weight decay 5e-4 (Momentum-SAM's own ``weight_decay`` for it, the optimizer's 0),
batch 64, eager, one torch thread.

The models:

- ``cnn``: Conv(1->16, 3x3) ReLU Conv(16->32, 3x3) ReLU MaxPool(2) Linear(512->10),
  no normalization layer (9,930 parameters);
- ``mlp``: the demo's MLP, 64-128-128-10 with BatchNorm after each hidden layer
  (26,634 parameters);
- ``mlp_nobn``: the same MLP without BatchNorm (26,122 parameters).

Results go to ``OUT.json`` and ``OUT.md`` (default ``benchmarks/results/cheap_rho``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import samfunc
from benchmarks.machine import machine_info
from samfunc.demo.data import Dataset, build_dataset, load_digits_arrays

F = nn.functional
MOMENTUM, WEIGHT_DECAY, BATCH = 0.9, 5e-4, 64
MSAM_RHOS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def make_model(name: str) -> nn.Module:
    """One of the models listed in the module's docstring."""
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(64, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    if name == "mlp_nobn":
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    raise ValueError(f"unknown model {name!r}")


MODELS = {
    "cnn": "CNN conv16-conv32-pool-linear, no normalization",
    "mlp": "MLP 64-128-128-10 with BatchNorm (the demo's)",
    "mlp_nobn": "MLP 64-128-128-10 without BatchNorm",
}

# name -> (builds the method or None for plain SGD, whether the optimizer takes the weight decay)
MethodSpec = tuple[Optional[Callable[[int], samfunc.Method]], bool]


def methods() -> dict[str, MethodSpec]:
    """SGD; SAM, LookSAM (two alphas) and AE-SAM at their papers' radii; Momentum-SAM at each."""
    found: dict[str, MethodSpec] = {
        "SGD": (None, True),
        "SAM rho=0.05": (lambda total: samfunc.sam(0.05), True),
        "LookSAM rho=0.1 k=5 alpha=0.7": (lambda total: samfunc.looksam(0.1, 5, 0.7), True),
        "LookSAM rho=0.1 k=5 alpha=0.3": (lambda total: samfunc.looksam(0.1, 5, 0.3), True),
        "AE-SAM rho=0.05": (
            lambda total: samfunc.ae_sam(0.05, c=samfunc.linear_schedule(1.0, -1.0, total)),
            True,
        ),
    }
    for rho in MSAM_RHOS:
        found[f"Momentum-SAM rho={rho:g}"] = (
            lambda total, rho=rho: samfunc.momentum_sam(rho, MOMENTUM, weight_decay=WEIGHT_DECAY),
            False,
        )
    return found


def load(model: str) -> Dataset:
    """Digits with clean labels; images (N, 1, 8, 8) for the CNN, flat for the MLPs."""
    x, y = load_digits_arrays()
    if model == "cnn":
        x = x.reshape(-1, 1, 8, 8)
    return build_dataset(x, y, noise=0.0, seed=0, name="digits")


def norm(params: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((p.double() ** 2).sum() for p in params.values())))


def run(
    data: Dataset, model_name: str, spec: MethodSpec, lr: float, seed: int, epochs: int
) -> dict[str, Any]:
    """One training run; its accuracy, loss, weight norms and mean step length."""
    build, optimizer_decay = spec
    torch.manual_seed(seed)
    model = make_model(model_name)
    per_epoch = len(data.x_train) // BATCH
    total = epochs * per_epoch
    optimizer = samfunc.sgd(
        samfunc.cosine_decay_schedule(lr, total),
        MOMENTUM,
        weight_decay=WEIGHT_DECAY if optimizer_decay else 0.0,
    )
    method = None if build is None else build(total)
    if method is None:
        step = samfunc.make_module_train_step(model, F.cross_entropy, optimizer, sam=False)
    else:
        step = samfunc.make_module_train_step(model, F.cross_entropy, optimizer, method=method)
    state = samfunc.init_train_state(model, optimizer, method=method)
    init_norm = norm(state.params)
    generator = torch.Generator().manual_seed(seed)
    step_lengths, losses = [], []
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=generator)
        losses = []
        for i in range(per_epoch):
            index = order[i * BATCH : (i + 1) * BATCH]
            before = state.params
            state, metrics = step(state, (data.x_train[index], data.y_train[index]))
            step_lengths.append(norm({k: state.params[k] - before[k] for k in before}))
            losses.append(float(metrics.loss))
    model.eval()
    with torch.no_grad():
        logits = torch.func.functional_call(model, (state.params, state.buffers), (data.x_test,))
    accuracy = float((logits.argmax(1) == data.y_test).float().mean())
    final_loss = statistics.fmean(losses)
    return {
        "test_accuracy": accuracy,
        "train_loss": final_loss if final_loss == final_loss else None,  # NaN -> null
        "init_norm": init_norm,
        "final_norm": norm(state.params),
        "mean_step": statistics.fmean(step_lengths),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": len(runs)}
    for key in ("test_accuracy", "init_norm", "final_norm", "mean_step"):
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    losses = [r["train_loss"] for r in runs]
    out["train_loss"] = None if None in losses else statistics.fmean(losses)
    out["runs"] = runs
    return out


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# Radii that train: the cheap methods on digits",
        "",
        f"Command: `{results['command']}`",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()),
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in results["settings"].items()),
        "",
        "Clean test accuracy and final training loss (the last epoch's mean): mean over the",
        "seeds, the accuracy's min-max in brackets; ||w||: the weights' global L2 norm at",
        "initialization and at the end; step: the mean ||w_{t+1} - w_t|| over the run.",
    ]
    for entry in results["models"].values():
        for lr, table in entry["by_lr"].items():
            lines += [
                "",
                f"## {entry['label']} ({entry['parameters']} parameters, batch {entry['batch']}), "
                f"lr {lr}",
                "",
                "| method | clean test accuracy | final train loss | ||w|| init | ||w|| end "
                "| step |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for name, row in table.items():
                loss = "nan" if row["train_loss"] is None else f"{row['train_loss']:.3f}"
                lines.append(
                    f"| {name} | {100 * row['test_accuracy']:.1f}% "
                    f"({100 * row['test_accuracy_min']:.1f}-{100 * row['test_accuracy_max']:.1f})"
                    f" | {loss} | {row['init_norm']:.1f} | {row['final_norm']:.1f} "
                    f"| {row['mean_step']:.3f} |"
                )
    return "\n".join(lines).replace("||w||", "‖w‖") + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cheap_rho",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.05, 0.2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cheap_rho"))
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    command = shlex.join(["python", "-m", "benchmarks.cheap_rho", *(argv or sys.argv[1:])])
    results: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "samfunc": samfunc.__version__,
        "machine": machine_info("cpu"),
        "settings": {
            "data": "digits, clean labels",
            "schedule": "cosine",
            "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY,
            "batch": BATCH,
            "epochs": args.epochs,
            "seeds": args.seeds,
        },
        "models": {},
    }
    for model_name in args.models:
        data = load(model_name)
        parameters = sum(p.numel() for p in make_model(model_name).parameters())
        entry: dict[str, Any] = {
            "label": MODELS[model_name],
            "parameters": parameters,
            "batch": BATCH,
            "by_lr": {},
        }
        for lr in args.lrs:
            table = entry["by_lr"][f"{lr:g}"] = {}
            for name, spec in methods().items():
                started = time.perf_counter()
                runs = [
                    run(data, model_name, spec, lr, seed, args.epochs) for seed in range(args.seeds)
                ]
                row = table[name] = summarize(runs)
                print(
                    f"{model_name:>8} lr {lr:<5g} {name:<24} "
                    f"acc {100 * row['test_accuracy']:5.1f}% "
                    f"||w|| {row['init_norm']:.1f}->{row['final_norm']:.1f} "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
        results["models"][model_name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))


if __name__ == "__main__":
    main()
