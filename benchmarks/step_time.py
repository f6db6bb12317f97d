"""Step time and peak memory of SAM implementations, measured side by side.

Usage (from the repository root):

    python benchmarks/step_time.py                       # CPU: MLP, WRN-16-2, Transformer
    python benchmarks/step_time.py --models mlp --repeats 30
    python benchmarks/step_time.py --device cuda --bf16  # GPU: WRN-16-8, bf16 autocast

Variants, all on the same model, batch and hyperparameters (SGD, lr 0.05,
momentum 0.9, weight decay 5e-4, rho 0.05):

    sgd         torch.optim.SGD, one forward-backward (the cost of an ordinary step)
    seed        the seed's SAM class and BatchNorm helpers, eager (the anchor)
    class       samfunc.SAM, eager
    functional  samfunc.make_module_train_step, eager
    compiled    the same step under torch.compile(fullgraph=True)
    floor       two compiled gradient evaluations of the same loss, nothing else
    jax         the same SAM step with jax.jit and optax (MLP only; when jax is installed)

Times are taken in one process, the variants alternating within each round
(the order rotates), and reported as medians. The JAX step is timed in a
process of its own: XLA's CPU thread pool keeps spinning after a jitted call
and slowed whichever PyTorch variant ran next by up to 2x when they shared a
process. Peak memory is measured in a
fresh subprocess per variant, after two warm-up steps: on a GPU the growth of
torch.cuda.max_memory_allocated over the memory held between steps, on a CPU
the peak RSS of the subprocess during the measured steps. Results go to
benchmarks/results/step_time_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import samfunc  # noqa: E402
from samfunc.models import WideResNet  # noqa: E402
from tests.seed_reference import (  # noqa: E402
    SeedSAM,
    seed_disable_running_stats,
    seed_enable_running_stats,
)

F = torch.nn.functional
LR, MOMENTUM, WEIGHT_DECAY, RHO = 0.05, 0.9, 5e-4, 0.05
VARIANTS = ["sgd", "seed", "class", "functional", "compiled", "floor", "jax"]


# --- models ---------------------------------------------------------------------------------------


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


def model_spec(name: str, device: str) -> dict[str, Any]:
    on_gpu = device.startswith("cuda")
    if name == "mlp":
        return {
            "label": "MLP 784-1024-1024-10",
            "build": mlp,
            "batch": 256,
            "shape": (784,),
            "tokens": False,
        }
    if name == "wrn":
        width = 8 if on_gpu else 2
        return {
            "label": f"WRN-16-{width}",
            "build": lambda: WideResNet(16, width, 10),
            "batch": 128 if on_gpu else 64,
            "shape": (3, 32, 32),
            "tokens": False,
        }
    if name == "transformer":
        return {
            "label": "Transformer encoder (2x128, seq 64)",
            "build": TokenClassifier,
            "batch": 64,
            "shape": (64,),
            "tokens": True,
        }
    raise ValueError(f"unknown model {name!r}")


def make_batch(spec: dict[str, Any], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if spec["tokens"]:
        x = torch.randint(0, 1000, (spec["batch"], *spec["shape"]), generator=generator)
    else:
        x = torch.randn(spec["batch"], *spec["shape"], generator=generator)
    y = torch.randint(0, 10, (spec["batch"],), generator=generator)
    return x.to(device), y.to(device)


def fresh_model(spec: dict[str, Any], device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return spec["build"]().to(device).train()


# --- variants: each returns a zero-argument function that runs one step -----------------------


def autocast(device: str, bf16: bool) -> Any:
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)


def torch_sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def variant_sgd(spec: dict[str, Any], device: str, bf16: bool) -> Callable[[], None]:
    model, (x, y) = fresh_model(spec, device), make_batch(spec, device)
    opt = torch_sgd(model)

    def step() -> None:
        with autocast(device, bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def variant_seed(spec: dict[str, Any], device: str, bf16: bool) -> Callable[[], None]:
    model, (x, y) = fresh_model(spec, device), make_batch(spec, device)
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
        with autocast(device, bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        seed_disable_running_stats(model)
        with autocast(device, bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.second_step(zero_grad=True)

    return step


def variant_class(spec: dict[str, Any], device: str, bf16: bool) -> Callable[[], None]:
    model, (x, y) = fresh_model(spec, device), make_batch(spec, device)
    opt = samfunc.SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=RHO,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
    )

    def step() -> None:
        with autocast(device, bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        with samfunc.frozen_running_stats(model), autocast(device, bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.second_step(zero_grad=True)

    return step


def functional_step(
    spec: dict[str, Any], device: str, bf16: bool, compiled: bool
) -> Callable[[], None]:
    model, batch = fresh_model(spec, device), make_batch(spec, device)
    opt = samfunc.sgd(LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    nonfinite = os.environ.get("SAMFUNC_BENCH_NONFINITE", "skip")  # set by --nonfinite
    train_step = samfunc.make_module_train_step(
        model, F.cross_entropy, opt, rho=RHO, nonfinite=nonfinite
    )

    def with_precision(state: samfunc.TrainState, batch: Any) -> Any:
        with autocast(device, bf16):
            return train_step(state, batch)

    run = torch.compile(with_precision, fullgraph=True) if compiled else with_precision
    holder = {"state": samfunc.init_train_state(model, opt)}

    def step() -> None:
        holder["state"], _ = run(holder["state"], batch)

    return step


def variant_functional(spec: dict[str, Any], device: str, bf16: bool) -> Callable[[], None]:
    return functional_step(spec, device, bf16, compiled=False)


def variant_compiled(spec: dict[str, Any], device: str, bf16: bool) -> Callable[[], None]:
    return functional_step(spec, device, bf16, compiled=True)


def variant_floor(spec: dict[str, Any], device: str, bf16: bool) -> Callable[[], None]:
    """Two gradient evaluations of the SAM step's loss, compiled, and nothing else."""
    model, batch = fresh_model(spec, device), make_batch(spec, device)
    params, buffers = samfunc.module_state(model)
    other = {k: v + 1e-3 for k, v in params.items()}
    loss_fn = samfunc.module_loss(model, F.cross_entropy, buffers)
    grad_fn = torch.func.grad(loss_fn, has_aux=True)

    def two_gradients(p1: Any, p2: Any, batch: Any) -> Any:
        with autocast(device, bf16):
            return grad_fn(p1, batch)[0], grad_fn(p2, batch)[0]

    compiled = torch.compile(two_gradients, fullgraph=True)

    def step() -> None:
        compiled(params, other, batch)

    return step


