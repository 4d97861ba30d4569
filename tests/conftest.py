"""Fixtures shared by the whole suite: one real server with the embedded model per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import httpx
import pytest

# Before any test module: innkeeper maps llama.cpp's libraries on import, before any test
# module imports numpy (the other order crashes CUDA builds; docs/gpu-load-order.md).
import innkeeper  # noqa: F401
from tests.helpers import ServerProcess, run_server

# Every server and CLI the suite starts sees an empty store of its own, never the user's
# pulled models (tests that pull point INNKEEPER_MODELS elsewhere themselves).
os.environ["INNKEEPER_MODELS"] = tempfile.mkdtemp(prefix="innkeeper-test-store-")


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """`innkeeper serve` on a free loopback port with the embedded SmolLM2 model."""
    with run_server("--ctx-size", "2048", "--parallel", "2", name="api") as srv:
        yield srv


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
