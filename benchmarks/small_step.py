"""The per-step overhead of SAM on small models: time, aten ops, host syncs and Python calls.

Usage (from the repository root):

    python -m benchmarks.small_step --tag before
    python -m benchmarks.small_step --models mlp64 --variants sgd,seed,functional --rounds 50

On a small model (an MLP 64-64-64-10 or 64-512-512-10 at batch 32) a step costs
little arithmetic, so what an implementation adds around the gradient passes
(Python, dispatched ops, syncs) is a large share of it. Every variant (listed
below) trains the same model on the same batch with the same hyperparameters
(SGD, lr 0.05, momentum 0.9, weight decay 5e-4, rho 0.05), eager, in float32,
with one torch thread (torch.set_num_threads(1)), and through samfunc's public
API only (samfunc.SAM, make_module_train_step, init_train_state, sgd, looksam,
momentum_sam), so that the same script times any version of samfunc.

Each timed sample runs --steps-per-sample steps (a multiple of 5, so that
LookSAM's k=5 is amortized: every sample holds the same number of full steps);
the variants alternate within each round, the order rotating by one from round
to round, and the report gives the median time per step and each variant's
ratio to seed and to sgd. Then, per variant, after the timing (so warmed up):

- aten ops per step: every func that a TorchDispatchMode sees in
  __torch_dispatch__ during one sample, divided by its steps (backward ops
  included);
- host syncs per step: the aten._local_scalar_dense calls among them (what
  .item(), bool(t), int(t) and float(t) become; each one a device sync on a GPU);
- Python calls per step: cProfile's total function calls (C functions included)
  over --profile-steps steps, divided by them; for the SAM steps (functional,
  class) also the 15 samfunc functions with the largest cumulative time.

Results go to benchmarks/results/small_step_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import datetime
import json
import os
import pstats
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import samfunc
from benchmarks.child import ROOT
from benchmarks.machine import gemm_ms, machine_info
from benchmarks.models import SMALL_MODELS, ModelSpec, fresh_model, make_batch
from benchmarks.timing import time_variants
from benchmarks.variants import LR, MOMENTUM, RHO, WEIGHT_DECAY, Step
from tests.seed_reference import SeedSAM, seed_disable_running_stats, seed_enable_running_stats

F = torch.nn.functional
K = 5  # LookSAM's k
SAMFUNC_DIR = os.path.dirname(os.path.abspath(samfunc.__file__))
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
SYNC = "aten._local_scalar_dense"

OneStep = Callable[[], None]
Builder = Callable[[ModelSpec], OneStep]


@dataclass(frozen=True)
class SmallVariant:
    name: str
    build: Builder  # returns a function that runs one training step
    passes: float  # gradient evaluations per step (amortized)

    @property
    def about(self) -> str:
        lines = (self.build.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""


VARIANTS: dict[str, SmallVariant] = {}  # in registration order, which is the report's order


def variant(name: str, passes: float) -> Callable[[Builder], Builder]:
    def register(build: Builder) -> Builder:
        VARIANTS[name] = SmallVariant(name, build, passes)
        return build

    return register


def torch_sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def samfunc_sgd() -> Any:
    return samfunc.sgd(LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


# --- the variants, in the report's order --------------------------------------------------------


@variant("sgd", passes=1)
def sgd(spec: ModelSpec) -> OneStep:
    """torch.optim.SGD, one forward-backward (the cost of an ordinary step)."""
    model, (x, y) = fresh_model(spec, "cpu"), make_batch(spec, "cpu")
    opt = torch_sgd(model)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


@variant("seed", passes=2)
def seed(spec: ModelSpec) -> OneStep:
    """The seed's SAM (tests/seed_reference.py): first_step/second_step, its BatchNorm helpers."""
    model, (x, y) = fresh_model(spec, "cpu"), make_batch(spec, "cpu")
    opt = SeedSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=RHO,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
    )

    def step() -> None:
        seed_enable_running_stats(model)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        seed_disable_running_stats(model)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    return step


