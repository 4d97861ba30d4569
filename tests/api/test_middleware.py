"""Who may talk to the server — Host, Origin, CORS, API keys, admin keys, body limits — tested
through an ASGI client on the real app, without a model.

The app is `create_app` over a registry that has listed the embedded model but never loads it;
the requests go only to routes that need no model (listings, status, abort, the admin routes
refusing), so these tests take milliseconds. The same checks against real server processes
(and everything that generates) stay in test_security.py and test_auth.py.
"""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from innkeeper.api.app import create_app
from innkeeper.models.store import default_model_path
from innkeeper.serving.registry import ModelRegistry
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig

ST_ORIGIN = "http://st.example:8000"
BASE = "http://127.0.0.1:5001"


def client(**settings: object) -> TestClient:
    """The real app, its middleware stack and routes, on a registry that loads nothing."""
    config = ServerConfig(
        engine=EngineConfig(model_path=default_model_path()),
        port=5001,
        **settings,  # type: ignore[arg-type]
    ).validate()
    registry = ModelRegistry(config, default_model_path())
    return TestClient(create_app(registry, config), base_url=BASE, raise_server_exceptions=True)


@pytest.fixture(scope="module")
def guarded() -> TestClient:
    return client(allowed_hosts=("host.docker.internal",), cors_origins=(ST_ORIGIN,))


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
def test_loopback_names_are_accepted(guarded: TestClient, host: str) -> None:
    r = guarded.get("/v1/models", headers={"Host": host})
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
def test_rebinding_host_is_refused_in_each_shape(
    guarded: TestClient, path: str, shape: str, host: str
) -> None:
    r = guarded.get(path, headers={"Host": host})
    assert r.status_code == 400, r.text
    body = r.json()
    message = {
        "openai": lambda: body["error"]["message"],
        "kobold": lambda: body["detail"]["msg"],
        "ooba": lambda: body["detail"],
        "llamacpp": lambda: body["error"]["message"],
    }[shape]()
    assert "--allow-host" in message and "Host" in message


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://host.docker.internal:9999", "host.docker.internal:5001"),
        ("http://app.localhost:9999", "app.localhost:5001"),
        ("https://localhost:5001", "localhost:5001"),
        ("https://127.0.0.1:5001", "127.0.0.1:5001"),
        ("https://evil.example", "127.0.0.1:5001"),
        ("null", "127.0.0.1:5001"),
        ("http://localhost.evil.example", "127.0.0.1:5001"),
    ],
)
def test_foreign_origins_are_refused_whole(guarded: TestClient, origin: str, host: str) -> None:
    for path in ("/api/v1/generate", "/api/extra/abort"):
        r = guarded.post(
            path,
            content=b'{"prompt": "Hi", "max_length": 2}',
            headers={"Origin": origin, "Host": host, "Content-Type": "text/plain"},
        )
        assert r.status_code == 403, (path, r.text)
        assert "access-control-allow-origin" not in r.headers
        assert "--cors-origin" in r.json()["detail"]["msg"]


@pytest.mark.parametrize(
    "origin", [ST_ORIGIN, "http://localhost:3000", "http://127.0.0.1:8000", "http://[::1]:1"]
)
def test_allowed_and_loopback_pages_get_cors(guarded: TestClient, origin: str) -> None:
    pre = guarded.options(
        "/v1/completions",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
    r = guarded.get("/v1/models", headers={"Origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    bad = guarded.options(
        "/v1/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in bad.headers


def test_blind_cross_site_requests_are_refused_but_links_work(guarded: TestClient) -> None:
    img = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    assert guarded.get("/props?model=x", headers=img).status_code == 403
    assert guarded.post("/api/extra/abort", headers=img).status_code == 403
    nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert guarded.get("/health", headers=nav).status_code == 200
    with client(cors_origins=("*",)) as open_cors:
        assert open_cors.get("/health", headers=img).status_code == 200


def test_api_keys_guard_everything_but_public_routes() -> None:
    c = client(api_keys=("first-key", "second-key"))
    r = c.get("/v1/models")
    assert r.status_code == 401 and "api key" in r.json()["error"]["message"].lower()
    assert c.get("/api/v1/model").status_code == 401 and "detail" in c.get("/api/v1/model").json()
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for key in ("first-key", "second-key"):
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert c.get("/health").status_code == 200
    assert c.get("/api/extra/version").json()["protected"] is True
    r = c.post("/api/extra/abort")
    assert r.status_code == 401


def test_admin_routes_refuse_missing_wrong_and_misplaced_keys() -> None:
    c = client(api_keys=("user",), admin_keys=("adm",))
    user = {"Authorization": "Bearer user"}
    for path, body in (
        ("/v1/internal/model/load", {"model_name": "x"}),
        ("/models/unload", {"model": "x"}),
        ("/api/innkeeper/models/load", {"model": "x"}),
        ("/api/innkeeper/pull", {"ref": "owner/repo"}),
    ):
        for headers in (user, {**user, "X-Admin-Key": "wrong"}, {"X-Admin-Key": "adm"}):
            r = c.post(path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
    r = c.post("/models/unload", json={"model": "nope"}, headers={**user, "X-Admin-Key": "adm"})
    assert r.status_code == 404  # past both checks: the model does not exist


def test_an_exposed_server_without_an_admin_key_refuses_admin_actions() -> None:
    c = client(host="0.0.0.0", api_keys=("user",))
    r = c.post("/models/unload", json={"model": "x"}, headers={"Authorization": "Bearer user"})
    assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"]


def test_oversized_bodies_are_a_413_before_any_route(guarded: TestClient) -> None:
    small = client(max_body=2048)
    r = small.post("/v1/completions", content=b"{" + b" " * 4096 + b"}")
    assert r.status_code == 413


def test_health_names_a_lost_rpc_worker_to_admins_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """/health needs no key: on a keyed server a caller without the admin key learns that a
    worker is gone and since when, not its address; the admin sees which."""
    from innkeeper.engine import rpc

    monkeypatch.setitem(rpc._lost, "10.0.0.9:50052", 1_700_000_000.0)
    c = client(api_keys=("user",), admin_keys=("adm",))
    hidden = {"status": "ok", "rpc_workers_lost": [{"since": 1_700_000_000.0}]}
    assert c.get("/health").json() == hidden  # no key at all: /health is public
    for path in ("/health", "/v1/internal/health"):
        assert c.get(path, headers={"Authorization": "Bearer user"}).json() == hidden
        admin = c.get(path, headers={"Authorization": "Bearer user", "X-Admin-Key": "adm"}).json()
        assert admin["rpc_workers_lost"] == [{"endpoint": "10.0.0.9:50052", "since": 1.7e9}]
    keyless = client()  # loopback, no key: the machine's owner
    assert keyless.get("/health").json()["rpc_workers_lost"][0]["endpoint"] == "10.0.0.9:50052"
