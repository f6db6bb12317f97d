"""Where one variant's step spends more time than another's, op by op (torch.profiler).

Usage (from the repository root):

    python benchmarks/profile_step.py --model wrn --variant functional --reference seed

Prints the operators whose self CPU time per step differs most between the two
variants of benchmarks/step_time.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import BUILDERS, model_spec


def per_step_times(variant: str, model: str, device: str, steps: int) -> dict[str, float]:
    step = BUILDERS[variant](model_spec(model, device), device, False)
    assert step is not None, f"{variant} does not run on {model}"
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="wrn")
    parser.add_argument("--variant", default="functional")
    parser.add_argument("--reference", default="seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    ours = per_step_times(args.variant, args.model, args.device, args.steps)
    theirs = per_step_times(args.reference, args.model, args.device, args.steps)
    print(
        f"self CPU ms per step: {args.variant} {sum(ours.values()):.1f}, "
        f"{args.reference} {sum(theirs.values()):.1f}"
    )
    keys = set(ours) | set(theirs)
    ranked = sorted(keys, key=lambda k: abs(ours.get(k, 0.0) - theirs.get(k, 0.0)), reverse=True)
    print(f"{'difference':>10}  {args.variant:>10}  {args.reference:>10}  operator")
    for key in ranked[: args.top]:
        a, b = ours.get(key, 0.0), theirs.get(key, 0.0)
        print(f"{a - b:>10.2f}  {a:>10.2f}  {b:>10.2f}  {key}")


if __name__ == "__main__":
    main()
