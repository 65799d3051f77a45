"""Shared pytest setup."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Small tensor ops on a busy 2-core machine run much faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _recon_cache_dir(tmp_path_factory):
    """Keep CT system-matrix caches of the test run out of ``~/.cache``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RECON_CACHE_DIR", str(tmp_path_factory.mktemp("recon-cache")))
    yield
    mp.undo()
