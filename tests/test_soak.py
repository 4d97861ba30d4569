"""Soak and abuse, bounded: concurrent streaming clients that abort at random, malformed and
oversized requests mixed in. Afterwards: no 5xx, no leaked slot, stable RSS, normal answers.

The counts are printed (pytest -s) and written to test-artifacts/soak.json.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.helpers import ARTIFACTS, ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

WORKERS = 8
MAX_REQUESTS = 400
MAX_SECONDS = 40.0
RSS_BOUND_MIB = 64  # RSS growth allowed from after warm-up to the end
MAX_BODY = 256 * 1024
ADMIN_KEY = "soak-admin"

PROMPTS = [
    "Hi",
    "Tell me a story about a fox.",
    "List three colours:",
    "Once upon a time",
    "### Instruction:\nWrite a haiku.\n### Response:\n",
]


class Soak:
    def __init__(self, srv: ServerProcess) -> None:
        self.url = srv.url
        self.host, port = srv.url.removeprefix("http://").split(":")
        self.port = int(port)
        self.kinds: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.unexpected: list[str] = []
        self.faults = 0
        self.lock = threading.Lock()

    def note(self, kind: str, status: int | None, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.kinds[kind] += 1
            if status is not None:
                self.statuses[status] += 1
            if not ok:
                self.unexpected.append(f"{kind}: {status} {detail[:200]}")

    # ---- well-formed traffic ---------------------------------------------------------------
    def stream(self, rng: random.Random, abort: bool) -> None:
        route, body = rng.choice(
            [
                ("/v1/completions", {"prompt": rng.choice(PROMPTS)}),
                (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}]},
                ),
                (
                    "/api/extra/generate/stream",
                    {"prompt": rng.choice(PROMPTS), "genkey": f"k{rng.random()}"},
                ),
            ]
        )
        body = {
            **body,
            "stream": True,
            "max_tokens": rng.randint(4, 32),
            "seed": rng.randint(0, 99),
        }
        stop_after = rng.randint(0, 6) if abort else None
        with (
            httpx.Client(base_url=self.url, timeout=120) as c,
            c.stream("POST", route, json=body) as r,
        ):
            n = 0
            finished = False
            for line in r.iter_lines():
                if line.startswith("data:"):
                    n += 1
                    finished |= '"finish_reason":"' in line and '"finish_reason":"null"' not in line
                    finished |= line == "data: [DONE]"
                if stop_after is not None and n >= stop_after:
                    break
        if stop_after is not None:
            with self.lock:
                self.faults += 1
        ok = r.status_code == 200 and (stop_after is not None or finished)
        self.note("stream_abort" if abort else "stream", r.status_code, ok)

    def plain(self, rng: random.Random) -> None:
        route, body = rng.choice(
            [
                (
                    "/v1/completions",
                    {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(2, 16)},
                ),
                (
                    "/api/v1/generate",
                    {"prompt": rng.choice(PROMPTS), "max_length": rng.randint(2, 16)},
                ),
                ("/v1/internal/encode", {"text": rng.choice(PROMPTS)}),
                ("/api/extra/tokencount", {"prompt": rng.choice(PROMPTS)}),
            ]
        )
        r = httpx.post(self.url + route, json=body, timeout=120)
        self.note("plain", r.status_code, r.status_code == 200, r.text)

    def hang_up(self, rng: random.Random) -> None:
        """A non-streaming generate whose client closes the socket without reading."""
        body = json.dumps(
            {"prompt": rng.choice(PROMPTS), "max_tokens": 200, "ignore_eos": True}
        ).encode()
        with socket.create_connection((self.host, self.port), timeout=30) as sock:
            sock.sendall(
                f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(rng.uniform(0, 0.4))
        with self.lock:
            self.faults += 1
        self.note("hang_up", None, True)

    def abort_route(self, rng: random.Random) -> None:
        r = httpx.post(
            self.url + "/api/extra/abort", json={"genkey": f"k{rng.random()}"}, timeout=60
        )
        self.note("abort_route", r.status_code, r.status_code == 200, r.text)

    # ---- bad input -------------------------------------------------------------------------
    def malformed(self, rng: random.Random) -> None:
        """Bodies no route can parse: every route with a body must answer 4xx."""
        route = rng.choice(
            [
                "/v1/completions",
                "/v1/chat/completions",
                "/api/v1/generate",
                "/api/extra/generate/stream",
                "/tokenize",
                "/v1/internal/decode",
            ]
        )
        content, ctype = rng.choice(
            [
                (b'{"prompt": "Hi", ', "application/json"),  # truncated JSON
                (b"\xff\xfe\x00garbage\x00", "application/json"),  # not UTF-8
                (b"[1, 2, 3]", "application/json"),  # wrong top-level type
                (b'"just a string"', "application/json"),
                (b"prompt=Hi", "application/x-www-form-urlencoded"),
                (b"", "application/json"),
                (b"{" * 5000, "application/json"),  # deep nesting
            ]
        )
        r = httpx.post(
            self.url + route, content=content, headers={"Content-Type": ctype}, timeout=60
        )
        self.note("malformed", r.status_code, 400 <= r.status_code < 500, r.text)

    def bad_values(self, rng: random.Random) -> None:
        """Well-formed JSON with values a generate route must refuse."""
        route = rng.choice(["/v1/completions", "/api/v1/generate", "/api/extra/generate/stream"])
        body = rng.choice(
            [
                {"prompt": 5, "max_tokens": "many", "temperature": {}},
                {"prompt": "Hi", "max_tokens": -1, "max_length": -1},
                {"prompt": "Hi", "top_p": 7},
                {"prompt": "Hi", "logit_bias": {"x": 1}},
                {"prompt": "Hi", "max_tokens": 10**12},
                {"prompt": "Hi", "stop": [f"stop{i}" for i in range(500)]},
                {"prompt": "Hi", "grammar": "root ::= ("},
                {"prompt": "Hi", "custom_token_bans": "1,x"},
                {"prompt": "Hi", "mirostat_mode": 9},
                {
                    "prompt": "Hi",
                    "dynatemp_low": 2,
                    "dynatemp_high": 1,
                    "dynamic_temperature": True,
                },
            ]
        )
        r = httpx.post(self.url + route, json=body, timeout=60)
        ok = 400 <= r.status_code < 500
        if route.endswith("/stream") and r.status_code == 200:
            # refused by the engine after the stream began (a grammar llama.cpp cannot parse):
            # an in-band error event in the family's shape, which SillyTavern shows
            ok = '"detail":{"msg"' in r.text and "[DONE]" not in r.text
        self.note("bad_values", r.status_code, ok, f"{body} -> {r.text}")

    def hostile(self, rng: random.Random) -> None:
        """Issue 10's crashers and freezers, scaled under the soak's body cap."""
        chatml = "<|im_start|>user\nx<|im_end|>\n"
        alternatives = "root ::= (" + " | ".join(f'"{i}"' for i in range(3000)) + ")+"
        route, body, expect = rng.choice(
            [
                (
                    "/v1/completions",
                    {
                        "prompt": "Hi",
                        "max_tokens": 2,
                        "grammar": "root ::= " + "(" * 3000 + '"a"' + ")" * 3000,
                    },
                    "4xx",
                ),
                (
                    "/api/v1/generate",
                    {"prompt": "Hi", "max_length": 2, "grammar": alternatives},
                    "4xx",
                ),
                (
                    "/v1/chat/completions",
                    {
                        "messages": [{"role": "user", "content": "Hi"}],
                        "grammar": 'root ::= ("a"?)*',
                    },
                    "4xx",
                ),
                ("/tokenize", {"content": chatml * 4000}, "200"),
                (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "x"}] * 5000, "max_tokens": 2},
                    "4xx",
                ),
            ]
        )
        r = httpx.post(self.url + route, json=body, timeout=60)
        ok = r.status_code == 200 if expect == "200" else 400 <= r.status_code < 500
        self.note("hostile", r.status_code, ok, f"{route} -> {r.text}")

    def partial_failure(self, rng: random.Random) -> None:
        """A prompt list whose last prompt is invalid: refused whole, nothing left running."""
        good = [rng.randint(10, 1000) for _ in range(rng.randint(50, 400))]
        bad = rng.choice([[-5], [10**9]])
        r = httpx.post(
            self.url + "/v1/completions",
            json={"prompt": [good, good, bad], "max_tokens": 1},
            timeout=60,
        )
        self.note("partial_failure", r.status_code, 400 <= r.status_code < 500, r.text)

    def cross_origin_abort(self, rng: random.Random) -> None:
        """A cross-site page's abort (a 'simple' POST, no preflight) is refused."""
        route = rng.choice(["/api/extra/abort", "/v1/internal/stop-generation"])
        r = httpx.post(
            self.url + route,
            content=b'{"genkey": ""}',
            headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
            timeout=60,
        )
        self.note("cross_origin_abort", r.status_code, r.status_code == 403, r.text)

    # ---- the admin rule ----------------------------------------------------------------------
    def load_abuse(self, rng: random.Random) -> None:
        """An admin's load with settings of the wrong JSON type: a 400, never a crash."""
        args = rng.choice(
            [
                {"n_ctx": True},
                {"parallel": False},
                {"n_ctx": [1]},
                {"ctx_size": {"a": 1}},
                {"parallel": [1, 2]},
                {"n_gpu_layers": {"x": 1}},
                {"cache_type": 8},
            ]
        )
        r = httpx.post(
            self.url + "/v1/internal/model/load",
            json={"model_name": "", "args": args},
            headers={"X-Admin-Key": ADMIN_KEY},
            timeout=60,
        )
        self.note("load_abuse", r.status_code, r.status_code == 400, r.text)

    def keep_alive_abuse(self, rng: random.Random) -> None:
        """keep_alive that would unload the model, from a client without the admin key: the
        request is served and the model stays (checked at the end by the engine's uptime)."""
        ka = rng.choice([0, "0s", "1ms", 0.001, -0.0])
        r = httpx.post(
            self.url + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
                "keep_alive": ka,
            },
            timeout=60,
        )
        self.note("keep_alive_abuse", r.status_code, r.status_code == 200, r.text)

    def cross_site_get(self, rng: random.Random) -> None:
        """`<img src=…/props?model=x>` on another site: refused before any route runs."""
        path = rng.choice(["/props?model=x", "/v1/models", "/api/extra/perf"])
        r = httpx.get(
            self.url + path,
            headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
            timeout=60,
        )
        self.note("cross_site_get", r.status_code, r.status_code == 403, r.text)

    def delete_during_load(self, rng: random.Random) -> None:
        """An admin reload of the default while a delete of it races in: the delete is a 4xx
        (the model serve started with stays), the load succeeds."""
        admin = {"X-Admin-Key": ADMIN_KEY}
        with ThreadPoolExecutor(2) as pool:
            load = pool.submit(
                httpx.post,
                self.url + "/api/innkeeper/models/load",
                json={"model": ""},
                headers=admin,
                timeout=60,
            )
            time.sleep(rng.uniform(0, 0.05))
            deleted = httpx.delete(self.url + "/api/innkeeper/models/x", headers=admin, timeout=60)
            loaded = load.result()
        self.note("delete_during_load", deleted.status_code, 400 <= deleted.status_code < 500)
        self.note("delete_during_load", loaded.status_code, loaded.status_code < 500, loaded.text)

    def oversized_prompt(self, rng: random.Random) -> None:
        words = rng.randint(2500, 6000)  # more tokens than the 2048-token context
        route, body = rng.choice(
            [
                ("/v1/completions", {"prompt": "word " * words, "max_tokens": 4}),
                ("/api/v1/generate", {"prompt": "word " * words, "max_length": 4}),
            ]
        )
        r = httpx.post(self.url + route, json=body, timeout=60)
        self.note("oversized_prompt", r.status_code, 400 <= r.status_code < 500, r.text)

    def oversized_body(self, rng: random.Random) -> None:
        r = httpx.post(
            self.url + "/v1/completions",
            json={"prompt": "x" * (MAX_BODY + rng.randint(1, 9999))},
            timeout=60,
        )
        self.note("oversized_body", r.status_code, r.status_code == 413, r.text)

    def job(self, seed: int) -> None:
        rng = random.Random(seed)
        actions: list[tuple[int, Callable[[], None]]] = [
            (6, lambda: self.stream(rng, abort=False)),
            (5, lambda: self.stream(rng, abort=True)),
            (4, lambda: self.plain(rng)),
            (2, lambda: self.hang_up(rng)),
            (1, lambda: self.abort_route(rng)),
            (3, lambda: self.malformed(rng)),
            (3, lambda: self.bad_values(rng)),
            (2, lambda: self.oversized_prompt(rng)),
            (2, lambda: self.hostile(rng)),
            (1, lambda: self.partial_failure(rng)),
            (1, lambda: self.cross_origin_abort(rng)),
            (1, lambda: self.oversized_body(rng)),
            (1, lambda: self.load_abuse(rng)),
            (1, lambda: self.keep_alive_abuse(rng)),
            (1, lambda: self.cross_site_get(rng)),
            (1, lambda: self.delete_during_load(rng)),
        ]
        _, action = rng.choices(actions, weights=[w for w, _ in actions])[0]
        try:
            action()
        except httpx.HTTPError as exc:
            self.note("transport_error", None, False, repr(exc))


