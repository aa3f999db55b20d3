import os

import pytest
import torch

# Tests use tiny models on a 2-core machine and start subprocesses (ranks, Ray workers) beside themselves: one
# thread per process avoids oversubscription, which slows tiny-tensor work by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
