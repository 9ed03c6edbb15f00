"""The micro-batcher: gathering, per-request validation, the bounded queue, failure isolation,
streams and asyncio; then the real thing: 200 concurrent requests of two tenants on a tiny model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from types import SimpleNamespace

import pytest

from guardrail.pipeline.batching import MicroBatcher
from guardrail.errors import InputError, OverloadedError
from guardrail.types import Request, Result
from serving_support import PROMPTS, STRENGTH, make_guard, write_policies


def fake_result(request: Request, ids: tuple[int, ...], action: str = "steer") -> Result:
    return Result(
        text="".join(chr(i) for i in ids), token_ids=ids, risk=0.5, band="b", strength=0.0, action=action,
        tenant=request.tenant or "default", policy="p", policy_hash="h", visual_context="", scores={},
        timings_ms={}, request_id=request.request_id,
    )


class FakeGuard:
    """Stands in for Guardrail: answers each prompt reversed, records every batch it runs, and can
    hold its first batch at a gate so a test can fill the queue behind it."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list[str]] = []
        self.gate = gate
        self.started = threading.Event()
        self.engine = SimpleNamespace(decode=lambda ids: "".join(chr(i) for i in ids))

    def validate(self, request: Request) -> None:
        if not request.text.strip():
            raise InputError("empty prompt")

    def generate_batch(self, requests, on_tokens=None):
        self.batches.append([r.text for r in requests])
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if len(requests) > 1 and any(r.text == "poison" for r in requests):
            raise InputError("request 1: poison")  # as if a reload had made it invalid meanwhile
        if any(r.text == "poison" for r in requests):
            raise InputError("poison")
        out = []
        for row, request in enumerate(requests):
            ids = tuple(ord(c) for c in reversed(request.text))
            if on_tokens is not None:
                for token in ids:
                    on_tokens(row, token)
            out.append(fake_result(request, ids))
        return out

    def assess_batch(self, requests):
        self.batches.append(["assess:" + r.text for r in requests])
        return [fake_result(r, (), action="assessed") for r in requests]


def held(max_queue: int = 64, **kwargs):
    """A batcher whose first batch ("first") is running and held at the gate."""
    gate = threading.Event()
    guard = FakeGuard(gate)
    batcher = MicroBatcher(guard, max_queue=max_queue, window_ms=20, **kwargs)
    first = batcher.submit(Request("first"))
    assert guard.started.wait(10)
    return guard, batcher, gate, first


def test_requests_waiting_together_run_as_one_batch_each_with_its_own_answer():
    guard, batcher, gate, first = held()
    futures = [batcher.submit(Request(f"req{i}", tenant=("a" if i % 2 else "b"))) for i in range(9)]
    gate.set()
    results = [f.result(10) for f in futures]
    assert first.result(10).text == "tsrif"
    assert [r.text for r in results] == [f"req{i}"[::-1] for i in range(9)]
    assert [r.tenant for r in results] == [("a" if i % 2 else "b") for i in range(9)]
    assert guard.batches == [["first"], [f"req{i}" for i in range(9)]]
    batcher.close()


def test_max_batch_splits_the_waiting_requests():
    guard, batcher, gate, first = held(max_batch=4)
    futures = [batcher.submit(Request(f"r{i}")) for i in range(10)]
    gate.set()
    assert [f.result(10).text for f in futures] == [f"r{i}"[::-1] for i in range(10)]
    assert [len(b) for b in guard.batches] == [1, 4, 4, 2]
    batcher.close()


def test_bad_input_is_raised_to_its_own_caller_and_never_queued():
    guard, batcher, gate, first = held()
    good = batcher.submit(Request("fine"))
    with pytest.raises(InputError, match="empty prompt"):
        batcher.submit(Request("   "))
    gate.set()
    assert good.result(10).text == "enif"
    assert guard.batches == [["first"], ["fine"]]
    batcher.close()


def test_full_queue_rejects_with_overloaded_then_recovers():
    guard, batcher, gate, first = held(max_queue=2)
    queued = [batcher.submit(Request("q1")), batcher.submit(Request("q2"))]
    with pytest.raises(OverloadedError, match="overloaded: 2 requests are already waiting"):
        batcher.submit(Request("one too many"))
    assert batcher.waiting == 2
    gate.set()
    assert [f.result(10).text for f in queued] == ["1q", "2q"]
    assert batcher.generate(Request("later"), timeout=10).text == "retal"
    batcher.close()


def test_a_failing_batch_is_rerun_row_by_row_so_only_the_bad_request_fails():
    guard, batcher, gate, first = held()
    futures = [batcher.submit(Request(t)) for t in ("ok1", "poison", "ok2")]
    gate.set()
    assert futures[0].result(10).text == "1ko"
    assert futures[2].result(10).text == "2ko"
    with pytest.raises(InputError, match="^poison$"):
        futures[1].result(10)
    assert guard.batches[1] == ["ok1", "poison", "ok2"]
    assert guard.batches[2:] == [["ok1"], ["poison"], ["ok2"]]
    batcher.close()


def test_a_request_cancelled_while_waiting_is_not_run():
    guard, batcher, gate, first = held()
    dropped = batcher.submit(Request("dropped"))
    kept = batcher.submit(Request("kept"))
    assert dropped.cancel()
    gate.set()
    assert kept.result(10).text == "tpek"
    assert all("dropped" not in batch for batch in guard.batches)
    batcher.close()


def test_assess_and_generate_requests_in_one_window_run_as_separate_batches():
    guard, batcher, gate, first = held()
    gen = batcher.submit(Request("g"))
    ass = batcher.submit(Request("a"), kind="assess")
    gate.set()
    assert gen.result(10).text == "g"
    assert ass.result(10).action == "assessed"
    assert sorted(guard.batches[1:]) == [["assess:a"], ["g"]]
    batcher.close()