def variant_jax(spec: dict[str, Any], device: str, bf16: bool) -> Callable[[], None] | None:
    """The SAM step in JAX with optax SGD, on the MLP only."""
    if spec["label"] != model_spec("mlp", device)["label"]:
        return None
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return None
    model, (x, y) = fresh_model(spec, "cpu"), make_batch(spec, "cpu")
    params = [
        (jnp.asarray(m.weight.detach().numpy().T), jnp.asarray(m.bias.detach().numpy()))
        for m in model
        if isinstance(m, torch.nn.Linear)
    ]
    xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
    dtype = jnp.bfloat16 if bf16 else jnp.float32

    def loss(p: Any, xb: Any, yb: Any) -> Any:
        h = xb.astype(dtype)
        for i, (w, b) in enumerate(p):
            h = h @ w.astype(dtype) + b.astype(dtype)
            if i < len(p) - 1:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h.astype(jnp.float32), yb).mean()

    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))

    @jax.jit
    def sam_step(p: Any, opt_state: Any, xb: Any, yb: Any) -> Any:
        g = jax.grad(loss)(p, xb, yb)
        scale = RHO / (optax.global_norm(g) + 1e-12)
        perturbed = jax.tree_util.tree_map(lambda w, gi: w + scale * gi, p, g)
        g_sam = jax.grad(loss)(perturbed, xb, yb)
        updates, opt_state = tx.update(g_sam, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    holder = {"params": params, "opt_state": tx.init(params)}

    def step() -> None:
        holder["params"], holder["opt_state"] = sam_step(
            holder["params"], holder["opt_state"], xj, yj
        )
        jax.block_until_ready(holder["params"])

    return step


BUILDERS: dict[str, Callable[..., Callable[[], None] | None]] = {
    "sgd": variant_sgd,
    "seed": variant_seed,
    "class": variant_class,
    "functional": variant_functional,
    "compiled": variant_compiled,
    "floor": variant_floor,
    "jax": variant_jax,
}


# --- measuring ----------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(
    steps: dict[str, Callable[[], None]],
    device: str,
    warmup: int,
    repeats: int,
    verbose: bool = True,
) -> dict[str, dict[str, float]]:
    for name, step in steps.items():
        started = time.perf_counter()
        for _ in range(warmup):
            step()
        synchronize(device)
        if verbose:
            print(f"    warmed up {name} in {time.perf_counter() - started:.1f} s", flush=True)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            synchronize(device)
            started = time.perf_counter()
            steps[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - started)
    return {
        name: {
            "median_ms": 1e3 * statistics.median(values),
            "q1_ms": 1e3 * statistics.quantiles(values, n=4)[0],
            "q3_ms": 1e3 * statistics.quantiles(values, n=4)[2],
        }
        for name, values in samples.items()
    }


