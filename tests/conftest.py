import os

import pytest
import torch

# Tests use tiny models on a 2-core machine and start subprocesses (ranks, Ray workers) beside themselves: one
# thread per process avoids oversubscription, which slows tiny-tensor work by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# Without a GPU the Triton kernels (the `triton` scan backend) run in Triton's interpreter; it must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
