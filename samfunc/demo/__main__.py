"""Trains SGD, SAM and ASAM on noisy labels and reports clean test accuracy and sharpness.

Run ``python -m samfunc.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .data import Dataset, build_dataset, load_digits_arrays, load_npz
from .train import Method, RunResult, Settings, train_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m samfunc.demo",
        description=(
            "Train one model with SGD+momentum, SAM and ASAM (through samfunc) on data with "
            "symmetric label noise, and compare clean test accuracy, training loss, sharpness "
            "(top Hessian eigenvalue) and time. Defaults: scikit-learn's bundled digits, "
            "40%% noise."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer epochs and seeds (under a minute)"
    )
    parser.add_argument(
        "--noise", type=float, default=0.4, help="symmetric label-noise rate (default 0.4)"
    )
    parser.add_argument("--rho", type=float, default=0.2, help="SAM radius (default 0.2)")
    parser.add_argument("--asam-rho", type=float, default=2.0, help="ASAM radius (default 2.0)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default 30, quick 20)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per method (default 5, quick 2)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine decay)")
    parser.add_argument(
        "--model", default="auto", choices=["auto", "mlp", "wrn"], help="auto: wrn for images"
    )
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the train step")
    parser.add_argument(
        "--data", type=Path, default=None, help=".npz file with arrays x (N, ...) and y (N,)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("samfunc-demo-out"), help="folder for results and plots"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 20 if args.quick else 30
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    for name in ("epochs", "seeds", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.noise < 1.0:
        parser.error(f"--noise must be in [0, 1), got {args.noise}")
    if args.rho < 0 or args.asam_rho < 0:
        parser.error("--rho and --asam-rho must be >= 0")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    return args


def load_data(args: argparse.Namespace) -> Dataset:
    """The digits, or the user's file, split and noised."""
    if args.data is None:
        x, y = load_digits_arrays()
        name = "scikit-learn digits (8x8)"
    else:
        x, y = load_npz(args.data)
        name = str(args.data)
    return build_dataset(
        x, y, args.noise, seed=0, name=f"{name}, {args.noise:.0%} symmetric label noise"
    )


def summarize(results: list[RunResult]) -> list[dict[str, float | str | int]]:
    """One row per method: means (and the accuracy's spread) over seeds."""
    rows: list[dict[str, float | str | int]] = []
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        accuracies = [r.test_accuracy for r in runs]
        rows.append(
            {
                "method": method,
                "seeds": len(runs),
                "test_accuracy_mean": statistics.mean(accuracies),
                "test_accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
                "train_loss": statistics.mean(r.train_loss for r in runs),
                "top_eigenvalue": statistics.mean(r.top_eigenvalue for r in runs),
                "seconds_per_epoch": statistics.mean(r.seconds_per_epoch for r in runs),
            }
        )
    return rows


def table(rows: list[dict[str, float | str | int]]) -> str:
    """The results as a markdown table."""
    lines = [
        "| method | clean test accuracy | final train loss | top Hessian eigenvalue | s / epoch |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {100 * float(row['test_accuracy_mean']):.2f}% "
            f"± {100 * float(row['test_accuracy_std']):.2f} | {float(row['train_loss']):.3f} | "
            f"{float(row['top_eigenvalue']):.2f} | {float(row['seconds_per_epoch']):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the process exit code."""
    args = parse_args(argv)
    try:
        data = load_data(args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = Settings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=0.9,
        weight_decay=5e-4,
        model=args.model,
        device=args.device,
        compile=args.compile,
        progress=not args.no_progress,
    )
    methods = [
        Method("SGD", sam=False),
        Method("SAM", sam=True, rho=args.rho),
        Method("ASAM", sam=True, rho=args.asam_rho, adaptive=True),
    ]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"data: {data.name}; {len(data.x_train)} train / {len(data.x_test)} test examples, "
        f"{data.num_classes} classes; {args.epochs} epochs x {args.seeds} seeds per method",
        flush=True,
    )
    started = time.perf_counter()
    results, first_models = [], {}
    for seed in range(args.seeds):
        for method in methods:
            model, result = train_run(data, method, seed, settings)
            results.append(result)
            if seed == 0:
                first_models[method.name] = (model, result)
    rows = summarize(results)
    report = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m samfunc.demo " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "results.md").write_text(
        f"Command: `{command.strip()}`\n\nData: {data.name}\n\n{report}\n"
    )
    (args.out / "results.json").write_text(
        json.dumps({"command": command.strip(), "rows": rows}, indent=2) + "\n"
    )
    print(f"\n{report}\n")
    if not args.no_plots:
        from .plots import landscapes, learning_curves

        curves = learning_curves(results, args.out)
        picked = {name: first_models[name] for name in ("SGD", "SAM")}
        landscape, _ = landscapes(picked, data, args.out)
        print(f"plots: {curves}, {landscape}")
    print(f"total time {time.perf_counter() - started:.0f} s; results in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
