"""Shared fixtures: a tiny random Qwen2 (grouped-query attention) and an in-process tokenizer that
covers Chinese and English. Nothing is downloaded.

Tests compare numbers computed in float32 on the CPU, so every test sees no CUDA device unless it is
marked `cuda` (tests/test_cuda.py): "cuda if available" defaults (scripts' --device, bench.py)
resolve to the CPU and float32 on a GPU machine too, and the suite means the same thing there."""
import copy
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """The tiny model's products are too small to gain from a second thread, and on a shared,
    loaded CPU two spinning OpenMP threads made the suite four times slower (5 minutes, not 70 s)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: faster, and far faster on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def _tiny_cached():
    return common.load_model(common.TINY_MODEL, device="cpu")


@pytest.fixture
def tiny(_tiny_cached):
    """A fresh copy of the tiny model per test, so hooks left by one test cannot leak into another."""
    model, tokenizer = _tiny_cached
    fresh = copy.deepcopy(model)
    fresh.name_or_path_for_results = common.TINY_MODEL
    return fresh, tokenizer
