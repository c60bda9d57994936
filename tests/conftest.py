"""Strict, seeded fixtures: every test starts from the same random state and default dtype."""

import random

import numpy as np
import pytest
import torch

# Tiny models dominate the suite: one thread per test process (xdist runs two) avoids OpenMP
# spinning that made small convolutions 1000x slower on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    default = torch.get_default_dtype()
    yield
    assert torch.get_default_dtype() == default, "a test changed the default dtype"


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param
