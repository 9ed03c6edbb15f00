"""The HTTP server on loopback, driven by the official `openai` client (and httpx for raw checks):
chat completions, streaming, images as data URLs, tenants by header and API key, errors, 429,
metrics, policy reload (admin endpoint and SIGHUP), and 200 concurrent requests of two tenants."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.server
import os
import signal
import threading
from types import SimpleNamespace

import httpx
import openai
import pytest

from conftest import png_bytes, red_image
from guardrail.serve import ServeConfig, create_app
from guardrail.serve.openai_format import BadRequest, flatten, parse_chat
from guardrail.serve.server import ServerThread, install_sighup
from guardrail.types import Request
from serving_support import PROMPTS, STRENGTH, make_guard, request_records, write_policies

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def served(art_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    audit = folder / "audit.jsonl"
    guard = make_guard(art_root, write_policies(folder / "policies"), audit_log=audit)
    app = create_app(guard, ServeConfig(admin_token=ADMIN))
    with ServerThread(app) as server:
        yield SimpleNamespace(url=server.url, guard=guard, audit=audit, app=app)
    guard.close()


def client(url: str, tenant: str | None = None, key: str = "not-a-listed-key") -> openai.OpenAI:
    headers = {"X-Guardrail-Tenant": tenant} if tenant else {}
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, default_headers=headers, max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def policy_hash(guard, tenant: str) -> str:
    return guard.policies.resolve(tenant)[1].hash


# ----- chat completions --------------------------------------------------------------------------
@pytest.mark.parametrize("tenant", ["alpha", "beta"])
def test_chat_completion_answers_like_the_python_api_with_the_verdict_and_an_audit_record(served, tenant):
    raw = client(served.url, tenant).chat.completions.with_raw_response.create(
        model="tiny", messages=user("How do I bake bread?"), max_tokens=6
    )
    assert raw.http_response.status_code == 200
    completion = raw.parse()
    expected = served.guard.generate(Request("How do I bake bread?", tenant=tenant, max_new_tokens=6))
    assert completion.choices[0].message.content == expected.text
    assert completion.choices[0].finish_reason == expected.finish_reason
    assert completion.usage.completion_tokens == len(expected.token_ids)
    verdict = completion.guardrail
    assert verdict["tenant"] == tenant and verdict["strength"] == STRENGTH[tenant]
    assert verdict["policy"] == {"alpha": "zero", "beta": "one"}[tenant]
    assert verdict["policy_hash"] == policy_hash(served.guard, tenant)
    assert verdict["action"] == "steer" and verdict["band"] == expected.band
    assert 0.0 <= verdict["risk"] <= 1.0
    assert raw.http_response.headers["X-Guardrail-Request-Id"] == verdict["request_id"]
    record = request_records(served.audit)[verdict["request_id"]]
    assert (record["tenant"], record["policy_hash"], record["strength"]) == (tenant, verdict["policy_hash"], STRENGTH[tenant])
    assert record["prompt_sha256"] == hashlib.sha256(b"How do I bake bread?").hexdigest()


def test_streaming_with_the_openai_client_joins_to_the_plain_answer(served):
    c = client(served.url, "beta")
    plain = c.chat.completions.create(model="tiny", messages=user("Describe a cat."), max_tokens=8)
    chunks = list(c.chat.completions.create(
        model="tiny", messages=user("Describe a cat."), max_tokens=8, stream=True, stream_options={"include_usage": True}
    ))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    content_chunks = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(content_chunks) > 1
    (final,) = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason
    verdict = final.guardrail
    expected = {k: v for k, v in plain.guardrail.items() if k != "request_id"}
    assert {k: v for k, v in verdict.items() if k != "request_id"} == expected
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    records = request_records(served.audit)
    streamed, unstreamed = records[verdict["request_id"]], records[plain.guardrail["request_id"]]
    for field in ("tenant", "policy_hash", "strength", "band", "risk", "output_sha256", "output_tokens", "prompt_sha256"):
        assert streamed[field] == unstreamed[field], field


def test_the_raw_event_stream_is_openai_chunks_ending_with_done(served):
    body = {"model": "tiny", "messages": user("Why is the sky blue?"), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body,
                      headers={"X-Guardrail-Tenant": "alpha"}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert '"object": "chat.completion.chunk"' in lines[0] and '"guardrail"' in lines[-2]


def test_an_image_part_as_a_data_url_is_decoded_hashed_and_audited(served):
    png = png_bytes(red_image((24, 16)))
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": data_url(png)}},
    ]}]
    completion = client(served.url, "alpha").chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    record = request_records(served.audit)[completion.guardrail["request_id"]]
    assert record["image_sha256"] == [hashlib.sha256(png).hexdigest()]
    assert record["prompt_sha256"] == hashlib.sha256(b"What is in this picture?").hexdigest()


def test_earlier_turns_are_flattened_into_the_user_turn(served):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Describe a cat."}]},
    ]
    flat = "[Earlier conversation]\nSystem: You are terse.\nUser: Hi.\nAssistant: Hello.\n[Current message]\nDescribe a cat."
    assert parse_chat({"messages": messages}).text == flat
    completion = client(served.url, "beta").chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    record = request_records(served.audit)[completion.guardrail["request_id"]]
    assert record["prompt"] == flat  # policy `one` captures content
    assert completion.choices[0].message.content == served.guard.generate(Request(flat, tenant="beta", max_new_tokens=4)).text
    assert flatten([("user", "only one")]) == "only one"


# ----- refusals and errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, field",
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": 3, "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 7}}]}]},
         "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
        ({"messages": user("hi"), "max_tokens": "5"}, "max_tokens"),
        ({"messages": user("hi"), "max_tokens": True}, "max_tokens"),
        ({"messages": user("hi"), "stream": "yes"}, "stream"),
        ({"messages": user("hi"), "temperature": "hot"}, "temperature"),
        ({"messages": user("hi"), "model": 4}, "model"),
        ({"messages": user("hi"), "n": 2}, "n"),
        ({"messages": user("hi"), "tools": [{"type": "function"}]}, "tools"),
        ({"messages": user("hi"), "stop": ["\n"]}, "stop"),
        ({"messages": [{"role": "assistant", "content": "last"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
         "messages[0].content[0].image_url.url"),
    ],
)
def test_wrong_fields_are_400_naming_the_field(served, body, field):
    response = httpx.post(f"{served.url}/v1/chat/completions", json=body, headers={"X-Guardrail-Tenant": "alpha"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_input_errors_from_the_guard_are_400_and_bad_bodies_too(served):
    c = client(served.url, "alpha")
    with pytest.raises(openai.BadRequestError, match="empty prompt"):
        c.chat.completions.create(model="tiny", messages=user("   "))
    with pytest.raises(openai.BadRequestError, match=r"max_tokens must be between 1 and 256 \(the policy.s limits.max_new_tokens\)"):
        c.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="not a readable image"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": data_url(b"not a png")}}]}])
    for raw in (b"{not json", b"[1, 2]"):
        response = httpx.post(f"{served.url}/v1/chat/completions", content=raw,
                              headers={"X-Guardrail-Tenant": "alpha", "Content-Type": "application/json"})
        assert response.status_code == 400 and "body" in response.json()["error"]["message"]


def test_remote_image_urls_are_refused_unless_the_server_allows_them(served, tmp_path):
    png = png_bytes(red_image((8, 8), "green"))
    (tmp_path / "pic.png").write_bytes(png)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}/pic.png"
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]
    try:
        with pytest.raises(openai.BadRequestError, match="remote image URLs are refused") as refused:
            client(served.url, "alpha").chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert refused.value.body["param"] == "messages[0].content[1].image_url.url"
        local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]
        with pytest.raises(openai.BadRequestError, match="unsupported URL scheme 'file'"):
            client(served.url, "alpha").chat.completions.create(model="tiny", messages=local, max_tokens=2)
        allowing = create_app(served.guard, ServeConfig(allow_remote_images=True))
        with ServerThread(allowing) as server:
            completion = client(server.url, "alpha").chat.completions.create(model="tiny", messages=messages, max_tokens=2)
            missing = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url + ".nope"}}]}]
            with pytest.raises(openai.BadRequestError, match="HTTP 404"):
                client(server.url, "alpha").chat.completions.create(model="tiny", messages=missing, max_tokens=2)
        record = request_records(served.audit)[completion.guardrail["request_id"]]
        assert record["image_sha256"] == [hashlib.sha256(png).hexdigest()]
    finally:
        images.shutdown()


def test_tenants_come_from_the_header_or_a_listed_api_key(served):
    by_key = client(served.url, key="key-beta").chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
    assert by_key.guardrail["tenant"] == "beta" and by_key.guardrail["strength"] == 1.0
    same = client(served.url, "beta", key="key-beta").chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
    assert same.guardrail["tenant"] == "beta"
    with pytest.raises(openai.PermissionDeniedError, match="belongs to tenant 'alpha'"):
        client(served.url, "beta", key="key-alpha").chat.completions.create(model="tiny", messages=user("hi"))
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        client(served.url, key="key-typo").chat.completions.create(model="tiny", messages=user("hi"))
    with pytest.raises(openai.PermissionDeniedError, match="unknown tenant 'nobody'"):
        client(served.url, "nobody").chat.completions.create(model="tiny", messages=user("hi"))
    # No key and no header: the policies have no default_policy, so there is no tenant to serve.
    response = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": user("hi")})
    assert response.status_code == 403 and "no default_policy" in response.json()["error"]["message"]


def test_require_api_key_refuses_the_bare_header(served):
    with ServerThread(create_app(served.guard, ServeConfig(require_api_key=True))) as server:
        with pytest.raises(openai.AuthenticationError, match="unknown API key"):
            client(server.url, "alpha").chat.completions.create(model="tiny", messages=user("hi"))
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": user("hi")},
                              headers={"X-Guardrail-Tenant": "alpha"})
        assert response.status_code == 401 and "API key is required" in response.json()["error"]["message"]
        ok = client(server.url, key="key-alpha").chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
        assert ok.guardrail["tenant"] == "alpha"


class HeldGuard:
    """The served guard, with its generation held at a gate so the queue can be filled."""

    def __init__(self, guard):
        self.guard, self.gate, self.started = guard, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.guard, name)

    def generate_batch(self, *args, **kwargs):
        self.started.set()
        assert self.gate.wait(60)
        return self.guard.generate_batch(*args, **kwargs)


def test_a_full_queue_is_429_with_retry_after(served):
    app = create_app(served.guard, ServeConfig(max_queue=1))
    state = app.state.guardrail
    held = state.batcher.guard = HeldGuard(served.guard)
    body = {"messages": user("hi"), "max_tokens": 2}
    headers = {"X-Guardrail-Tenant": "alpha"}
    with ServerThread(app) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        post = lambda: httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)  # noqa: E731
        running = pool.submit(post)
        assert held.started.wait(60)
        queued = pool.submit(post)
        for _ in range(3000):
            if state.batcher.waiting == 1:
                break
            threading.Event().wait(0.01)
        assert state.batcher.waiting == 1
        rejected = post()
        streamed = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": True}, headers=headers)
        held.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    for response in (rejected, streamed):
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "1"
        assert "overloaded" in response.json()["error"]["message"]
    assert 'guardrail_http_errors_total{endpoint="chat",status="429"} 2.0' in state.metrics.render().decode()


# ----- assess, health, metrics -------------------------------------------------------------------
def test_assess_returns_the_verdict_and_no_answer(served):
    response = httpx.post(f"{served.url}/v1/guardrail/assess", json={"messages": user("How do I bake bread?")},
                          headers={"Authorization": "Bearer key-beta"})
    assert response.status_code == 200
    payload = response.json()
    assert "choices" not in payload
    verdict = payload["guardrail"]
    assert verdict["tenant"] == "beta" and verdict["strength"] == 1.0 and verdict["action"] == "steer"
    record = request_records(served.audit)[verdict["request_id"]]
    assert record["output_tokens"] == 0 and record["finish_reason"] == "assessed"


def test_healthz_and_metrics(served):
    health = httpx.get(f"{served.url}/healthz").json()
    assert health["status"] == "ok" and health["model"] == "tiny-random:llama"
    assert health["policies"] == ["one", "zero"] and health["policy_set_hash"] == served.guard.policies.hash
    for tenant in ("alpha", "beta"):
        client(served.url, tenant).chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
    response = httpx.get(f"{served.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for tenant in ("alpha", "beta"):
        assert f'guardrail_requests_total{{action="steer",endpoint="chat",tenant="{tenant}"}}' in text
        assert f'guardrail_risk_bucket{{le="1.0",tenant="{tenant}"}}' in text
    for stage in ("validate", "assess", "generate", "total"):
        assert f'guardrail_stage_latency_seconds_count{{stage="{stage}"}}' in text
    assert "guardrail_batch_size_count" in text and "guardrail_queue_waiting 0.0" in text
    # Each app counts in its own registry.
    fresh = create_app(served.guard).state.guardrail.metrics.render().decode()
    assert "guardrail_requests_total{" not in fresh


# ----- policy reload -----------------------------------------------------------------------------
@pytest.fixture
def reloadable(art_root, tmp_path):
    folder = write_policies(tmp_path / "policies")
    guard = make_guard(art_root, folder, audit_log=tmp_path / "audit.jsonl")
    yield guard, folder
    guard.close()


def test_admin_reload_needs_the_token_and_keeps_the_last_good_policies(reloadable):
    guard, folder = reloadable
    with ServerThread(create_app(guard)) as server:
        assert httpx.post(f"{server.url}/v1/guardrail/admin/reload").status_code == 404  # no token: disabled
    app = create_app(guard, ServeConfig(admin_token=ADMIN))
    with ServerThread(app) as server:
        reload = f"{server.url}/v1/guardrail/admin/reload"
        assert httpx.post(reload).status_code == 401
        assert httpx.post(reload, headers={"X-Guardrail-Admin-Token": "wrong"}).status_code == 401
        old = guard.policies.hash
        (folder / "one.yaml").write_text((folder / "one.yaml").read_text().replace("strength: 1.0", "strength: 0.5"))
        response = httpx.post(reload, headers={"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code == 200 and response.json()["ok"] and response.json()["new_hash"] != old
        answer = client(server.url, "beta").chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
        assert answer.guardrail["strength"] == 0.5
        (folder / "one.yaml").write_text("name: one\nbands: []\n")
        rejected = httpx.post(reload, headers={"X-Guardrail-Admin-Token": ADMIN})
        assert rejected.status_code == 422 and not rejected.json()["ok"] and rejected.json()["problems"]
        again = client(server.url, "beta").chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
        assert again.guardrail["strength"] == 0.5
        metrics = httpx.get(f"{server.url}/metrics").text
    assert 'guardrail_policy_reloads_total{ok="true"} 1.0' in metrics
    assert 'guardrail_policy_reloads_total{ok="false"} 1.0' in metrics


def test_sighup_reloads_the_policies(reloadable):
    guard, folder = reloadable
    state = create_app(guard).state.guardrail
    done = threading.Event()
    records = []
    previous = install_sighup(state, done=lambda record: (records.append(record), done.set()))
    try:
        old = guard.policies.hash
        (folder / "zero.yaml").write_text((folder / "zero.yaml").read_text().replace("upto: 0.5", "upto: 0.4"))
        os.kill(os.getpid(), signal.SIGHUP)
        assert done.wait(60)
    finally:
        signal.signal(signal.SIGHUP, previous)
        state.close()
    assert records[0]["ok"] and records[0]["old_hash"] == old and guard.policies.hash != old
    assert guard.policies.policies["zero"].bands[0].upto == 0.4


# ----- many clients at once ----------------------------------------------------------------------
def test_two_hundred_concurrent_http_requests_of_two_tenants(served):
    """Mixed tenants (alpha by header, beta by API key) in flight together: every answer equals its
    serial run and every audit record carries its own tenant's policy hash and strength."""
    cases = [(prompt, tenant) for prompt in PROMPTS for tenant in ("alpha", "beta")]
    serial = {case: served.guard.generate(Request(case[0], tenant=case[1], max_new_tokens=4)) for case in cases}
    clients = {"alpha": client(served.url, "alpha"), "beta": client(served.url, key="key-beta")}
    registry = served.app.state.guardrail.metrics.registry
    batched_before = registry.get_sample_value("guardrail_batch_size_sum")
    batches_before = registry.get_sample_value("guardrail_batch_size_count")

    def one(i):
        prompt, tenant = cases[i % len(cases)]
        completion = clients[tenant].chat.completions.create(model="tiny", messages=user(prompt), max_tokens=4)
        return prompt, tenant, completion

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(200)))
    records = request_records(served.audit)
    hashes = {t: policy_hash(served.guard, t) for t in ("alpha", "beta")}
    for prompt, tenant, completion in answers:
        expected = serial[(prompt, tenant)]
        assert completion.choices[0].message.content == expected.text, (prompt, tenant)
        assert completion.usage.completion_tokens == len(expected.token_ids)
        record = records[completion.guardrail["request_id"]]
        assert (record["tenant"], record["policy_hash"], record["strength"]) == (tenant, hashes[tenant], STRENGTH[tenant])
        assert record["output_sha256"] == hashlib.sha256(expected.text.encode()).hexdigest()
    # All 200 went through the micro-batcher, gathered into fewer batches than requests.
    assert registry.get_sample_value("guardrail_batch_size_sum") - batched_before == 200
    assert registry.get_sample_value("guardrail_batch_size_count") - batches_before < 200