def rss_mib(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def test_soak() -> None:
    with run_server(
        "--ctx-size",
        "2048",
        "--parallel",
        "4",
        "--threads",
        "1",
        "--max-queue",
        "64",
        "--max-body",
        str(MAX_BODY),
        "--admin-key",
        ADMIN_KEY,
        name="soak",
    ) as srv:
        server = psutil.Process(srv.proc.pid)
        t_start = time.monotonic()
        soak = Soak(srv)
        with ThreadPoolExecutor(WORKERS) as pool:  # warm-up: every kind once or more
            list(pool.map(soak.job, range(24)))
        c = httpx.Client(base_url=srv.url, timeout=60)
        wait_idle(c)
        rss0 = rss_mib(server)

        t0 = time.monotonic()
        sent = 0
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = []
            while sent < MAX_REQUESTS and time.monotonic() - t0 < MAX_SECONDS:
                futures = [f for f in futures if not f.done()]
                if len(futures) >= WORKERS * 2:
                    time.sleep(0.01)
                    continue
                futures.append(pool.submit(soak.job, 1000 + sent))
                sent += 1
        elapsed = time.monotonic() - t0

        perf = wait_idle(c)
        never_unloaded = perf["uptime"] >= time.monotonic() - t_start - 1
        rss1 = rss_mib(server)
        final = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "seed": 3})
        final2 = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "seed": 3})
        in_flight = c.get("/api/innkeeper/status").json()["perf"]["requests_in_flight"]
        c.close()

        bad_kinds = (
            "malformed",
            "bad_values",
            "hostile",
            "partial_failure",
            "cross_origin_abort",
            "oversized_prompt",
            "oversized_body",
            "load_abuse",
            "cross_site_get",
        )
        report = {
            "requests_sent": sum(soak.kinds.values()),
            "measured_phase_requests": sent,
            "measured_phase_seconds": round(elapsed, 1),
            "by_kind": dict(soak.kinds),
            "bad_inputs": {k: soak.kinds[k] for k in bad_kinds},
            "faults_injected": soak.faults,
            "statuses": {str(k): v for k, v in sorted(soak.statuses.items())},
            "5xx_seen": sum(v for k, v in soak.statuses.items() if k >= 500),
            "unexpected": soak.unexpected[:20],
            "slots_leaked": perf["busy_slots"],
            "queue_left": perf["queue"],
            "runs_leaked": in_flight,
            "total_aborted": perf["total_aborted"],
            "rss_after_warmup_mib": round(rss0, 1),
            "rss_end_mib": round(rss1, 1),
            "rss_growth_mib": round(rss1 - rss0, 1),
            "rss_bound_mib": RSS_BOUND_MIB,
            "never_unloaded": never_unloaded,
        }
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "soak.json").write_text(json.dumps(report, indent=2))
        print("\nsoak:", json.dumps(report, indent=2))

        assert report["5xx_seen"] == 0, report
        assert not soak.unexpected, report
        assert report["slots_leaked"] == 0 and report["queue_left"] == 0, report
        assert report["runs_leaked"] == 0, report
        assert never_unloaded, report  # no keep_alive without the admin key unloaded it
        assert report["rss_growth_mib"] < RSS_BOUND_MIB, report
        assert final.status_code == 200 and final.json()["usage"]["completion_tokens"] >= 1
        assert final.json()["choices"][0]["text"] == final2.json()["choices"][0]["text"]
        assert "Traceback" not in srv.log()


def wait_idle(c: httpx.Client, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        p = c.get("/api/extra/perf").json()
        if p["busy_slots"] == 0 and p["queue"] == 0:
            return p
        if time.monotonic() > deadline:
            return p
        time.sleep(0.05)
