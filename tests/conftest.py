"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def two_threads():
    """Run a test at 2 torch threads (results are reproducible at a fixed thread count)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)
