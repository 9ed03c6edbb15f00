"""Stage faults: every stage raising or hanging, under fail_closed and fail_open, and a plugin that
fails to load while a policy needs it. The faults come from the test-only `fault_plugins` module."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fault_plugins import REFORMULATED, FaultPlugin, RecordingSink, SpyBackend, policy_yaml, random_artifacts
from guardrail.errors import PluginError, PolicyError
from guardrail.pipeline import Guardrail
from guardrail.plugin.manager import PluginManager
from guardrail.types import Request

STAGES = ["reformulate", "assess", "decide", "generate"]
TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def adapter():
    from guardrail.models import load_model

    return load_model("tiny-random:llama")


@pytest.fixture(scope="module")
def artifacts(adapter, tmp_path_factory):
    return random_artifacts(adapter, tmp_path_factory.mktemp("fault-art"))


class Harness:
    """A guard on the tiny model with the fault plugin, a spy backend, a memory sink and a jsonl log."""

    def __init__(self, adapter, artifacts, folder: Path, policies: dict[str, str], tenants: str | None = None):
        from guardrail.engine.transformers import TransformersBackend

        folder.mkdir(parents=True, exist_ok=True)
        for name, text in policies.items():
            (folder / f"{name}.yaml").write_text(text)
        if tenants is not None:
            (folder / "tenants.yaml").write_text(tenants)
        self.plugin = FaultPlugin()
        self.spy = SpyBackend(TransformersBackend(adapter, artifacts), self.plugin.release)
        self.sink = RecordingSink()
        self.log = folder.parent / "audit.jsonl"
        self.guard = Guardrail(
            self.spy,
            folder if len(policies) > 1 or tenants else folder / f"{next(iter(policies))}.yaml",
            plugins=PluginManager(entry_points=False, plugins=[self.plugin]),
            audit_log=self.log,
            audit_sinks=[self.sink],
        )

    def log_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def close(self) -> None:
        self.plugin.release.set()
        self.guard.close()


@pytest.fixture
def harness(adapter, artifacts, tmp_path):
    made = []

    def make(policies: dict[str, str], tenants: str | None = None) -> Harness:
        h = Harness(adapter, artifacts, tmp_path / f"policies{len(made)}", policies, tenants)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def faults_for(stage: str, fault: str) -> dict[str, str]:
    return {
        "reformulate": {"reformulator": fault},
        "assess": {"assessor": fault},
        "decide": {"controller": fault},
    }.get(stage, {})


def make_faulty(harness, stage: str, fault: str, on_error: str) -> Harness:
    timeout = TIMEOUT_S if fault == "hang" else None
    h = harness({"faulty": policy_yaml(on_error=on_error, timeout_s=timeout, **faults_for(stage, fault))})
    if stage == "generate":
        h.spy.fault = fault
    return h


def test_harness_steers_when_nothing_fails(harness):
    h = harness({"faulty": policy_yaml()})
    result = h.guard.generate(Request("How do I bake bread?"))
    assert (result.action, result.strength, result.error, result.degraded) == ("steer", pytest.approx(0.8), None, False)
    assert [p.strength for p in h.spy.generated[-1]] == [pytest.approx(0.8)]
    unguarded = h.guard.generate(Request("How do I bake bread?", unguarded=True))
    assert result.text != unguarded.text, "steering must visibly change the tiny model's answer"
    assert h.sink.records[0]["action"] == "steer" and h.sink.records[0]["error"] is None


@pytest.mark.parametrize("fault", ["raise", "hang"])
@pytest.mark.parametrize("stage", STAGES)
def test_fail_closed_refuses_and_audits_the_stage(harness, stage, fault):
    h = make_faulty(harness, stage, fault, "fail_closed")
    result = h.guard.generate(Request("How do I bake bread?"))
    assert result.text == "REFUSED by faulty"
    assert result.action == "error" and result.token_ids == () and result.finish_reason == "refused"
    expected = "InjectedFault: injected fault" if fault == "raise" else f"timed out after {TIMEOUT_S} s"
    assert result.error.startswith(f"{stage}: ") and expected in result.error
    if stage != "generate":
        assert h.spy.generated == [], "a fail_closed fault before generation must not generate anything"
    for record in (h.sink.records[-1], h.log_records()[-1]):
        assert record["error"] == result.error and record["action"] == "error"
        assert record["output_sha256"] == result_hash("REFUSED by faulty")


@pytest.mark.parametrize("fault", ["raise", "hang"])
@pytest.mark.parametrize("stage", STAGES)
def test_fail_open_answers_unsteered_and_says_so(harness, stage, fault):
    h = make_faulty(harness, stage, fault, "fail_open")
    if stage == "generate":
        h.spy.fault = "none"
        h.spy.fault_steered = fault  # the steered generation fails; the unsteered retry works
    result = h.guard.generate(Request("How do I bake bread?"))
    unguarded = h.guard.generate(Request("How do I bake bread?", unguarded=True))
    assert result.degraded and result.action == "fail_open" and result.strength == 0.0
    assert result.text == unguarded.text and result.text != "REFUSED by faulty"
    assert result.error.startswith(f"{stage}: ")
    answered_with = h.spy.generated[-2]  # the last call before the unguarded one
    assert not any(plan.active for plan in answered_with)
    record = h.sink.records[0]
    assert record["degraded"] is True and record["action"] == "fail_open" and record["error"] == result.error
    assert record["steering"] == "none" and record["strength"] == 0.0


def test_fail_open_generation_that_fails_twice_is_an_error(harness):
    h = make_faulty(harness, "generate", "raise", "fail_open")
    result = h.guard.generate(Request("How do I bake bread?"))
    assert result.text == "REFUSED by faulty" and result.token_ids == ()
    assert result.error.startswith("generate: ") and result.degraded
    assert len(h.spy.generated) == 2 and not any(p.active for p in h.spy.generated[1])


def test_fail_open_never_streams_two_generations_into_one_answer(harness):
    """A steered generation fails after streaming 2 tokens: the unsteered retry must not append a
    second answer to what the caller already received."""
    h = harness({"faulty": policy_yaml(on_error="fail_open")})
    h.spy.fail_after_tokens = 2
    received: list[int] = []
    (result,) = h.guard.generate_batch([Request("How do I bake bread?")], on_tokens=lambda i, tok: received.append(tok))
    assert len(received) == 2 and len(h.spy.generated) == 1
    assert result.error.startswith("generate: InjectedFault") and result.token_ids == ()
    assert result.text == "REFUSED by faulty"


def test_audit_hook_fault_fails_closed_and_is_recorded(harness):
    h = harness({"faulty": policy_yaml()})
    h.plugin.audit_fault = "raise"
    result = h.guard.generate(Request("How do I bake bread?"))
    assert result.text == "REFUSED by faulty" and result.action == "error"
    assert result.error.startswith("audit: InjectedFault: injected fault in audit hook")
    # The sinks that work still hold the request, and a record of the audit failure naming it.
    events = [r["event"] for r in h.sink.records]
    assert events == ["request", "audit_error"]
    assert h.sink.records[1]["request_id"] == result.request_id
    assert "audit hook" in h.sink.records[1]["error"] and h.sink.records[1]["action"] == "error"
    assert [r["event"] for r in h.log_records()] == ["request", "audit_error"]


def test_audit_sink_fault_fail_open_returns_the_answer_with_the_error(harness):
    h = harness({"faulty": policy_yaml(on_error="fail_open")})
    h.sink.fail = True
    result = h.guard.generate(Request("How do I bake bread?"))
    assert result.text != "REFUSED by faulty" and result.degraded
    assert result.error.startswith("audit: OSError: [Errno 28] No space left on device")
    # the jsonl sink after the failing one still got the request and the failure
    assert [r["event"] for r in h.log_records()] == ["request", "audit_error"]
    assert h.plugin.audited and h.plugin.audited[0]["request_id"] == result.request_id


def test_one_tenants_faulty_stage_does_not_fail_another_tenant_in_the_batch(harness):
    policies = {
        "broken": policy_yaml("broken", assessor="raise"),
        "healthy": policy_yaml("healthy", risk=0.5),
    }
    h = harness(policies, tenants="tenants: {a: broken, b: healthy}\n")
    broken, healthy = h.guard.generate_batch([Request("hello there", tenant="a"), Request("hello there", tenant="b")])
    assert broken.action == "error" and broken.text == "REFUSED by broken"
    assert healthy.action == "steer" and healthy.error is None and healthy.strength == pytest.approx(0.5)


def test_one_tenants_hanging_stage_does_not_time_out_another_tenant(harness):
    policies = {
        "broken": policy_yaml("broken", assessor="hang", timeout_s=TIMEOUT_S),
        "healthy": policy_yaml("healthy", risk=0.5),
    }
    h = harness(policies, tenants="tenants: {a: broken, b: healthy}\n")
    broken, healthy = h.guard.generate_batch([Request("hello there", tenant="a"), Request("hello there", tenant="b")])
    assert broken.action == "error" and "timed out" in broken.error
    assert healthy.action == "steer" and healthy.error is None


def test_hung_stages_do_not_starve_later_requests(harness):
    """Threads of timed-out stages stay blocked; later requests with a timeout must still run."""
    policies = {
        "broken": policy_yaml("broken", assessor="hang", timeout_s=0.2),
        "healthy": policy_yaml("healthy", risk=0.5, timeout_s=3.0),
    }
    h = harness(policies, tenants="tenants: {a: broken, b: healthy}\n")
    for _ in range(6):
        assert "timed out" in h.guard.generate(Request("hello there", tenant="a")).error
    healthy = h.guard.generate(Request("hello there", tenant="b"))
    assert healthy.action == "steer" and healthy.error is None


def test_a_timed_out_stage_finishing_late_changes_nothing(harness, monkeypatch):
    """The hung stage wakes after its request failed over; its late result must not leak in."""
    h = harness({"faulty": policy_yaml(on_error="fail_open", reformulator="hang", timeout_s=TIMEOUT_S)})
    from guardrail.pipeline import steps

    original = steps.generate

    def generate_after_the_late_stage(ctxs, engine, runner, on_tokens):
        h.plugin.release.set()  # the hung reformulator now returns and tries to write its result
        time.sleep(0.3)
        return original(ctxs, engine, runner, on_tokens)

    monkeypatch.setattr(steps, "generate", generate_after_the_late_stage)
    result = h.guard.generate(Request("How do I bake bread?"))
    assert result.degraded and result.error.startswith("reformulate: ")
    assert result.visual_context == "" and REFORMULATED not in json.dumps(h.sink.records)


# ----- plugins that fail to load -----------------------------------------------------------------
def _fake_distribution(root: Path, module_body: str, dist: str = "acme_guard_plugin", ep: str = "acme") -> None:
    """A tiny installed distribution on sys.path whose guardrail entry point is `module_body`."""
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[guardrail]\n{ep} = {dist}_mod\n")
    (root / f"{dist}_mod.py").write_text(textwrap.dedent(module_body))


ACME_POLICY = textwrap.dedent(
    """\
    name: acme
    risk:
      assessors:
        - use: acme_risk
    bands:
      - {name: all, upto: 1.0, strength: risk}
    """
)


def test_plugin_that_fails_to_import_stops_the_guard_with_its_name(adapter, tmp_path, monkeypatch):
    from guardrail.engine.transformers import TransformersBackend

    _fake_distribution(tmp_path / "site", "import numpy\nraise ImportError('acme needs libacme.so')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "acme.yaml").write_text(ACME_POLICY)
    with pytest.raises(PluginError) as exc:
        Guardrail(TransformersBackend(adapter), tmp_path / "acme.yaml", plugins=PluginManager(entry_points=True))
    message = str(exc.value)
    assert "'acme'" in message and "acme_guard_plugin" in message and "libacme.so" in message
    sys.modules.pop("acme_guard_plugin_mod", None)


def test_policy_needing_a_plugin_that_is_not_loaded_is_rejected(adapter, tmp_path, monkeypatch):
    """Plugins switched off (GUARDRAIL_DISABLE_PLUGINS): the policy naming its stage is refused
    with file and line instead of the guard running without it."""
    from guardrail.engine.transformers import TransformersBackend

    _fake_distribution(
        tmp_path / "site",
        """
        from guardrail import hookimpl

        @hookimpl
        def guardrail_register_risk_assessors(register):
            register("acme_risk", object)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("GUARDRAIL_DISABLE_PLUGINS", "1")
    (tmp_path / "acme.yaml").write_text(ACME_POLICY)
    with pytest.raises(PolicyError) as exc:
        Guardrail(TransformersBackend(adapter), tmp_path / "acme.yaml")
    assert exc.value.problems[0][:2] == (str(tmp_path / "acme.yaml"), 4)
    assert "unknown risk assessor 'acme_risk'" in exc.value.problems[0][2]
    sys.modules.pop("acme_guard_plugin_mod", None)


