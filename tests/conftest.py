import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Without a GPU, kernels.py's Triton kernels run on CPU tensors in Triton's interpreter; it is
# chosen when a kernel is defined, so before the first import of kernels.py (tests/test_kernels.py)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): a worker a core, up to 4. Each takes whole test files (--dist loadfile),
    so a file's module fixtures (built engines, trained models) are made once."""
    return max(1, min(4, os.cpu_count() or 1))
