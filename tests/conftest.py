import os
import sys

import torch

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter. The variable must be set
# before triton (or rmsnorm's Triton backend) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def poison():
    """Fill every uninitialised tensor (torch.empty, at::empty) with NaN so unwritten outputs show."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
