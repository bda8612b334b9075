"""Shared settings of the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Small models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's thread handoffs
    make each of the hundreds of tiny ops wait (a 10 ms forward took 4.5 s); run the model tests on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
