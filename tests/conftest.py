"""Shared pytest setup."""
import pytest


@pytest.fixture(autouse=True, scope="session")
def _recon_cache_dir(tmp_path_factory):
    """Keep CT system-matrix caches of the test run out of ``~/.cache``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RECON_CACHE_DIR", str(tmp_path_factory.mktemp("recon-cache")))
    yield
    mp.undo()
