"""Exposure: loopback by default, no open non-loopback server, Host and Origin checks, CORS.

Real servers on free ports; the Host/Origin header of each request is set by hand, as a
DNS-rebinding page or a cross-site page would make a browser send it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import ServerProcess, free_port, run_server

ST_ORIGIN = "http://st.example:8000"
http = httpx.Client(timeout=60)  # generous: the CI box may be busy; no keep-alive reuse issues


@pytest.fixture(scope="module")
def guarded() -> Iterator[ServerProcess]:
    with run_server(
        "--ctx-size",
        "512",
        "--parallel",
        "1",
        "--threads",
        "1",
        "--allow-host",
        "host.docker.internal",
        "--cors-origin",
        ST_ORIGIN,
        name="security",
    ) as srv:
        yield srv


def port_of(srv: ServerProcess) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def serve_fails(*args: str) -> str:
    """Run `innkeeper serve ARGS`, which must refuse to start; return its one error line."""
    proc = subprocess.run(
        [sys.executable, "-m", "innkeeper", "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_non_loopback_without_a_key_refuses_to_start(host: str) -> None:
    line = serve_fails("--host", host)
    assert "without an api key" in line.lower() and host in line
    assert "--api-key" in line and "--insecure-no-auth" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cors-origin", "http://x.example/path"], "--cors-origin"),
        (["--cors-origin", "ftp://x.example"], "--cors-origin"),
        (["--allow-host", "http://x/"], "--allow-host"),
        (["--max-body", "lots"], "--max-body"),
        (["--max-body", "10"], "--max-body"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--sse-ping-interval", "-1"], "--sse-ping-interval"),
    ],
)
def test_bad_exposure_flags(args: list[str], needle: str) -> None:
    assert needle in serve_fails(*args)


def test_open_server_on_all_interfaces_accepts_any_host() -> None:
    """--insecure-no-auth is the explicit way out; any Host is then fine (nothing to rebind)."""
    with run_server(
        "--host",
        "0.0.0.0",
        "--insecure-no-auth",
        "--ctx-size",
        "256",
        "--parallel",
        "1",
        name="open",
    ) as srv:
        r = http.get(f"{srv.url}/v1/models", headers={"Host": "my-pc.lan:5001"})
        assert r.status_code == 200 and r.json()["data"]
        assert "insecure-no-auth" in srv.log()


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "LOCALHOST:5001",
        "127.0.0.1:1234",
        "[::1]:5001",
        "host.docker.internal:5001",
        "app.localhost",
        "127.1.2.3",
    ],
)
def test_loopback_names_are_accepted(guarded: ServerProcess, host: str) -> None:
    r = http.get(f"{guarded.url}/v1/models", headers={"Host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/v1/models", "openai"),
        ("/api/v1/model", "kobold"),
        ("/v1/internal/model/info", "ooba"),
        ("/health", "llamacpp"),
        ("/", "llamacpp"),
    ],
)
@pytest.mark.parametrize(
    "host", ["attacker.example", "attacker.example:5001", "0.0.0.0", "192.168.1.2"]
)
def test_rebinding_host_is_refused(
    guarded: ServerProcess, path: str, shape: str, host: str
) -> None:
    r = http.get(f"{guarded.url}{path}", headers={"Host": host})
    assert r.status_code == 400, r.text
    body = r.json()
    message = {
        "openai": lambda: body["error"]["message"],
        "kobold": lambda: body["detail"]["msg"],
        "ooba": lambda: body["detail"],
        "llamacpp": lambda: body["error"]["message"],
    }[shape]()
    assert "--allow-host" in message and "Host" in message


def test_no_cors_headers_by_default_and_same_origin_works(guarded: ServerProcess) -> None:
    url = guarded.url
    r = http.get(f"{url}/v1/models")
    assert "access-control-allow-origin" not in r.headers
    # the built-in page posts with its own origin: allowed, no CORS needed
    r = http.post(f"{url}/tokenize", json={"content": "hi"}, headers={"Origin": url})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = http.post(
        f"{url}/tokenize",
        json={"content": "hi"},
        headers={
            "Origin": f"http://localhost:{port_of(guarded)}",
            "Host": f"localhost:{port_of(guarded)}",
        },
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "http://localhost.evil.example"]
)
def test_cross_site_page_cannot_make_the_server_work(guarded: ServerProcess, origin: str) -> None:
    """A page on another site can send a 'simple' POST without preflight: it gets a 403."""
    r = http.post(
        f"{guarded.url}/api/v1/generate",
        content=b'{"prompt": "Hi", "max_length": 2}',
        headers={"Origin": origin, "Content-Type": "text/plain"},
    )
    assert r.status_code == 403
    assert "--cors-origin" in r.json()["detail"]["msg"]
    assert "access-control-allow-origin" not in r.headers
    r = http.post(f"{guarded.url}/api/extra/abort", headers={"Origin": origin})
    assert r.status_code == 403


def test_allowed_origin_gets_cors(guarded: ServerProcess) -> None:
    url = guarded.url
    pre = http.options(
        f"{url}/v1/completions",
        headers={
            "Origin": ST_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == ST_ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = http.post(
        f"{url}/v1/completions",
        json={"prompt": "Hi", "max_tokens": 2},
        headers={"Origin": ST_ORIGIN},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ST_ORIGIN
    # a preflight from an origin that is not allowed gets no CORS grant
    bad = http.options(
        f"{url}/v1/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in bad.headers


def test_wildcard_cors_with_key() -> None:
    """`--cors-origin *` for browser apps; with a key, the preflight (no key) still passes."""
    with run_server(
        "--cors-origin",
        "*",
        "--api-key",
        "k1",
        "--ctx-size",
        "256",
        "--parallel",
        "1",
        name="cors-any",
    ) as srv:
        pre = http.options(
            f"{srv.url}/v1/models",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] in ("*", "https://app.example")
        r = http.get(f"{srv.url}/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
        r = http.get(
            f"{srv.url}/v1/models",
            headers={"Origin": "https://app.example", "Authorization": "Bearer k1"},
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..\\..\\x", "%2e%2e/secret"])
def test_model_field_is_never_a_path(guarded: ServerProcess, name: str) -> None:
    """Requests name a model but the server serves its own: the field opens no file."""
    with httpx.Client(base_url=guarded.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
        served = r.json()["model"]
        assert "passwd" not in served and ".." not in served
        r = c.post(
            "/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        )
        assert r.status_code == 200 and r.json()["model"] == served
        r = c.get(f"/v1/models/{name}")
        assert r.status_code == 404
        assert "root:" not in r.text
