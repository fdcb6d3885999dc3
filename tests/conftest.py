"""Shared test setup: offline, deterministic, small thread count (CI has 2 cores)."""
import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# One thread: the tiny models here are dominated by small ops, where a second thread costs
# more in synchronisation than it gains (and CI runs two processes at once in the gloo test).
torch.set_num_threads(1)


def load(name):
    """Import a numbered module such as '01_kernel_selection' (names start with a digit)."""
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
