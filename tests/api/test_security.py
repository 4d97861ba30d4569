"""Exposure: loopback by default, no open non-loopback server, Host and Origin checks, CORS.

Real servers on free ports; the Host/Origin header of each request is set by hand, as a
DNS-rebinding page or a cross-site page would make a browser send it. The header matrices
(Host names, whole-origin compares, keys) run without a model in test_middleware.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import ServerProcess, free_port, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

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


def test_no_cors_headers_without_origin_and_same_origin_works(guarded: ServerProcess) -> None:
    url = guarded.url
    port = port_of(guarded)
    r = http.get(f"{url}/v1/models")
    assert "access-control-allow-origin" not in r.headers
    # the built-in page posts with its own origin, under any loopback spelling
    for origin, host in [
        (url, f"127.0.0.1:{port}"),
        (f"http://localhost:{port}", f"localhost:{port}"),
        (f"http://[::1]:{port}", f"[::1]:{port}"),
        (f"http://localhost:{port}", f"127.0.0.1:{port}"),
        # an --allow-host name, addressed as itself (docker port forwarding too)
        (f"http://host.docker.internal:{port}", f"host.docker.internal:{port}"),
        ("http://host.docker.internal:8080", "host.docker.internal:8080"),
    ]:
        r = http.post(
            f"{url}/tokenize", json={"content": "hi"}, headers={"Origin": origin, "Host": host}
        )
        assert r.status_code == 200, (origin, host, r.text)


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


@pytest.mark.parametrize(
    "other", ["http://127.0.0.1:{p}", "http://localhost:{p}", "http://[::1]:{p}"]
)
def test_pages_on_other_local_ports_get_cors(guarded: ServerProcess, other: str) -> None:
    """KoboldAI Lite served from another local port: its preflight is answered, then its
    calls work and carry the CORS grant (Ollama's default)."""
    origin = other.format(p=free_port())
    pre = http.options(
        f"{guarded.url}/api/v1/generate",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == origin
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "content-type" in pre.headers["access-control-allow-headers"].lower()
    r = http.post(
        f"{guarded.url}/api/v1/generate",
        json={"prompt": "Hi", "max_length": 2},
        headers={"Origin": origin},
    )
    assert r.status_code == 200 and r.json()["results"]
    assert r.headers["access-control-allow-origin"] == origin
    r = http.get(f"{guarded.url}/api/v1/model", headers={"Origin": origin})
    assert r.headers["access-control-allow-origin"] == origin
    # keyless loopback server: stopping stays public (SillyTavern, Lite's Abort button)
    for path in ("/api/extra/abort", "/v1/internal/stop-generation"):
        assert http.post(f"{guarded.url}{path}").status_code == 200
        assert http.post(f"{guarded.url}{path}", headers={"Origin": origin}).status_code == 200


def test_private_network_preflight_of_an_allowed_https_page(guarded: ServerProcess) -> None:
    """Chromium asks before an https page (the hosted Lite) may call a local server."""
    headers = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Private-Network": "true",
    }
    pre = http.options(f"{guarded.url}/api/v1/generate", headers={"Origin": ST_ORIGIN, **headers})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-private-network"] == "true"
    bad = http.options(
        f"{guarded.url}/api/v1/generate", headers={"Origin": "https://evil.example", **headers}
    )
    assert bad.status_code == 403
    assert "access-control-allow-private-network" not in bad.headers


def test_refused_origin_is_logged_once_with_the_fix() -> None:
    """A refused page leaves one hint naming --cors-origin; a flood of them stays one line."""
    with run_server("--ctx-size", "256", "--parallel", "1", name="cors-hint") as srv:
        for i in range(30):
            r = http.options(
                f"{srv.url}/v1/models",
                headers={
                    "Origin": f"https://lite{i}.example",
                    "Access-Control-Request-Method": "GET",
                },
            )
            assert r.status_code == 403
            assert "access-control-allow-origin" not in r.headers
        http.get(f"{srv.url}/health")  # the log line is written before this answer
        hints = [line for line in srv.log().splitlines() if "--cors-origin" in line]
    assert len(hints) == 1, hints
    assert "--cors-origin https://lite0.example" in hints[0]


def test_keyed_server_preflight_and_hint() -> None:
    """With a key, a loopback page's preflight (which carries no key) passes; a foreign
    page's is refused, logged with the hint, and its abort gets a 403 even with the key."""
    with run_server(
        "--api-key", "k1", "--ctx-size", "256", "--parallel", "1", name="cors-keyed"
    ) as srv:
        origin = f"http://localhost:{free_port()}"
        pre = http.options(
            f"{srv.url}/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == origin
        r = http.get(
            f"{srv.url}/v1/models", headers={"Origin": origin, "Authorization": "Bearer k1"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        bad = http.options(
            f"{srv.url}/v1/models",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in bad.headers
        r = http.post(
            f"{srv.url}/api/extra/abort",
            headers={"Origin": "https://evil.example", "Authorization": "Bearer k1"},
        )
        assert r.status_code == 403
        assert "--cors-origin https://evil.example" in srv.log()
