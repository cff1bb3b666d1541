"""Shared fixtures: a tiny random Qwen2 (grouped-query attention) and an in-process tokenizer that
covers Chinese and English. Nothing is downloaded."""
import copy
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402


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
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return common.load_model(common.TINY_MODEL, device="cpu")


@pytest.fixture
def tiny(_tiny_cached):
    """A fresh copy of the tiny model per test, so hooks left by one test cannot leak into another."""
    model, tokenizer = _tiny_cached
    fresh = copy.deepcopy(model)
    fresh.name_or_path_for_results = common.TINY_MODEL
    return fresh, tokenizer