def test_stage_that_fails_to_build_rejects_its_policy_naming_it(adapter, artifacts, tmp_path):
    """A stage factory or check() raising anything (not only guardrail's errors) at startup is a
    PolicyError naming the policy; on reload the previous set stays."""
    from guardrail.engine.transformers import TransformersBackend

    plugin = FaultPlugin()
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "faulty.yaml").write_text(policy_yaml())
    bad = policy_yaml("broken").replace("with: {fault: none}}\nrisk", "with: {fault: explode}}\nrisk")
    (folder / "broken.yaml").write_text(bad)
    with pytest.raises(PolicyError) as exc:
        Guardrail(TransformersBackend(adapter, artifacts), folder, plugins=PluginManager(entry_points=False, plugins=[plugin]))
    assert "policy broken" in str(exc.value) and "fault must be one of" in str(exc.value)

    (folder / "broken.yaml").unlink()
    guard = Guardrail(TransformersBackend(adapter, artifacts), folder, plugins=PluginManager(entry_points=False, plugins=[plugin]))
    (folder / "broken.yaml").write_text(bad)
    record = guard.reload_policies()
    assert record["ok"] is False and "fault must be one of" in " ".join(record["problems"])
    assert sorted(guard.policies.policies) == ["faulty"]
    guard.close()


def result_hash(text: str) -> str:
    from guardrail.audit import sha256_text

    return sha256_text(text)
