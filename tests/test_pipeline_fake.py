"""The pipeline on a FakeBackend: no weights, no calibration. Tests read like transcripts; the
OpenTelemetry spans are read back from the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio

import pytest

from fake_backend import FakeBackend
from guardrail import hookimpl
from guardrail.engine.interventions import NO_STEERING, ForcedPrefix, SteeringPlan
from guardrail.pipeline import Guardrail
from guardrail.plugin.manager import PluginManager
from guardrail.plugin.protocols import RiskNeeds, Score
from guardrail.types import Request

POLICY = """
name: words
reformulator: {use: plain}
risk: {assessors: [{use: bomb_word}]}
steering: {use: say_no}
bands:
  - {name: low, upto: 0.5, strength: 0.0}
  - {name: high, upto: 1.0, strength: 1.0}
audit: {capture_content: CAPTURE}
limits: {max_new_tokens: 16}
"""


class BombWord:
    """Risk 0.9 when the risk pass's state says the prompt has the word 'bomb', else 0.1."""

    def needs(self, env):
        return RiskNeeds(layers=frozenset([0]))

    def score(self, risk_pass, contexts, env):
        return [Score(risk=0.9 if row[1] > 0 else 0.1, raw=float(row[1])) for row in risk_pass.states[0]]


class SayNo:
    interventions = (ForcedPrefix,)

    def check(self, env, policy):
        self.ids = tuple(env.engine.encode_text("Sorry, no."))

    def plan(self, strength, tokens):
        if strength <= 0:
            return NO_STEERING
        return SteeringPlan((ForcedPrefix(self.ids),), strength, len(self.ids), "say_no")


class Stages:
    @hookimpl
    def guardrail_register_risk_assessors(self, register):
        register("bomb_word", BombWord)

    @hookimpl
    def guardrail_register_steering_controllers(self, register):
        register("say_no", SayNo)


@pytest.fixture
def make(tmp_path):
    def build(capture: bool = False, tracer=None):
        (tmp_path / "words.yaml").write_text(POLICY.replace("CAPTURE", "true" if capture else "false"))
        engine = FakeBackend()
        plugins = PluginManager(entry_points=False, plugins=[Stages()])
        return Guardrail(engine, tmp_path / "words.yaml", plugins=plugins, tracer=tracer), engine

    return build


def test_a_transcript(make):
    guard, engine = make()
    bread = guard.generate("How do I bake bread?")
    assert (bread.text, bread.band, bread.action, bread.strength) == ("Here is a plain answer.", "low", "steer", 0.0)
    bomb = guard.generate("How do I build a bomb?")
    assert (bomb.text, bomb.band, bomb.strength) == ("Sorry, no.", "high", 1.0)
    # the unsteered row got an empty plan; the steered one exactly the controller's ForcedPrefix
    assert engine.generated[0][1] == [NO_STEERING]
    assert engine.generated[1][1][0].method == "say_no"


def test_a_batch_steers_only_its_risky_row(make):
    guard, engine = make()
    results = guard.generate_batch([Request("Tell me a joke."), Request("Make a bomb."), Request("Hi there.")])
    assert [r.band for r in results] == ["low", "high", "low"]
    assert len(engine.generated) == 1  # one shared generation for the batch
    assert [p.active for p in engine.generated[0][1]] == [False, True, False]


@pytest.fixture
def spans():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def _tree(exporter):
    finished = exporter.get_finished_spans()
    roots = [s for s in finished if s.parent is None]
    children = {r.context.span_id: [s for s in finished if s.parent is not None and s.parent.span_id == r.context.span_id]
                for r in roots}
    return roots, children


def test_one_span_per_request_and_one_per_stage(make, spans):
    tracer, exporter = spans
    guard, _ = make(tracer=tracer)
    guard.generate_batch([Request("Make a bomb.", tenant="default"), Request("Hello.")])
    roots, children = _tree(exporter)
    assert [r.name for r in roots] == ["guardrail.generate", "guardrail.generate"]
    for root in roots:
        names = [c.name for c in children[root.context.span_id]]
        assert names == ["guardrail.reformulate", "guardrail.assess", "guardrail.decide", "guardrail.generate", "guardrail.audit"]
        for child in children[root.context.span_id]:
            assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    bomb = roots[0].attributes
    assert bomb["guardrail.band"] == "high" and bomb["guardrail.strength"] == 1.0 and bomb["guardrail.risk"] == 0.9
    assert bomb["guardrail.policy"] == "words" and len(bomb["guardrail.policy_hash"]) == 64
    assert "guardrail.timing_ms.total" in bomb
    assert not any(k in bomb for k in ("guardrail.prompt", "guardrail.output"))  # content off by default


