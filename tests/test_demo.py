"""`python -m samfunc.demo`: runs end to end, writes its table and plots, rejects bad data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samfunc.demo import __main__ as demo
from samfunc.demo.data import build_dataset, load_npz, symmetric_noise


def test_demo_runs_on_digits_and_writes_table_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = demo.main(["--epochs", "2", "--seeds", "2", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    for method in ("SGD", "SAM", "ASAM"):
        assert f"| {method} |" in printed
    assert "clean test accuracy" in (tmp_path / "results.md").read_text()
    for name in ("learning_curves.png", "loss_landscape.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wide_resnet_trains_on_user_images_through_the_functional_path(tmp_path: Path) -> None:
    generator = np.random.default_rng(0)
    x = generator.normal(size=(40, 32, 32, 3)).astype(
        np.float32
    )  # channels last, as saved by many tools
    y = np.arange(40) % 4
    path = tmp_path / "images.npz"
    np.savez(path, x=x, y=y)
    code = demo.main(
        [
            "--data",
            str(path),
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--batch-size",
            "8",
            "--no-plots",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert "| ASAM |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((20, 3))}, "must hold arrays named 'x' and 'y'; missing ['y']"),
        (
            {"x": np.zeros((20, 3)), "y": np.zeros(19, dtype=int)},
            "y must have shape (20,) to match x",
        ),
        (
            {"x": np.zeros(20), "y": np.zeros(20, dtype=int)},
            "x must be a numeric array of shape (N, ...)",
        ),
        ({"x": np.zeros((20, 3)), "y": np.full(20, 0.5)}, "y must hold integer class labels"),
        ({"x": np.zeros((20, 3)), "y": np.zeros(20, dtype=int)}, "at least two classes"),
        ({"x": np.full((20, 3), np.nan), "y": np.arange(20) % 2}, "NaN or infinite"),
    ],
)
def test_malformed_arrays_get_a_clear_error(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as info:
        load_npz(path)
    assert message in str(info.value)


def test_missing_file_exits_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--data", str(tmp_path / "nope.npz"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_options_are_rejected_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        demo.parse_args(["--noise", "1.5"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--epochs", "0"])


def test_symmetric_noise_flips_the_requested_fraction_to_other_classes() -> None:
    labels = torch.arange(10000) % 10
    noisy = symmetric_noise(labels, 0.4, 10, seed=0)
    flipped = noisy != labels
    assert abs(flipped.float().mean().item() - 0.4) < 0.02
    assert noisy.min() >= 0 and noisy.max() <= 9
    assert torch.equal(symmetric_noise(labels, 0.0, 10, seed=0), labels)


def test_split_is_stratified_and_standardized() -> None:
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(100, 4)).astype(np.float32)
    y = np.arange(100) % 5
    data = build_dataset(x, y, noise=0.0, seed=0, name="t")
    assert len(data.x_train) + len(data.x_test) == 100
    assert torch.bincount(data.y_test).tolist() == [6] * 5
    assert data.x_train.mean().abs().item() < 1e-5
    assert torch.equal(data.y_train, data.y_train_clean)


def test_module_entry_point_prints_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "samfunc.demo", "--help"], capture_output=True, text=True, check=True
    )
    assert "--quick" in done.stdout and "--data" in done.stdout