def test_streams_in_one_batch_each_receive_only_their_own_tokens():
    guard, batcher, gate, first = held()
    s1, s2 = batcher.stream(Request("abcdef")), batcher.stream(Request("xyz"))
    plain = batcher.submit(Request("plain"))
    gate.set()
    chunks1, chunks2 = list(s1), list(s2)
    assert "".join(chunks1) == "fedcba" == s1.result.text
    assert "".join(chunks2) == "zyx" == s2.result.text
    assert len(chunks1) == 6  # one chunk per token: tokens arrive as the batch produces them
    assert plain.result(10).text == "nialp"
    assert guard.batches[1] == ["abcdef", "xyz", "plain"]
    batcher.close()


def test_a_stream_is_admitted_when_made_so_overload_is_raised_before_any_chunk():
    guard, batcher, gate, first = held(max_queue=1)
    batcher.submit(Request("q"))
    with pytest.raises(OverloadedError):
        batcher.stream(Request("s"))
    gate.set()
    batcher.close()


def test_asyncio_callers_are_batched_together():
    guard, batcher, gate, first = held()

    async def main():
        tasks = [asyncio.create_task(batcher.agenerate(Request(f"x{i}"))) for i in range(6)]
        stream = batcher.astream(Request("stream"))
        await stream.start()
        while batcher.waiting < 7:  # all of them queued behind the held batch
            await asyncio.sleep(0.01)
        gate.set()
        chunks = [c async for c in stream]
        return [t.text for t in await asyncio.gather(*tasks)], chunks, stream.result

    texts, chunks, result = asyncio.run(main())
    assert texts == [f"x{i}"[::-1] for i in range(6)]
    assert "".join(chunks) == "maerts" == result.text
    assert sorted(guard.batches[1]) == sorted([f"x{i}" for i in range(6)] + ["stream"])
    batcher.close()


def test_overload_reaches_an_asyncio_caller_as_overloaded_error():
    guard, batcher, gate, first = held(max_queue=1)
    batcher.submit(Request("q"))

    async def main():
        with pytest.raises(OverloadedError):
            await batcher.agenerate(Request("no room"))
        with pytest.raises(OverloadedError):
            await batcher.astream(Request("no room either")).start()

    asyncio.run(main())
    gate.set()
    batcher.close()


def test_close_finishes_what_is_queued_and_refuses_new_requests():
    guard, batcher, gate, first = held()
    queued = batcher.submit(Request("queued"))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    for _ in range(1000):
        if batcher.closed:
            break
        time.sleep(0.01)
    with pytest.raises(OverloadedError, match="shut down"):
        batcher.submit(Request("too late"))
    gate.set()
    closer.join(10)
    assert queued.result(10).text == "deueuq"
    assert not batcher._worker.is_alive()


def test_parameters_are_checked():
    for kwargs in ({"max_batch": 0}, {"max_queue": 0}, {"window_ms": -1}):
        with pytest.raises(ValueError):
            MicroBatcher(FakeGuard(), **kwargs)


# ----- the real pipeline -------------------------------------------------------------------------
def test_two_hundred_concurrent_requests_of_two_tenants_match_serial_runs(art_root, tmp_path):
    """Tenants with different policies share batches; every answer equals its serial run, and every
    result and audit record carries its own tenant's policy and strength."""
    from serving_support import request_records

    audit = tmp_path / "audit.jsonl"
    guard = make_guard(art_root, write_policies(tmp_path / "policies"), audit_log=audit)
    cases = [(prompt, tenant) for prompt in PROMPTS for tenant in ("alpha", "beta")]
    serial = {case: guard.generate(Request(case[0], tenant=case[1], max_new_tokens=4)) for case in cases}

    batches: list[set[str]] = []
    batcher = MicroBatcher(guard, max_batch=32, window_ms=20, on_batch=lambda reqs: batches.append({r.tenant for r in reqs}))
    work = [cases[i % len(cases)] for i in range(200)]

    def one(case):
        request = Request(case[0], tenant=case[1], max_new_tokens=4)
        return case, request.request_id, batcher.generate(request, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, work))
    batcher.close()
    guard.close()

    hashes = {t: guard.policies.resolve(t)[1].hash for t in ("alpha", "beta")}
    records = request_records(audit)
    for (prompt, tenant), request_id, result in answers:
        assert result.token_ids == serial[(prompt, tenant)].token_ids, (prompt, tenant)
        assert result.request_id == request_id
        assert (result.tenant, result.strength, result.policy_hash) == (tenant, STRENGTH[tenant], hashes[tenant])
        record = records[request_id]
        assert (record["tenant"], record["strength"], record["policy_hash"]) == (tenant, STRENGTH[tenant], hashes[tenant])
        assert record["output_tokens"] == len(result.token_ids)
    assert any(b == {"alpha", "beta"} for b in batches), batches  # the tenants shared a batch
    assert len(batches) < 200  # requests were actually gathered


def test_async_text_stream_delivers_chunks_then_the_streams_own_error():
    from guardrail.pipeline.aio import AsyncTextStream

    def chunks():
        yield "a"
        yield "b"
        raise RuntimeError("generation broke")

    async def main():
        seen = []
        with pytest.raises(RuntimeError, match="generation broke"):
            async for chunk in AsyncTextStream(chunks):
                seen.append(chunk)
        stream = AsyncTextStream(lambda: iter(["x", "y"]))
        assert await stream.text() == "xy"
        with pytest.raises(RuntimeError, match="iterated once"):
            stream.__aiter__()
        return seen

    assert asyncio.run(main()) == ["a", "b"]
