"""Data for the demo: scikit-learn's digits (bundled, no download) or the user's .npz."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch


class Dataset(NamedTuple):
    """A train/test split; train labels may be noisy, test labels are clean.

    Attributes:
        x_train: training inputs.
        y_train: training labels as given to the optimizer (noisy).
        y_train_clean: training labels before noise.
        x_test: test inputs.
        y_test: clean test labels.
        num_classes: number of classes.
        name: a short description for the report.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    y_train_clean: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: 1797 images, 10 classes, shipped with the package."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64)


NPZ_EXPECTED = (
    "an .npz file with arrays x (N, ...) and y (N,), as saved by numpy.savez(path, x=x, y=y)"
)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Loads arrays ``x`` (N, ...) and ``y`` (N,) of integer labels from an .npz file.

    The labels may be any integers (or whole floats); ``contiguous_labels`` maps them to 0..C-1.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not an .npz archive, or its arrays are missing or malformed;
            the message says which.
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"--data expects {NPZ_EXPECTED}; got {path}")
    if not path.is_file():
        raise FileNotFoundError(f"--data: no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"--data: {path} is not an .npz archive; expected {NPZ_EXPECTED}")
    x, y = _read_arrays(path)
    inputs = _check_inputs(x)
    labels = _check_labels(y, len(x))
    return inputs, labels


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of the archive at ``path``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise ValueError(
                    f"--data: {path} must hold arrays named 'x' and 'y'; missing {missing}, "
                    f"found {sorted(archive.files)}"
                )
            return archive["x"], archive["y"]
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"--data: {path} is not a readable .npz file ({error})") from error


def _check_inputs(x: np.ndarray) -> np.ndarray:
    """``x`` as float32; raises ValueError unless it is finite, numeric, with at least 10 rows."""
    is_real = np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)
    if x.ndim < 2 or 0 in x.shape[1:] or not is_real:
        raise ValueError(
            f"--data: x must be a numeric array of shape (N, ...), got {x.dtype} {x.shape}"
        )
    if x.shape[0] < 10:
        raise ValueError(f"--data: need at least 10 examples, got {x.shape[0]}")
    inputs = x.astype(np.float32)
    if not np.all(np.isfinite(inputs)):
        raise ValueError("--data: x contains NaN or infinite values (or values beyond float32)")
    return inputs


def _check_labels(y: np.ndarray, count: int) -> np.ndarray:
    """``y`` as int64 class labels; raises ValueError unless it holds ``count`` whole numbers."""
    if y.ndim != 1 or y.shape[0] != count:
        raise ValueError(f"--data: y must have shape ({count},) to match x, got {y.shape}")
    is_integer = np.issubdtype(y.dtype, np.integer)
    is_whole_float = np.issubdtype(y.dtype, np.floating) and bool(np.all(np.mod(y, 1) == 0))
    if not (is_integer or is_whole_float):
        raise ValueError(f"--data: y must hold integer class labels, got {y.dtype}")
    if is_whole_float and np.abs(y).max() > 2**53:
        raise ValueError(f"--data: labels must be integers below 2**53, got {np.abs(y).max()}")
    labels = y.astype(np.int64)
    if len(np.unique(labels)) < 2:
        raise ValueError("--data: y must contain at least two classes")
    return labels


def contiguous_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps the distinct labels, in increasing order, to 0..C-1.

    Args:
        y: integer class labels, any values.

    Returns:
        ``(mapped, classes)``: the labels as int64 in 0..C-1, and the sorted distinct original
        labels (``classes[i]`` became ``i``).
    """
    classes, mapped = np.unique(y, return_inverse=True)
    return mapped.reshape(y.shape).astype(np.int64), classes


def describe_labels(classes: np.ndarray, shown: int = 8) -> str:
    """``classes`` as a set for messages, e.g. ``{0, 1, 2, 1000}``; long ones are elided."""
    values = [str(label) for label in classes.tolist()]
    if len(values) > shown:
        values = [*values[: shown - 1], "...", values[-1]]
    return "{" + ", ".join(values) + "}"


def remap_note(classes: np.ndarray) -> str | None:
    """A one-line note saying how ``classes`` were renumbered, or None if they were 0..C-1."""
    if np.array_equal(classes, np.arange(len(classes))):
        return None
    return f"note: labels {describe_labels(classes)} remapped to 0..{len(classes) - 1}"


def symmetric_noise(labels: torch.Tensor, rate: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replaces each label, with probability ``rate``, by a uniformly drawn *other* class."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {rate}")
    generator = torch.Generator().manual_seed(seed)
    flip = torch.rand(labels.shape, generator=generator) < rate
    offset = torch.randint(1, num_classes, labels.shape, generator=generator)
    return torch.where(flip, (labels + offset) % num_classes, labels)


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        indices = rng.permutation(np.flatnonzero(y == label))
        cut = max(1, round(len(indices) * test_fraction))
        test.append(indices[:cut])
        train.append(indices[cut:])
    return np.concatenate(train), np.concatenate(test)


def _as_images(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) with C in {1, 3} becomes (N, C, H, W); other shapes stay."""
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.transpose(x, (0, 3, 1, 2))
    return x


def _count_classes(y: np.ndarray) -> int:
    """The number of classes C; raises ValueError unless the labels are exactly 0..C-1."""
    classes = np.unique(y)
    if not np.array_equal(classes, np.arange(len(classes))):
        raise ValueError(
            f"labels must be exactly 0..C-1 for C classes, got {describe_labels(classes)}; "
            "map them with contiguous_labels(y) first"
        )
    return len(classes)


def build_dataset(
    x: np.ndarray, y: np.ndarray, noise: float, seed: int, name: str, test_fraction: float = 0.3
) -> Dataset:
    """Splits (stratified, fixed by ``seed``), standardizes with training statistics, adds noise.

    Raises:
        ValueError: if the labels ``y`` are not exactly 0..C-1 (see ``contiguous_labels``).
    """
    num_classes = _count_classes(y)
    x = _as_images(x)
    train_idx, test_idx = _stratified_split(y, test_fraction, seed=0)
    x_train, x_test = x[train_idx], x[test_idx]
    axes = (0,) if x.ndim == 2 else tuple(i for i in range(x.ndim) if i != 1)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True) + 1e-6
    y_train = torch.from_numpy(y[train_idx])
    return Dataset(
        x_train=torch.from_numpy((x_train - mean) / std),
        y_train=symmetric_noise(y_train, noise, num_classes, seed),
        y_train_clean=y_train,
        x_test=torch.from_numpy((x_test - mean) / std),
        y_test=torch.from_numpy(y[test_idx]),
        num_classes=num_classes,
        name=name,
    )
