"""The server against an attacker and a new user (issue 13): metric label cardinality and header
caps (bug 3), remote-fetch deadlines and fan-out (bugs 4, 5), client-cut streams (bug 6), and the
OpenAI-compatibility friction (`/v1/models`, JSON 404/405, `max_tokens` above the policy limit,
`/healthz` and `/metrics` under `--require-api-key`).

Every network peer is a server this module starts on 127.0.0.1; every wait is a bounded loop."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import re
import socket
import threading
from types import SimpleNamespace

import httpx
import openai
import pytest

from conftest import png_bytes, red_image
from guardrail.serve import ServeConfig, create_app
from guardrail.serve.server import ServerThread
from serving_support import audit_records, make_guard, request_records, write_policies

PNG = png_bytes(red_image((8, 8), "green"))


@pytest.fixture(scope="module")
def guard_with_default(art_root, tmp_path_factory):
    """alpha -> zero, beta -> one, and every other tenant -> zero (default_policy)."""
    folder = write_policies(tmp_path_factory.mktemp("hardening") / "policies")
    tenants = (folder / "tenants.yaml").read_text()
    (folder / "tenants.yaml").write_text("default_policy: zero\n" + tenants)
    audit = folder.parent / "audit.jsonl"
    guard = make_guard(art_root, folder, audit_log=audit)
    yield SimpleNamespace(guard=guard, audit=audit)
    guard.close()


def serve(guard_with_default, **config):
    return ServerThread(create_app(guard_with_default.guard, ServeConfig(**config)))


def chat(url: str, messages, tenant: str | None = "alpha", timeout: float = 120, **body) -> httpx.Response:
    headers = {"X-Guardrail-Tenant": tenant} if tenant else {}
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **body},
                      headers=headers, timeout=timeout)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def with_images(urls: list[str]) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "hi"}]
             + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


def wait_until(predicate, rounds: int = 1000, step: float = 0.01) -> bool:
    pause = threading.Event()
    for _ in range(rounds):
        if predicate():
            return True
        pause.wait(step)
    return predicate()


def tenant_labels(metrics_text: str) -> set[str]:
    return set(re.findall(r'tenant="([^"]*)"', metrics_text))


# ----- bug 3: label cardinality and header caps --------------------------------------------------
def test_metrics_label_listed_tenants_and_one_bucket_for_the_rest(guard_with_default):
    with serve(guard_with_default) as server:
        for i in range(30):
            assert chat(server.url, user("hi"), tenant=f"stranger-{i}-" + "x" * 100).status_code == 200
        assert chat(server.url, user("hi"), tenant="alpha").status_code == 200
        assert chat(server.url, user("hi"), tenant=None).status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
    assert tenant_labels(text) == {"alpha", "(unlisted)"}
    assert 'guardrail_requests_total{action="steer",endpoint="chat",tenant="(unlisted)"} 31.0' in text


@pytest.mark.parametrize("header, value", [
    ("X-Guardrail-Tenant", "t" * 60_000),
    ("Authorization", "Bearer " + "k" * 60_000),
])
def test_overlong_tenant_and_key_headers_are_431(guard_with_default, header, value):
    with serve(guard_with_default) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2},
                              headers={header: value})
    assert response.status_code == 431
    error = response.json()["error"]
    assert header.lower() in error["message"].lower() and "longer than" in error["message"]


# ----- bug 4: one deadline for the whole fetch ---------------------------------------------------
class DripServer:
    """Answers every GET with a 200 whose body comes one byte per `every` seconds, and counts the
    bytes it got out before the client hung up."""

    def __init__(self, total: int = 80, every: float = 0.25):
        self.total, self.every, self.sent = total, every, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow.png"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % self.total)
            for _ in range(self.total):
                if self.stop.wait(self.every):
                    return
                try:
                    conn.sendall(b"x")
                except OSError:  # the client gave up: what we are here to see
                    return
                self.sent += 1

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_dripping_image_server_is_cut_at_the_overall_deadline(guard_with_default):
    drip = DripServer(total=80, every=0.25)  # 20 s in all, each byte well inside the 10 s read timeout
    try:
        with serve(guard_with_default, allow_remote_images=True, remote_image_deadline_s=1.0) as server:
            response = chat(server.url, with_images([drip.url]))
        assert response.status_code == 400
        error = response.json()["error"]
        assert "deadline of 1" in error["message"] and error["param"] == "messages[0].content[1].image_url.url"
        assert wait_until(lambda: drip.sent < 80)
        assert drip.sent < 40  # cut: at most half of the body ever went out
    finally:
        drip.close()


# ----- bug 5: counts and sizes before fetching, bounded fan-out ----------------------------------
class ImageServer:
    """Serves PNG at any path; counts requests and the most served at once. `/huge.png` declares a
    50 MB body and sends a few bytes; `/slow.png` holds each answer until `release` is set."""

    def __init__(self):
        self.requests = 0
        self.active = self.most_active = 0
        self.release = threading.Event()
        lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with lock:
                    outer.requests += 1
                    outer.active += 1
                    outer.most_active = max(outer.most_active, outer.active)
                try:
                    if self.path == "/slow.png":
                        outer.release.wait(30)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    if self.path == "/huge.png":
                        self.send_header("Content-Length", "50000000")
                        self.end_headers()
                        self.wfile.write(PNG[:16])
                        return
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    self.wfile.write(PNG)
                finally:
                    with lock:
                        outer.active -= 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def images():
    server = ImageServer()
    yield server
    server.close()


def test_too_many_image_urls_are_refused_before_any_fetch(guard_with_default, images):
    with serve(guard_with_default, allow_remote_images=True) as server:
        response = chat(server.url, with_images([f"{images.base}/{i}.png" for i in range(12)]))
    assert response.status_code == 400
    error = response.json()["error"]
    assert "12 images exceeds the policy's limit of 4" in error["message"] and error["param"] == "messages"
    assert images.requests == 0


def test_a_declared_size_over_the_limit_is_refused_without_reading_the_body(guard_with_default, images):
    with serve(guard_with_default, allow_remote_images=True) as server:
        response = chat(server.url, with_images([f"{images.base}/huge.png"]))
    assert response.status_code == 400
    assert "declares 50000000 bytes" in response.json()["error"]["message"]


def test_concurrent_fetches_are_bounded_across_requests(guard_with_default, images):
    with serve(guard_with_default, allow_remote_images=True, remote_fetch_concurrency=1) as server, \
            concurrent.futures.ThreadPoolExecutor(3) as pool:
        posts = [pool.submit(chat, server.url, with_images([f"{images.base}/slow.png"])) for _ in range(3)]
        assert wait_until(lambda: images.requests >= 1)
        # Give the other two every chance to start a fetch of their own while the first is held.
        assert not wait_until(lambda: images.requests >= 2, rounds=50)
        images.release.set()
        statuses = [p.result().status_code for p in posts]
    assert statuses == [200, 200, 200]
    assert images.requests == 3 and images.most_active == 1


# ----- bug 6: client-cut streams -----------------------------------------------------------------
class GatedGuard:
    """The guard, with each generation held after its first token until `gate` is set."""

    def __init__(self, guard):
        self.guard, self.gate = guard, threading.Event()

    def __getattr__(self, name):
        return getattr(self.guard, name)

    def generate_batch(self, requests, on_tokens=None):
        def held(row, token):
            on_tokens(row, token)
            assert self.gate.wait(60)

        return self.guard.generate_batch(requests, on_tokens=held if on_tokens else None)


def test_cut_streams_are_counted_and_their_audit_says_the_client_left(guard_with_default):
    app = create_app(guard_with_default.guard, ServeConfig(max_batch=1))
    state = app.state.guardrail
    gated = state.batcher.guard = GatedGuard(guard_with_default.guard)
    before = {r["request_id"] for r in audit_records(guard_with_default.audit)}
    cut = []
    with ServerThread(app) as server:
        for _ in range(3):
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                              json={"messages": user("Tell me a story."), "max_tokens": 16, "stream": True},
                              headers={"X-Guardrail-Tenant": "alpha"}) as response:
                cut.append(response.headers["X-Guardrail-Request-Id"])
                next(response.iter_lines())  # the role chunk: the stream is running; then hang up
        # Wait until the server has seen every connection close, then let the generations finish.
        assert wait_until(lambda: not server.server.server_state.connections)
        gated.gate.set()
        records = lambda: request_records(guard_with_default.audit)  # noqa: E731
        left = lambda: [r for r in audit_records(guard_with_default.audit) if r.get("event") == "client_disconnected"]  # noqa: E731
        assert wait_until(lambda: all(i in records() for i in cut) and len(left()) == 3, rounds=3000)
        text = state.metrics.render().decode()
    answered = [r for r in audit_records(guard_with_default.audit)
                if r.get("event") == "request" and r["request_id"] not in before]
    assert len(answered) == 3
    assert 'guardrail_requests_total{action="steer",endpoint="chat",tenant="alpha"} 3.0' in text
    assert 'guardrail_streams_disconnected_total{endpoint="chat"} 3.0' in text
    assert sorted(r["request_id"] for r in left()) == sorted(cut)
    for r in left():  # how much went out depends on when the hang-up was seen; never more than the answer
        assert r["tenant"] == "alpha" and r["endpoint"] == "chat" and 0 <= r["chars_sent"] <= r["output_chars"]


# ----- friction: OpenAI compatibility ------------------------------------------------------------
def test_models_list_names_the_served_model(guard_with_default):
    with serve(guard_with_default, model_name="guarded-tiny") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["guarded-tiny"]
        assert client.models.retrieve("guarded-tiny").id == "guarded-tiny"
        with pytest.raises(openai.NotFoundError, match="no model 'gpt-4'"):
            client.models.retrieve("gpt-4")


def test_unknown_paths_and_methods_are_openai_error_json(guard_with_default):
    with serve(guard_with_default) as server:
        missing = httpx.get(f"{server.url}/v1/nothing-here")
        wrong = httpx.get(f"{server.url}/v1/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert "/v1/nothing-here" in missing.json()["error"]["message"]
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
    assert wrong.headers["Allow"] == "POST"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_over_the_policy_limit_is_a_400_naming_the_field(guard_with_default, field):
    with serve(guard_with_default) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": user("hi"), field: 100_000},
                              headers={"X-Guardrail-Tenant": "alpha"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field
    assert f"{field} must be between 1 and 256 (the policy's limits.max_new_tokens), got 100000" == error["message"]


def test_probes_need_a_key_under_require_api_key_unless_opened(guard_with_default):
    with serve(guard_with_default, require_api_key=True) as server:
        for path in ("/healthz", "/metrics"):
            assert httpx.get(f"{server.url}{path}").status_code == 401
            assert httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer key-typo"}).status_code == 401
            assert httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer key-alpha"}).status_code == 200
    with serve(guard_with_default, require_api_key=True, open_probes=True) as server:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200
    with serve(guard_with_default) as server:  # without --require-api-key they stay open, as before
        assert httpx.get(f"{server.url}/healthz").status_code == 200