def test_content_is_attached_only_when_the_policy_captures_it(make, spans):
    tracer, exporter = spans
    guard, _ = make(capture=True, tracer=tracer)
    guard.generate("Hello.")
    roots, _ = _tree(exporter)
    assert roots[0].attributes["guardrail.prompt"] == "Hello." and roots[0].attributes["guardrail.output"]


def test_async_and_assess_paths_have_their_spans(make, spans):
    tracer, exporter = spans
    guard, _ = make(tracer=tracer)
    asyncio.run(guard.agenerate("Hello."))
    guard.assess("Make a bomb.")
    roots, children = _tree(exporter)
    assert [r.name for r in roots] == ["guardrail.generate", "guardrail.assess"]
    assessed = [c.name for c in children[roots[1].context.span_id]]
    assert assessed == ["guardrail.reformulate", "guardrail.assess", "guardrail.decide", "guardrail.audit"]


def test_a_refused_batch_gets_one_error_span(make, spans):
    from opentelemetry.trace import StatusCode

    from guardrail.errors import InputError

    tracer, exporter = spans
    guard, _ = make(tracer=tracer)
    with pytest.raises(InputError, match="empty prompt"):
        guard.generate("   ")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR and "empty prompt" in span.status.description


def test_a_stage_missing_a_protocol_method_is_refused_at_load(tmp_path):
    from guardrail.errors import PolicyError

    class Broken:
        @hookimpl
        def guardrail_register_risk_assessors(self, register):
            register("bomb_word", lambda: object())  # no needs(), no score()

        @hookimpl
        def guardrail_register_steering_controllers(self, register):
            register("say_no", SayNo)

    (tmp_path / "words.yaml").write_text(POLICY.replace("CAPTURE", "false"))
    with pytest.raises(PolicyError, match="risk assessor 'bomb_word' \\(object\\) lacks needs, score"):
        Guardrail(FakeBackend(), tmp_path / "words.yaml", plugins=PluginManager(entry_points=False, plugins=[Broken()]))


def test_the_audit_record_says_when_the_default_policy_served(tmp_path):
    from fault_plugins import RecordingSink

    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "words.yaml").write_text(POLICY.replace("CAPTURE", "false"))
    (folder / "tenants.yaml").write_text("default_policy: words\ntenants:\n  acme: words\n")
    sink = RecordingSink()
    guard = Guardrail(FakeBackend(), folder, plugins=PluginManager(entry_points=False, plugins=[Stages()]), audit_sinks=[sink])
    guard.generate(Request("Hi there.", tenant=" Acme "))  # a listed tenant, however it is spelled
    guard.generate(Request("Hi there.", tenant="stranger"))
    assert [(r["tenant"], r["default_policy"]) for r in sink.records if r["event"] == "request"] == [
        ("acme", False), ("stranger", True)]


BLOCK_TORCH = """
import sys, importlib.abc
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "safetensors", "numpy"):
            raise ImportError(f"{name} is unimportable in this run")
sys.meta_path.insert(0, NoTorch())
import pytest
sys.exit(pytest.main(["-q", "-o", "addopts=", "-p", "no:cacheprovider", "-k", "not without_torch", sys.argv[1]]))
"""


def test_the_fake_pipeline_runs_without_torch(tmp_path):
    """Every test above again, in a process where torch (and transformers, safetensors, numpy)
    cannot be imported: the plugins register, policies load and the pipeline runs without them."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "no_torch.py"
    script.write_text(BLOCK_TORCH, encoding="utf-8")
    here = Path(__file__).resolve()
    done = subprocess.run([sys.executable, str(script), str(here)], cwd=here.parent, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout and " skipped" not in done.stdout
