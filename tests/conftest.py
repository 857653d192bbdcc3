"""Shared test fixtures."""

import pytest

from lipsort.runtime import num_threads


@pytest.fixture
def two_threads():
    """Run a test at 2 torch threads (results are reproducible at a fixed thread count)."""
    with num_threads(2):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests at 1 torch thread: small matrices gain nothing from a second one,
    and it avoids oversubscribing a busy 2-core runner (use with ``pytest.mark.usefixtures``)."""
    with num_threads(1):
        yield
