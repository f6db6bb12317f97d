"""Training runs for the demo: SGD, SAM and ASAM through samfunc's functional path."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

import samfunc
from samfunc.models import WideResNet

from .data import Dataset

F = nn.functional


class Method(NamedTuple):
    """An optimizer to compare: plain SGD (``sam=False``), SAM or ASAM, or a samfunc method.

    Attributes:
        build: for a samfunc method (LookSAM, Momentum-SAM, ...):
            ``build(total_steps, steps_per_epoch) -> samfunc.Method``; then
            ``sam``, ``rho`` and ``adaptive`` are not used.
    """

    name: str
    sam: bool
    rho: float = 0.0
    adaptive: bool = False
    build: Optional[Callable[[int, int], samfunc.Method]] = None


class Settings(NamedTuple):
    """Hyperparameters shared by every run."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    model: str
    device: str
    compile: bool
    progress: bool


class RunResult(NamedTuple):
    """One trained model and what was measured on it."""

    method: str
    seed: int
    test_accuracy: float
    train_loss: float
    top_eigenvalue: float
    seconds_per_epoch: float
    test_curve: list[float]
    loss_curve: list[float]
    state: samfunc.TrainState
    gradients_per_step: float = 1.0
    forwards_per_step: float = 1.0


def accuracy_rows(results: list[RunResult], means: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per method, in order of appearance, over its seeds.

    A row holds the number of seeds, the clean test accuracy's mean and
    standard deviation, and the mean of each ``RunResult`` field in ``means``.
    """
    rows: list[dict[str, Any]] = []
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        accuracies = [r.test_accuracy for r in runs]
        row: dict[str, Any] = {
            "method": method,
            "seeds": len(runs),
            "test_accuracy_mean": statistics.mean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
        }
        row.update({name: statistics.mean(getattr(r, name) for r in runs) for name in means})
        rows.append(row)
    return rows


MODEL_KINDS = ("auto", "mlp", "wrn")
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_model_kind(kind: str, input_shape: tuple[int, ...]) -> str:
    """The model to build, ``mlp`` or ``wrn``, for inputs of ``input_shape`` (one example).

    Raises:
        ValueError: if ``kind`` is unknown, or is ``wrn`` for inputs that are not images.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"--model must be auto, mlp or wrn, got {kind!r}")
    is_image = len(input_shape) == 3
    if kind == "auto":
        return "wrn" if is_image else "mlp"
    if kind == "wrn" and not is_image:
        raise ValueError(
            "--model wrn needs image inputs x of shape (N, C, H, W) or (N, H, W, C), "
            f"got examples of shape {input_shape}; use --model mlp"
        )
    return kind


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch device this machine can train on.

    Raises:
        ValueError: if ``name`` is not a device string, not cpu, cuda or mps, or not available.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"--device must be a torch device such as cpu or cuda:0, got {name!r}"
        ) from error
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"--device must be cpu, cuda[:N] or mps, got {name!r}")
    if device.type == "cuda":
        _check_cuda(name, device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _check_cuda(name: str, device: torch.device) -> None:
    """Raises ValueError unless CUDA, and the device index if any, are available."""
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available (torch.cuda.is_available() is False); "
            "use --device cpu"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device {name}: this machine has {count} CUDA device(s), 0..{count - 1}"
        )


