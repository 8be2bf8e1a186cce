import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Without a GPU, speed_kernels.py's Triton kernels run on CPU tensors in Triton's interpreter; it is
# chosen when a kernel is defined, so before the first import of speed_kernels.py
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): a worker a core, up to 4. Each takes whole test files (--dist loadfile),
    so a file's module fixtures (built engines, trained models) are made once."""
    return max(1, min(4, os.cpu_count() or 1))


# Under CI (CI=true) every test must run: a skip there means CI lacks something it should install
# (.ci/run), so it fails, naming the reason. Only GPU tests may skip: CI has no GPU. A GPU skip
# says so in its reason ("GPU", "CUDA" or "compute capability").
GPU_SKIP = re.compile(r"\b(GPU|CUDA|cuda|compute capability)\b")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not GPU_SKIP.search(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, where only GPU tests may skip: {reason}"
