"""`innkeeper worker` and `--rpc`: loopback unless told otherwise, endpoints checked, Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from innkeeper.cli import app
from innkeeper.settings import ConfigError, parse_endpoints
from tests.helpers import ctrl_c_reaches_it, free_port, wait_for_worker


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20"])
def test_a_bind_beyond_loopback_needs_insecure_expose(host: str) -> None:
    result = CliRunner().invoke(app, ["worker", "--host", host])
    assert result.exit_code == 1
    assert "--insecure-expose" in result.output and "no authentication" in result.output
    assert "ssh -L" in result.output


def test_the_host_must_be_an_ipv4_address() -> None:
    result = CliRunner().invoke(app, ["worker", "--host", "example.com"])
    assert result.exit_code == 1 and "IPv4 address" in result.output


@pytest.mark.parametrize(
    "bad",
    ["http://10.0.0.2:50052", "10.0.0.2", ":50052", "host:0", "host:65536", "h/x:1", "a:1,a:1"],
)
def test_bad_endpoint_strings_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_endpoints(bad)


def test_endpoints_are_split_on_commas_and_normalised() -> None:
    assert parse_endpoints(" 127.0.0.1:50052, gpu-box.lan:0050053") == (
        "127.0.0.1:50052",
        "gpu-box.lan:50053",
    )


def test_serve_refuses_a_url_as_rpc_before_loading() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "innkeeper", "serve", "--rpc", "http://10.0.0.2:50052"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--rpc" in proc.stderr and "not a URL" in proc.stderr


def test_ctrl_c_stops_the_worker_cleanly() -> None:
    from innkeeper.engine import rpc

    if not rpc.available():
        pytest.skip("this llama-cpp-python has no RPC backend (no libggml-rpc.so)")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "innkeeper", "worker", "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ctrl_c_reaches_it,
    )
    try:
        wait_for_worker(port, proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"--rpc 127.0.0.1:{port}" in out and "worker stopped" in out
    assert "Traceback" not in out
