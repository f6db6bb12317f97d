"""``--compare-efficient``: SAM at (nearly) the cost of SGD, on the same label-noise task.

Trains SGD, SAM, LookSAM, Momentum-SAM, AE-SAM, SAM every 5 steps, late-phase
SAM and MESA with the demo's settings and reports, per method, clean test
accuracy, the share of SAM's accuracy gain over SGD it keeps, gradient
evaluations per step and time per epoch relative to SGD, and plots accuracy
against time.

Each method's hyperparameters are its paper's or official code's, scaled to
the length of this training run where they are given in epochs or steps
(never chosen by test accuracy):

* LookSAM: k = 5, alpha = 0.7 (the paper's alpha; k as in its ViT runs);
* Momentum-SAM: rho = 3, the paper's CIFAR and ImageNet radius, momentum 0.9;
* AE-SAM: c from 1 to -1 linearly over training (lambda2 = 1, lambda1 = -1), delta 0.9;
* SAM every 5 steps: Composer's ``interval`` set to LookSAM's k;
* late-phase SAM: SGD for the first 87.5% of the steps (epoch 175 of 200 in Zhou et al.);
* MESA: weight 0.8, T = 5; the average spans 6.4% of training (decay 0.9998 over
  the official 78k steps) and the term starts after one epoch (5 of 200 officially).
SAM, LookSAM, AE-SAM and the scheduled SAMs share the demo's ``--rho``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import samfunc

from .train import Method, RunResult, accuracy_rows

#: MESA's official decay, 0.9998, is a window of 5000 steps in a 78k-step run: 6.4% of it.
MESA_WINDOW = 5000 / (200 * 391)


def efficient_methods(rho: float) -> list[Method]:
    """SGD, SAM and the six cheaper methods, each built for the run's length."""

    def looksam(total: int, per_epoch: int) -> samfunc.Method:
        return samfunc.looksam(rho=rho, k=5, alpha=0.7)

    def momentum_sam(total: int, per_epoch: int) -> samfunc.Method:
        return samfunc.momentum_sam(rho=3.0, momentum=0.9)

    def ae_sam(total: int, per_epoch: int) -> samfunc.Method:
        return samfunc.ae_sam(rho=rho, c=samfunc.linear_schedule(1.0, -1.0, total), delta=0.9)

    def every_5(total: int, per_epoch: int) -> samfunc.Method:
        return samfunc.with_policy(samfunc.sam(rho), samfunc.every_n_steps(5))

    def late_phase(total: int, per_epoch: int) -> samfunc.Method:
        return samfunc.with_policy(samfunc.sam(rho), samfunc.from_step(int(0.875 * total)))

    def mesa(total: int, per_epoch: int) -> samfunc.Method:
        decay = 1.0 - 1.0 / max(2.0, MESA_WINDOW * total)
        return samfunc.mesa(weight=0.8, decay=decay, temperature=5.0, start_step=per_epoch)

    return [
        Method("SGD", sam=False),
        Method("SAM", sam=True, rho=rho),
        Method("LookSAM k=5", sam=True, build=looksam),
        Method("Momentum-SAM", sam=True, build=momentum_sam),
        Method("AE-SAM", sam=True, build=ae_sam),
        Method("SAM every 5", sam=True, build=every_5),
        Method("late-phase SAM", sam=True, build=late_phase),
        Method("MESA", sam=True, build=mesa),
    ]


def frontier_rows(results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per method: accuracy (mean, std), gain kept, passes, time relative to SGD."""
    rows = accuracy_rows(results, ("gradients_per_step", "forwards_per_step", "seconds_per_epoch"))
    by_name = {row["method"]: row for row in rows}
    sgd, sam = by_name.get("SGD"), by_name.get("SAM")
    for row in rows:
        row["time_vs_sgd"] = (
            row["seconds_per_epoch"] / sgd["seconds_per_epoch"] if sgd else math.nan
        )
        gain = sam["test_accuracy_mean"] - sgd["test_accuracy_mean"] if sgd and sam else 0.0
        row["gain_kept"] = (
            (row["test_accuracy_mean"] - sgd["test_accuracy_mean"]) / gain
            if sgd and gain > 0
            else math.nan
        )
    return rows


def frontier_table(rows: list[dict[str, Any]]) -> str:
    """The frontier as a markdown table."""
    lines = [
        "| method | clean test accuracy | share of SAM's gain | gradients / step | "
        "forward passes / step | time / epoch vs SGD |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        kept = row["gain_kept"]
        lines.append(
            f"| {row['method']} | {100 * row['test_accuracy_mean']:.2f}% "
            f"± {100 * row['test_accuracy_std']:.2f} | "
            f"{'-' if math.isnan(kept) else f'{100 * kept:.0f}%'} | "
            f"{row['gradients_per_step']:.2f} | {row['forwards_per_step']:.2f} | "
            f"{row['time_vs_sgd']:.2f}x |"
        )
    return "\n".join(lines)


def frontier_plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Clean test accuracy (mean ± std over seeds) against time per epoch relative to SGD."""
    from .plots import new_figure

    fig = new_figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for row in rows:
        ax.errorbar(
            row["time_vs_sgd"],
            100 * row["test_accuracy_mean"],
            yerr=100 * row["test_accuracy_std"],
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            row["method"],
            (row["time_vs_sgd"], 100 * row["test_accuracy_mean"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=9,
        )
    ax.set(
        xlabel="time per epoch, relative to SGD",
        ylabel="clean test accuracy (%)",
        title="Accuracy against cost, 40% label noise",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "frontier.png"
    fig.savefig(path, dpi=120)
    return path