def test_many_concurrent_streams_each_join_to_their_own_answer(served):
    """24 streams of two tenants in flight together (more than the event loop's default executor
    has threads): each joins to its own serial answer and ends with its own tenant's verdict."""
    cases = [(PROMPTS[i % 5], ("alpha", "beta")[i % 2]) for i in range(24)]
    expected = {case: served.guard.generate(Request(case[0], tenant=case[1], max_new_tokens=6)).text for case in set(cases)}

    def one(case):
        stream = client(served.url, case[1]).chat.completions.create(
            model="tiny", messages=user(case[0]), max_tokens=6, stream=True)
        chunks = list(stream)
        verdicts = [ch.guardrail for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        return case, "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), verdicts

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        for case, text, verdicts in pool.map(one, cases):
            assert text == expected[case]
            assert [v["tenant"] for v in verdicts] == [case[1]]


def test_parse_chat_rejects_what_it_cannot_honour():
    with pytest.raises(BadRequest, match="must be a JSON object"):
        parse_chat([])
    with pytest.raises(BadRequest, match="messages is required"):
        parse_chat({})
    with pytest.raises(BadRequest, match="images are accepted only in user messages"):
        parse_chat({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
                                 {"role": "user", "content": "hi"}]})
    parsed = parse_chat({"messages": user("hi"), "max_completion_tokens": 3, "temperature": 0.7, "seed": 1,
                         "stream": True, "stream_options": {"include_usage": True}})
    assert (parsed.max_new_tokens, parsed.stream, parsed.include_usage) == (3, True, True)