def child_time(
    model: str, variant: str, device: str, bf16: bool, warmup: int, repeats: int
) -> dict[str, Any]:
    """Runs in a fresh process: the timing of one variant alone."""
    step = BUILDERS[variant](model_spec(model, device), device, bf16)
    if step is None:
        return {}
    return time_variants({variant: step}, device, warmup, repeats)[variant]


def time_in_subprocess(model: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child-time",
        model,
        variant,
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
    ] + (["--bf16"] if args.bf16 else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"    timing {variant} failed:\n{done.stderr[-2000:]}", flush=True)
        return {}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_memory(model: str, variant: str, device: str, bf16: bool, steps: int) -> dict[str, float]:
    """Runs in a fresh process: peak memory of ``steps`` steps of one variant.

    Two warm-up steps run first (lazy initialisation, compilation); then the
    peak is reset and measured over the next steps. On a GPU: the growth of
    allocated memory over what is held between steps. On a CPU: the peak
    resident set of the process during those steps (VmHWM, reset through
    /proc/self/clear_refs), which includes the libraries and, for compiled
    variants, the compiler; ``growth_mb`` is its rise over the resident set
    between steps.
    """
    spec = model_spec(model, device)
    step = BUILDERS[variant](spec, device, bf16)
    if step is None:
        return {}
    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": (peak - base) / 2**20, "base_mb": base / 2**20}
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss_mb()
    for _ in range(steps):
        step()
    peak = rss_mb("VmHWM")
    return {"peak_mb": peak, "growth_mb": peak - before, "base_mb": before}


def measure_memory(
    model: str, variants: list[str], device: str, bf16: bool, steps: int
) -> dict[str, dict[str, float]]:
    results = {}
    for variant in variants:
        command = [
            sys.executable,
            __file__,
            "--child",
            model,
            variant,
            "--device",
            device,
            "--steps",
            str(steps),
        ] + (["--bf16"] if bf16 else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"    memory of {variant} failed:\n{done.stderr[-2000:]}", flush=True)
            continue
        results[variant] = json.loads(lines[-1])
        print(f"    memory of {variant}: {results[variant]}", flush=True)
    return results


def gemm_ms(device: str) -> dict[str, float]:
    """One 256x784 @ 784x1024 matmul (the MLP's first layer) in torch, and in JAX if present."""
    a = torch.randn(256, 784, device=device)
    b = torch.randn(784, 1024, device=device)

    def torch_mm() -> None:
        a @ b
        synchronize(device)

    out = {
        "torch_gemm_ms": time_variants({"mm": torch_mm}, device, 5, 50, verbose=False)["mm"][
            "median_ms"
        ]
    }
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return out
    aj, bj = jnp.asarray(a.cpu().numpy()), jnp.asarray(b.cpu().numpy())
    matmul = jax.jit(lambda x, y: x @ y)

    def jax_mm() -> None:
        matmul(aj, bj).block_until_ready()

    out["jax_gemm_ms"] = time_variants({"mm": jax_mm}, device, 5, 50, verbose=False)["mm"][
        "median_ms"
    ]
    return out


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import jax

        info["jax"] = jax.__version__
    except ImportError:
        info["jax"] = None
    return info


# --- reporting ----------------------------------------------------------------------------------