def class_step(spec: ModelSpec, method: Optional[samfunc.Method]) -> OneStep:
    """samfunc.SAM around torch.optim.SGD, step(closure) with the closure doing it all."""
    model, (x, y) = fresh_model(spec, "cpu"), make_batch(spec, "cpu")
    rho: dict[str, Any] = {"rho": RHO} if method is None else {"method": method}
    opt = samfunc.SAM(
        model.parameters(),
        torch.optim.SGD,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        **rho,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step() -> None:
        opt.step(closure)

    return step


def per_sample_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, reduction="none")


def functional_step(
    spec: ModelSpec, method: Optional[samfunc.Method], criterion: Any = F.cross_entropy
) -> OneStep:
    """samfunc.make_module_train_step, eager, its default options."""
    model, batch = fresh_model(spec, "cpu"), make_batch(spec, "cpu")
    opt = samfunc_sgd()
    if method is None:
        train_step = samfunc.make_module_train_step(model, criterion, opt, rho=RHO)
    else:
        train_step = samfunc.make_module_train_step(model, criterion, opt, method=method)
    holder = {"state": samfunc.init_train_state(model, opt, method=method)}

    def step() -> None:
        holder["state"], _ = train_step(holder["state"], batch)

    return step


@variant("class", passes=2)
def sam_class(spec: ModelSpec) -> OneStep:
    """samfunc.SAM(params, torch.optim.SGD, rho=0.05, ...), step(closure)."""
    return class_step(spec, None)


@variant("functional", passes=2)
def functional(spec: ModelSpec) -> OneStep:
    """samfunc.make_module_train_step(model, cross_entropy, samfunc.sgd(...), rho=0.05)."""
    return functional_step(spec, None)


