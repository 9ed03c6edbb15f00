"""The Python API: every entry point (generate, generate_batch, stream, the async variants, assess)
goes through the same pipeline, so the same request gives the same answer and the same audit record."""

from __future__ import annotations

import asyncio

import pytest

from guardrail.errors import InputError
from guardrail.types import Request
from serving_support import STRENGTH, audit_records, make_guard, write_policies

VOLATILE = {"request_id", "timings_ms", "ts"}  # differ between any two requests


@pytest.fixture(scope="module")
def guarded(art_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    audit = folder / "audit.jsonl"
    guard = make_guard(art_root, write_policies(folder / "policies"), audit_log=audit)
    yield guard, audit
    guard.close()


def record_of(audit, request_id):
    (record,) = [r for r in audit_records(audit) if r.get("request_id") == request_id]
    return {k: v for k, v in record.items() if k not in VOLATILE}


def same_record(a: dict, b: dict) -> bool:
    """Equal, except that risks may differ in float noise: a padded batch row and a lone row go
    through slightly different kernels. Strength, band and output must not differ at all."""
    numeric = {"risk", "scores", "raw_scores"}
    if {k: v for k, v in a.items() if k not in numeric} != {k: v for k, v in b.items() if k not in numeric}:
        return False
    return a["risk"] == pytest.approx(b["risk"], rel=1e-5, abs=1e-9) and all(
        a[k][name] == pytest.approx(b[k][name], rel=1e-5, abs=1e-9) for k in ("scores", "raw_scores") for name in a[k]
    ) and a["scores"].keys() == b["scores"].keys()


@pytest.mark.parametrize("tenant", ["alpha", "beta"])
def test_streamed_chunks_join_to_the_generated_answer_with_the_same_audit_fields(guarded, tenant):
    guard, audit = guarded
    plain = guard.generate(Request("Tell me about lighthouses.", tenant=tenant, max_new_tokens=8))
    stream = guard.stream(Request("Tell me about lighthouses.", tenant=tenant, max_new_tokens=8))
    chunks = list(stream)
    assert len(chunks) > 1  # it really streamed
    assert "".join(chunks) == plain.text
    assert stream.result.token_ids == plain.token_ids
    assert stream.result.strength == plain.strength == STRENGTH[tenant]
    streamed, generated = record_of(audit, stream.result.request_id), record_of(audit, plain.request_id)
    assert streamed == generated
    assert generated["tenant"] == tenant and generated["output_tokens"] == len(plain.token_ids)


def test_async_variants_answer_and_audit_like_the_sync_ones(guarded):
    guard, audit = guarded
    prompt = dict(text="How do I bake bread?", tenant="beta", max_new_tokens=6)
    sync = guard.generate(Request(**prompt))

    async def main():
        one = await guard.agenerate(Request(**prompt))
        many = await guard.agenerate_batch([Request(**prompt), Request(**{**prompt, "tenant": "alpha"})])
        stream = guard.astream(Request(**prompt))
        chunks = [c async for c in stream]
        assessed = await guard.aassess(Request(**prompt))
        return one, many, chunks, stream.result, assessed

    one, many, chunks, streamed, assessed = asyncio.run(main())
    for result in (one, many[0], streamed):
        assert result.token_ids == sync.token_ids
        assert same_record(record_of(audit, result.request_id), record_of(audit, sync.request_id))
    assert "".join(chunks) == sync.text
    assert many[1].tenant == "alpha" and many[1].strength == 0.0
    assert assessed.text == "" and assessed.finish_reason == "assessed"
    assert assessed.strength == sync.strength and assessed.band == sync.band
    assert record_of(audit, assessed.request_id)["output_tokens"] == 0


def test_generate_batch_streams_each_rows_tokens_to_on_tokens(guarded):
    guard, _ = guarded
    requests = [Request(t, tenant=tenant, max_new_tokens=5) for t, tenant in
                [("Describe a cat.", "alpha"), ("Why is the sky blue?", "beta"), ("List three prime numbers.", "alpha")]]
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    results = guard.generate_batch(requests, on_tokens=lambda row, token: seen[row].append(token))
    assert [tuple(seen[i]) for i in range(3)] == [r.token_ids for r in results]
    assert [r.strength for r in results] == [0.0, 1.0, 0.0]


def test_bad_input_raises_before_a_stream_starts(guarded):
    guard, _ = guarded
    with pytest.raises(InputError, match="empty prompt"):
        guard.stream(Request("   ", tenant="alpha"))
    with pytest.raises(InputError, match="unknown tenant 'nobody'"):
        guard.stream(Request("hello", tenant="nobody"))

    async def main():
        with pytest.raises(InputError, match="max_new_tokens"):
            await guard.astream(Request("hello", tenant="alpha", max_new_tokens=10_000)).start()

    asyncio.run(main())


def test_a_string_prompt_with_fields_is_accepted_everywhere(guarded):
    guard, _ = guarded
    direct = guard.generate("Describe a cat.", tenant="alpha", max_new_tokens=4)
    assert "".join(guard.stream("Describe a cat.", tenant="alpha", max_new_tokens=4)) == direct.text
    assert asyncio.run(guard.agenerate("Describe a cat.", tenant="alpha", max_new_tokens=4)).token_ids == direct.token_ids