def make_model(kind: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``mlp`` (with BatchNorm) for flat inputs, ``wrn`` (WRN-16-2) for images, or ``auto``."""
    if resolve_model_kind(kind, input_shape) == "wrn":
        return WideResNet(16, 2, num_classes, in_channels=input_shape[0])
    features = 1
    for size in input_shape:
        features *= size
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


@torch.no_grad()
def predict(
    model: nn.Module, state: samfunc.TrainState, x: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Logits in eval mode (BatchNorm uses the running statistics in ``state``)."""
    was_training = model.training
    model.eval()
    try:
        outputs = [
            torch.func.functional_call(
                model, (state.params, state.buffers), (x[i : i + batch_size],)
            )
            for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def accuracy(
    model: nn.Module, state: samfunc.TrainState, x: torch.Tensor, y: torch.Tensor
) -> float:
    """Fraction of ``x`` whose predicted class is ``y``."""
    return (predict(model, state, x).argmax(1) == y).float().mean().item()


def top_eigenvalue(
    model: nn.Module, state: samfunc.TrainState, data: Dataset, iters: int = 200
) -> float:
    """Top Hessian eigenvalue of the training loss at the trained weights (eval mode)."""
    loss_fn, _ = samfunc.module_sharpness_loss(model, F.cross_entropy, state.buffers)
    value, _ = samfunc.top_hessian_eigenvalue(
        loss_fn, state.params, (data.x_train, data.y_train), iters=iters, tol=1e-2
    )
    return float(value)


def train_run(
    data: Dataset, method: Method, seed: int, settings: Settings
) -> tuple[nn.Module, RunResult]:
    """Trains one model with one method from one seed; returns it and its measurements."""
    from tqdm import tqdm

    device = torch.device(settings.device)
    torch.manual_seed(seed)
    model = make_model(settings.model, tuple(data.x_train.shape[1:]), data.num_classes).to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    steps_per_epoch = max(1, len(x_train) // settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    schedule = samfunc.cosine_decay_schedule(settings.lr, total_steps)
    optimizer = samfunc.sgd(schedule, settings.momentum, weight_decay=settings.weight_decay)
    criterion = CountingCriterion(F.cross_entropy)
    chosen = None if method.build is None else method.build(total_steps, steps_per_epoch)
    if chosen is None:
        step = samfunc.make_module_train_step(
            model, criterion, optimizer, sam=method.sam, rho=method.rho, adaptive=method.adaptive
        )
    else:
        step = samfunc.make_module_train_step(model, criterion, optimizer, method=chosen)
    if settings.compile:
        step = samfunc.compile_step(step, fullgraph=True)
    state = samfunc.init_train_state(model, optimizer, method=chosen)
    generator = torch.Generator().manual_seed(seed)
    test_curve, loss_curve, epoch_times = [], [], []
    bar = tqdm(
        range(settings.epochs),
        desc=f"{method.name:>4} seed {seed}",
        disable=not settings.progress,
        leave=False,
    )
    for _ in bar:
        started = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        losses = []
        for i in range(steps_per_epoch):
            index = order[i * settings.batch_size : (i + 1) * settings.batch_size]
            state, metrics = step(state, (x_train[index], y_train[index]))
            losses.append(metrics.loss)
        loss_curve.append(torch.stack(losses).mean().item())
        epoch_times.append(time.perf_counter() - started)
        test_curve.append(accuracy(model, state, x_test, y_test))
        bar.set_postfix(loss=f"{loss_curve[-1]:.3f}", test_acc=f"{test_curve[-1]:.3f}")
    result = RunResult(
        method=method.name,
        seed=seed,
        test_accuracy=test_curve[-1],
        train_loss=loss_curve[-1],
        top_eigenvalue=top_eigenvalue(model, state, data),
        seconds_per_epoch=sum(epoch_times[1:] or epoch_times) / len(epoch_times[1:] or epoch_times),
        test_curve=test_curve,
        loss_curve=loss_curve,
        state=state,
        gradients_per_step=gradients_per_step(method, state),
        forwards_per_step=float("nan") if settings.compile else criterion.calls / total_steps,
    )
    return model, result


class CountingCriterion:
    """``F.cross_entropy`` that counts its calls: the forward passes (eager runs only)."""

    def __init__(self, criterion: Callable[..., torch.Tensor]) -> None:
        self.criterion = criterion
        self.calls = 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss, counted."""
        self.calls += 1
        return self.criterion(output, target)


def gradients_per_step(method: Method, state: samfunc.TrainState) -> float:
    """Gradient evaluations (backward passes) per step.

    2 for SAM, 1 + the fraction of full steps for a method with a step
    policy, 1 for SGD, Momentum-SAM and MESA.
    """
    if method.build is None:
        return 2.0 if method.sam else 1.0
    if isinstance(state.method_state, samfunc.MethodState):
        return 1.0 + samfunc.full_step_fraction(state.method_state)
    return 1.0
