"""Fixtures for the train/ tests; the helpers themselves live in train_helpers.py."""

import numpy as np
import pytest

from train_helpers import make_batch


@pytest.fixture
def batches():
    rng = np.random.default_rng(0)
    return [make_batch(rng, rows=8, length=32) for _ in range(3)]
