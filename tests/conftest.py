import os

import pytest
import torch

# Deterministic CPU math across the test processes (daemons started by tests inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.manual_seed(0)


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