# ----- the command ---------------------------------------------------------------------------------
def test_guardrail_serve_command_serves_reloads_on_sighup_and_stops_on_sigterm(art_root, tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from conftest import tiny_artifacts

    folder = write_policies(tmp_path / "policies")
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    audit = tmp_path / "audit.jsonl"
    command = [sys.executable, "-m", "guardrail.cli", "serve", "--model", "tiny-random:llama",
               "--artifacts", str(tiny_artifacts("llama", art_root)), "--policies", str(folder),
               "--port", str(port), "--audit-log", str(audit), "--admin-token-file", str(token_file),
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        health = None
        for _ in range(600):
            try:
                health = httpx.get(f"{url}/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.2)
        assert health and health["policies"] == ["one", "zero"]
        answer = client(url, key="key-beta").chat.completions.create(model="tiny", messages=user("hi"), max_tokens=3)
        assert answer.guardrail["tenant"] == "beta" and answer.guardrail["strength"] == 1.0
        (folder / "one.yaml").write_text((folder / "one.yaml").read_text().replace("strength: 1.0", "strength: 0.25"))
        process.send_signal(signal.SIGHUP)
        for _ in range(300):
            if httpx.get(f"{url}/healthz").json()["policy_set_hash"] != health["policy_set_hash"]:
                break
            time.sleep(0.1)
        again = client(url, "beta").chat.completions.create(model="tiny", messages=user("hi"), max_tokens=3)
        assert again.guardrail["strength"] == 0.25
        reload = httpx.post(f"{url}/v1/guardrail/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
        assert reload.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    records = request_records(audit)
    assert records[answer.guardrail["request_id"]]["strength"] == 1.0
    assert records[again.guardrail["request_id"]]["strength"] == 0.25