@variant("func_grad_x2", passes=2)
def func_grad_x2(spec: ModelSpec) -> OneStep:
    """Two bare torch.func.grad calls of a functional_call loss (no optimizer)."""
    model, batch = fresh_model(spec, "cpu"), make_batch(spec, "cpu")
    params = {k: v.detach() for k, v in model.named_parameters()}
    other = {k: v + 1e-3 for k, v in params.items()}

    def loss_fn(p: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    grad_fn = torch.func.grad(loss_fn)

    def step() -> None:
        grad_fn(params, batch)
        grad_fn(other, batch)

    return step


@variant("autograd_x2", passes=2)
def autograd_x2(spec: ModelSpec) -> OneStep:
    """Two bare torch.autograd.grad calls on the module (no optimizer)."""
    model, (x, y) = fresh_model(spec, "cpu"), make_batch(spec, "cpu")
    params = list(model.parameters())

    def step() -> None:
        torch.autograd.grad(F.cross_entropy(model(x), y), params)
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    return step


@variant("class_looksam", passes=1 + 1 / K)
def class_looksam(spec: ModelSpec) -> OneStep:
    """samfunc.SAM(..., method=samfunc.looksam(rho=0.05, k=5)), step(closure)."""
    return class_step(spec, samfunc.looksam(rho=RHO, k=K))


@variant("functional_looksam", passes=1 + 1 / K)
def functional_looksam(spec: ModelSpec) -> OneStep:
    """make_module_train_step(..., method=samfunc.looksam(rho=0.05, k=5))."""
    return functional_step(spec, samfunc.looksam(rho=RHO, k=K))


@variant("class_momentum_sam", passes=1)
def class_momentum_sam(spec: ModelSpec) -> OneStep:
    """samfunc.SAM(..., method=samfunc.momentum_sam(rho=0.05)), step(closure)."""
    return class_step(spec, samfunc.momentum_sam(rho=RHO))


@variant("functional_momentum_sam", passes=1)
def functional_momentum_sam(spec: ModelSpec) -> OneStep:
    """make_module_train_step(..., method=samfunc.momentum_sam(rho=0.05))."""
    return functional_step(spec, samfunc.momentum_sam(rho=RHO))


@variant("class_gsam", passes=2)
def class_gsam(spec: ModelSpec) -> OneStep:
    """samfunc.SAM(..., method=samfunc.gsam(rho=0.05, alpha=0.4)), step(closure)."""
    return class_step(spec, samfunc.gsam(rho=RHO, alpha=0.4))


@variant("functional_gsam", passes=2)
def functional_gsam(spec: ModelSpec) -> OneStep:
    """make_module_train_step(..., method=samfunc.gsam(rho=0.05, alpha=0.4))."""
    return functional_step(spec, samfunc.gsam(rho=RHO, alpha=0.4))


@variant("functional_wsam", passes=2)
def functional_wsam(spec: ModelSpec) -> OneStep:
    """make_module_train_step(..., method=samfunc.wsam(rho=0.05, gamma=0.9))."""
    return functional_step(spec, samfunc.wsam(rho=RHO, gamma=0.9))


@variant("functional_friendly_sam", passes=2)
def functional_friendly_sam(spec: ModelSpec) -> OneStep:
    """make_module_train_step(..., method=samfunc.friendly_sam(rho=0.05))."""
    return functional_step(spec, samfunc.friendly_sam(rho=RHO))


@variant("functional_vasso", passes=2)
def functional_vasso(spec: ModelSpec) -> OneStep:
    """make_module_train_step(..., method=samfunc.vasso(rho=0.05))."""
    return functional_step(spec, samfunc.vasso(rho=RHO))


@variant("functional_esam", passes=2)
def functional_esam(spec: ModelSpec) -> OneStep:
    """make_module_train_step(..., method=samfunc.esam(rho=0.05)): beta 0.6, gamma 0.5,
    a per-sample cross-entropy (second pass on half the batch, plus a forward)."""
    return functional_step(spec, samfunc.esam(rho=RHO), per_sample_cross_entropy)


PROFILED = ("functional", "class")  # the variants whose samfunc functions are listed

# --- the measurements ---------------------------------------------------------------------------


def repeated(one_step: OneStep, steps: int) -> Step:
    def sample() -> None:
        for _ in range(steps):
            one_step()

    return sample


def python_caller() -> str:
    """The innermost Python frame outside torch and this file: where an op came from."""
    frame = sys._getframe(1)
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    return where((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches __torch_dispatch__ (forward and backward alike).

    For the host syncs it also records the Python line that asked for each one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.sync_sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        self.counts[name] += 1
        if name.startswith(SYNC):
            self.sync_sites[python_caller()] += 1
        return func(*args, **(kwargs or {}))


def count_ops(sample: Step, steps: int) -> dict[str, Any]:
    """aten ops and host syncs per step over one sample of ``steps`` steps."""
    with OpCounter() as counter:
        sample()
    ops = dict(counter.counts.most_common())
    syncs = sum(n for name, n in ops.items() if name.startswith(SYNC))
    return {
        "ops_per_step": sum(ops.values()) / steps,
        "syncs_per_step": syncs / steps,
        "sync_sites_per_sample": dict(counter.sync_sites.most_common()),
        "ops_per_sample": ops,
    }


def where(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename.startswith(SAMFUNC_DIR):
        filename = "samfunc" + filename[len(SAMFUNC_DIR) :]
    return f"{filename}:{line}({name})"


def python_profile(sample: Step, samples: int, steps: int, top: int) -> dict[str, Any]:
    """cProfile over ``samples`` samples: calls per step, and the top samfunc functions."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(samples):
        sample()
    profiler.disable()
    total = samples * steps
    stats = pstats.Stats(profiler)
    rows = [
        {
            "function": where(key),
            "calls_per_step": calls / total,
            "cumulative_us_per_step": 1e6 * cumulative / total,
            "own_us_per_step": 1e6 * own / total,
        }
        for key, (_, calls, own, cumulative, _) in stats.stats.items()  # type: ignore[attr-defined]
        if key[0].startswith(SAMFUNC_DIR)
    ]
    rows.sort(key=lambda row: row["cumulative_us_per_step"], reverse=True)
    return {
        "steps": total,
        "calls_per_step": stats.total_calls / total,  # type: ignore[attr-defined]
        "samfunc_calls_per_step": sum(row["calls_per_step"] for row in rows),
        "top_samfunc": rows[:top],
    }


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = SMALL_MODELS[name]
    print(f"== {spec.label}, batch {spec.batch}", flush=True)
    steps = {v: repeated(VARIANTS[v].build(spec), args.steps_per_sample) for v in args.variants}
    times = time_variants(steps, "cpu", args.warmup, args.rounds)
    entry: dict[str, Any] = {"label": spec.label, "batch": spec.batch, "variants": {}}
    for v, sample in steps.items():
        per_step = {
            k.replace("_ms", "_us"): 1e3 * t / args.steps_per_sample for k, t in times[v].items()
        }
        counted = count_ops(sample, args.steps_per_sample)
        samples = max(1, args.profile_steps // args.steps_per_sample)
        profiled = python_profile(sample, samples, args.steps_per_sample, args.top)
        if v not in PROFILED:
            del profiled["top_samfunc"]
        entry["variants"][v] = {"time": per_step, **counted, "python": profiled}
        print(
            f"    {v:>24}: {per_step['median_us']:8.1f} us, {counted['ops_per_step']:6.1f} ops, "
            f"{counted['syncs_per_step']:4.1f} syncs, "
            f"{profiled['calls_per_step']:7.1f} Python calls per step",
            flush=True,
        )
    return entry


# --- the report ---------------------------------------------------------------------------------


def ratio(value: float, reference: Optional[float]) -> str:
    return f"{value / reference:.3f}" if reference else "-"


def same_driver_sam(runs: dict[str, Any], name: str) -> Optional[float]:
    """SAM's median in the driver of ``name`` (``class_*``: class, ``functional_*``: functional)."""
    driver = name.split("_")[0]
    if driver not in ("class", "functional") or name == driver or driver not in runs:
        return None
    median: float = runs[driver]["time"]["median_us"]
    return median


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        f"# Small-model step time: {results['machine']['device']}, "
        f"{results['machine']['torch_threads']} torch thread",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Date: {results['date']}; samfunc {results['samfunc']} at {results['samfunc_path']}",
        "",
        "Machine: "
        + ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in results["machine"].items()
        ),
        "",
        f"Settings: {settings['rounds']} interleaved rounds (order rotating) after "
        f"{settings['warmup']} warm-up samples per variant; {settings['steps_per_sample']} steps "
        f"per timed sample (LookSAM k=5 amortized); ops and syncs counted over one sample; "
        f"cProfile over {settings['profile_steps']} steps.",
        "",
        "Columns: passes = gradient evaluations per step (amortized); us/step = median time "
        "per step, IQR its quartiles; x seed, x sgd = median over that variant's median in the "
        "same run; x SAM = over SAM's in the same driver (class or functional); "
        "aten ops = every func a TorchDispatchMode sees per step (backward included); "
        "syncs = aten._local_scalar_dense per step (.item(), bool(t), ...; a device sync on a "
        "GPU); Python calls = cProfile's function calls per step (C functions included).",
        "",
    ]
    for entry in results["models"].values():
        runs = entry["variants"]
        seed = runs.get("seed", {}).get("time", {}).get("median_us")
        sgd = runs.get("sgd", {}).get("time", {}).get("median_us")
        lines += [
            f"## {entry['label']} (batch {entry['batch']})",
            "",
            "| variant | passes | us/step | IQR us | x seed | x sgd | x SAM | aten ops | syncs | "
            "Python calls |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        sites: dict[str, list[str]] = {}
        for name, run in runs.items():
            t = run["time"]
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        f"{results['variants'][name]['passes']:g}",
                        f"{t['median_us']:.1f}",
                        f"{t['q1_us']:.1f}-{t['q3_us']:.1f}",
                        ratio(t["median_us"], seed),
                        ratio(t["median_us"], sgd),
                        ratio(t["median_us"], same_driver_sam(runs, name)),
                        f"{run['ops_per_step']:.1f}",
                        f"{run['syncs_per_step']:.1f}",
                        f"{run['python']['calls_per_step']:.0f}",
                    ]
                )
                + " |"
            )
            for site, n in run["sync_sites_per_sample"].items():
                per_step = n / results["settings"]["steps_per_sample"]
                sites.setdefault(site, []).append(f"{name} {per_step:g}")
        lines.append("")
        if sites:
            lines += ["Where the syncs come from (per step):", ""]
            lines += [f"- `{site}`: {', '.join(by)}" for site, by in sites.items()]
            lines.append("")
        for name in PROFILED:
            if name not in runs:
                continue
            python = runs[name]["python"]
            lines += [
                f"### cProfile of {name}: {python['calls_per_step']:.0f} Python calls per step "
                f"({python['samfunc_calls_per_step']:.0f} of them to samfunc functions)",
                "",
                f"The {len(python['top_samfunc'])} samfunc functions with the largest cumulative "
                "time, per step (times under cProfile, so inflated):",
                "",
                "| function | calls | cumulative us | own us |",
                "|---|---:|---:|---:|",
            ]
            for row in python["top_samfunc"]:
                lines.append(
                    f"| `{row['function']}` | {row['calls_per_step']:g} | "
                    f"{row['cumulative_us_per_step']:.1f} | {row['own_us_per_step']:.1f} |"
                )
            lines.append("")
    lines.append("Variants:")
    lines.append("")
    for name, about in results["variants"].items():
        lines.append(f"- {name}: {about['description']}")
    return "\n".join(lines)


