import os
import sys
from typing import Any

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _loaded(name: str, attribute: str) -> Any:
    return next(
        (
            module
            for key, module in list(sys.modules.items())
            if key.rsplit(".", 1)[-1] == name and hasattr(module, attribute)
        ),
        None,
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Prints each method's difference to its reference and how many inputs fuzzing tried."""
    for suite in ("test_methods", "test_efficient"):
        methods = _loaded(suite, "DIFFERENCES")
        if methods is None:
            continue
        for name, difference in methods.DIFFERENCES.items():
            terminalreporter.write_line(
                f"method vs reference loop, 12 float64 steps: {name}: "
                f"max abs difference {difference:.2e}"
            )
    distributed = _loaded("test_distributed", "DIFFERENCES")
    for name, difference in getattr(distributed, "DIFFERENCES", {}).items():
        terminalreporter.write_line(
            f"2 gloo processes vs single-process reference, float64: {name}: "
            f"max abs difference {difference:.2e}"
        )
    fuzz = next(
        (
            module
            for name, module in list(sys.modules.items())
            if name.rsplit(".", 1)[-1] == "test_fuzz" and hasattr(module, "INPUTS_TRIED")
        ),
        None,
    )
    if fuzz is None or not fuzz.INPUTS_TRIED:
        return
    tried = fuzz.INPUTS_TRIED
    terminalreporter.write_line(
        f"fuzz: {sum(tried.values())} inputs tried over {len(tried)} properties "
        f"(hypothesis profile {PROFILE})"
    )