# (variant, reference, bound, description, models it applies to or None for all)
TARGETS = [
    ("compiled", "floor", 1.05, "compiled SAM step <= 1.05x the floor", None),
    ("compiled", "seed", 0.90, "compiled <= 0.90x the seed's eager loop", "mlp"),
    ("functional", "seed", 1.05, "functional eager <= 1.05x the seed", None),
    ("compiled", "jax", 1.00, "compiled <= the JAX step", "mlp"),
]


def markdown(results: dict[str, Any], command: str) -> str:
    lines = [
        f"# Step time: {results['machine']['device']}",
        "",
        f"Command: `{command}`",
        "",
        "Machine: "
        + ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in results["machine"].items()
        ),
        "",
    ]
    for model, entry in results["models"].items():
        times, memory = entry["times"], entry.get("memory", {})
        seed = times.get("seed", {}).get("median_ms")
        lines += [
            f"## {entry['label']} (batch {entry['batch']})",
            "",
            "| variant | median ms | IQR ms | x seed | x floor | peak memory MB | memory x seed |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        floor = times.get("floor", {}).get("median_ms")
        seed_memory = memory.get("seed", {}).get("peak_mb")
        for name in VARIANTS:
            if name not in times:
                continue
            t = times[name]
            mem = memory.get(name, {}).get("peak_mb")
            lines.append(
                f"| {name} | {t['median_ms']:.2f} | {t['q1_ms']:.2f}-{t['q3_ms']:.2f} | "
                f"{t['median_ms'] / seed:.3f} | "
                + (f"{t['median_ms'] / floor:.3f}" if floor else "-")
                + " | "
                + (f"{mem:.0f}" if mem is not None else "-")
                + " | "
                + (f"{mem / seed_memory:.2f}" if mem is not None and seed_memory else "-")
                + " |"
            )
        lines += ["", "Targets:", ""]
        for a, b, bound, text, only in TARGETS:
            if a in times and b in times and only in (None, model):
                ratio = times[a]["median_ms"] / times[b]["median_ms"]
                verdict = "met" if ratio <= bound else f"missed by {100 * (ratio / bound - 1):.1f}%"
                lines.append(f"- {text}: {ratio:.3f} ({verdict})")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "wrn", "transformer"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps per memory subprocess")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--nonfinite",
        default="skip",
        choices=["skip", "propagate"],
        help="the functional steps' non-finite policy (default skip: torch.where on the state)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--child-time", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--render", type=Path, help="rewrite the .md of a results .json; measure nothing"
    )
    args = parser.parse_args()
    os.environ["SAMFUNC_BENCH_NONFINITE"] = args.nonfinite  # children inherit it

    if args.render:
        results = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(results, results["command"]) + "\n")
        return

    if args.child:
        print(json.dumps(child_memory(*args.child, args.device, args.bf16, args.steps)))
        return
    if args.child_time:
        print(
            json.dumps(
                child_time(*args.child_time, args.device, args.bf16, args.warmup, args.repeats)
            )
        )
        return

    results: dict[str, Any] = {"machine": machine_info(args.device), "models": {}}
    for model in args.models:
        spec = model_spec(model, args.device)
        print(f"== {spec['label']}, batch {spec['batch']}", flush=True)
        steps = {}
        for name in args.variants:
            if name == "jax":
                continue
            step = BUILDERS[name](spec, args.device, args.bf16)
            if step is not None:
                steps[name] = step
        entry: dict[str, Any] = {"label": spec["label"], "batch": spec["batch"]}
        entry["times"] = time_variants(steps, args.device, args.warmup, args.repeats)
        if "jax" in args.variants:
            jax_time = time_in_subprocess(model, "jax", args)
            if jax_time:
                entry["times"]["jax"] = jax_time
        for name, t in entry["times"].items():
            print(f"    {name:>10}: {t['median_ms']:.2f} ms", flush=True)
        if not args.no_memory:
            measured = list(entry["times"])
            entry["memory"] = measure_memory(model, measured, args.device, args.bf16, args.steps)
        results["models"][model] = entry

    # Last, so that XLA's threads (if JAX is present) cannot slow the runs above.
    results["machine"].update(gemm_ms(args.device))
    command = "python benchmarks/step_time.py " + " ".join(sys.argv[1:])
    results["command"] = command.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "step_time_" + args.device.split(":")[0] + ("_bf16" if args.bf16 else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results, results["command"]) + "\n")
    print(markdown(results, results["command"]))


if __name__ == "__main__":
    main()