# --- the command line ---------------------------------------------------------------------------


def names(values: list[str], known: Any, what: str, parser: argparse.ArgumentParser) -> list[str]:
    out = [name for value in values for name in value.split(",") if name]
    unknown = [name for name in out if name not in known]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    rows = [f"  {name:<24} {v.passes:g} passes  {v.about}" for name, v in VARIANTS.items()]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.small_step",
        description=__doc__,
        epilog="variants (gradient evaluations per step, what it runs):\n" + "\n".join(rows),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", default=list(SMALL_MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up samples per variant")
    parser.add_argument("--steps-per-sample", type=int, default=10, help="a multiple of 5")
    parser.add_argument("--profile-steps", type=int, default=100)
    parser.add_argument("--top", type=int, default=15, help="samfunc functions listed")
    parser.add_argument("--tag", default="cpu", help="results go to small_step_<tag>.{md,json}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--render", type=Path, help="rewrite the .md of a results .json; measure nothing"
    )
    args = parser.parse_args(argv)
    args.models = names(args.models, SMALL_MODELS, "models", parser)
    args.variants = names(args.variants, VARIANTS, "variants", parser)
    if args.steps_per_sample % K:
        parser.error(f"--steps-per-sample must be a multiple of {K} (LookSAM's k)")
    return args


def main() -> None:
    args = parse_args()
    if args.render:
        args.render.with_suffix(".md").write_text(
            markdown(json.loads(args.render.read_text())) + "\n"
        )
        return
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "command": ("python -m benchmarks.small_step " + " ".join(sys.argv[1:])).strip(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "samfunc": getattr(samfunc, "__version__", "?"),
        "samfunc_path": os.path.relpath(SAMFUNC_DIR, ROOT),
        "machine": machine_info("cpu"),
        "settings": {
            k: getattr(args, k) for k in ("rounds", "warmup", "steps_per_sample", "profile_steps")
        },
        "variants": {
            v: {"passes": VARIANTS[v].passes, "description": VARIANTS[v].about}
            for v in args.variants
        },
        "models": {},
    }
    for model in args.models:
        results["models"][model] = run_model(model, args)
    results["machine"].update(gemm_ms("cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"small_step_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
