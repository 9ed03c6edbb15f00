"""`guardrail bench --backend vllm`: the guard on vLLM, against plain vLLM and against the guard on
transformers (issue 14). Text-only (SmolLM2 by default); every number is a median over `rounds`.

Keys of the report:

    vllm_guarded_over_plain_throughput   32 mixed-tenant requests at once: plain vLLM time / guarded time
                                         (same engine; guarded = risk pass + steered answers)
    vllm_steer_per_token_ratio           per decode token, every row steered on every step vs none
                                         ((T(n) - T(1)) / (n - 1), answers forced to length n)
    vllm_guarded_latency_ratio           one request, 128-token answer: guarded / plain
    vllm_default_guarded_over_plain_throughput
                                         the same 32 requests under policies/default.yaml, whose
                                         pooled_probe reads layer states from the states server
                                         (a second engine on the same CPUs here)
    vllm_over_transformers_guarded_throughput, vllm_over_transformers_guarded_p95
                                         the same open-loop stream of mixed requests (harmful ones end
                                         in a ~14-token steered refusal, benign answers run to 128
                                         tokens), guarded on vLLM (continuous batching) vs guarded on
                                         transformers behind its micro-batcher: throughput ratio and
                                         p95 latency ratio (transformers p95 / vLLM p95: > 1 = vLLM lower)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

# The guarded policy (prototype-similarity risk, full-strength steering above 0.3 for 16 tokens) and
# its observe twin, in policies/bench/vllm/: the two tenants of the mixed stream.
POLICY_DIR = Path(__file__).resolve().parents[2] / "policies" / "bench" / "vllm"
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"

TARGETS = {
    "vllm_guarded_over_plain_throughput": (">=", 0.90),
    "vllm_steer_per_token_ratio": ("<=", 1.02),
    "vllm_over_transformers_guarded_throughput": (">=", 1.0),
    "vllm_over_transformers_guarded_p95": (">=", 1.0),
}


def _policies(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(POLICY_DIR.glob("*.yaml")):
        shutil.copyfile(path, folder / path.name)
    return folder


def _prompts() -> tuple[list[str], list[str]]:
    from guardrail.calibration import packaged_prompts

    return packaged_prompts("harmful")[2::4], packaged_prompts("benign")[2::4]


def _median(fn: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _stream(submit: Callable[[Any], Any], requests: list[Any], interval_s: float) -> dict[str, float]:
    """Open loop: request i is sent at i * interval_s whatever the others are doing."""
    latencies: list[float] = [0.0] * len(requests)
    start = time.perf_counter()

    def one(i: int) -> None:
        delay = start + i * interval_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = time.perf_counter()
        submit(requests[i])
        latencies[i] = time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        list(pool.map(one, range(len(requests))))
    makespan = time.perf_counter() - start
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"throughput_rps": len(requests) / makespan, "p95_s": p95, "median_s": statistics.median(latencies),
            "makespan_s": makespan}


def run(model: str, artifacts: Path | None, rounds: int, batch: int, answer_tokens: int, interval_ms: float,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    from guardrail.engine.interventions import NO_STEERING, LogitInterpolation, SteeringPlan
    from guardrail.engine.vllm import build
    from guardrail.pipeline import Guardrail
    from guardrail.pipeline.batching import MicroBatcher
    from guardrail.types import ChatRow, Request

    work = Path(tempfile.mkdtemp(prefix="guardrail-vllm-bench-"))
    policies = _policies(work / "policies")
    if artifacts is None:
        artifacts = work / "artifacts"
        log("calibrating a small artifact on transformers ...")
        from guardrail.calibration import CalibrationConfig, calibrate, packaged_prompts
        from guardrail.engine.transformers import TransformersBackend
        from guardrail.models import load_model

        cfg = CalibrationConfig(elicit_prompts=32, progress=False, held_out_folds=0, folds=3)
        calibrate(TransformersBackend(load_model(model)), packaged_prompts("harmful")[::4],
                  packaged_prompts("benign")[::4], cfg, out=artifacts)
    harmful, benign = _prompts()
    mixed = [(harmful if i % 2 else benign)[i // 2 % min(len(harmful), len(benign))] for i in range(batch)]
    tenants = ["acme" if i % 4 < 2 else "lab" for i in range(batch)]
    report: dict[str, Any] = {"model": model, "config": {"rounds": rounds, "batch": batch, "answer_tokens": answer_tokens,
                              "interval_ms": interval_ms}, "machine": {"cpus": os.cpu_count(),
                              "loadavg_start": list(os.getloadavg())}}
    log("starting vLLM ...")
    t = time.perf_counter()
    engine = build(model, artifacts, threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None)
    report["vllm_start_s"] = time.perf_counter() - t
    try:
        guard = Guardrail(engine, policies)
        rows = [ChatRow(p) for p in mixed]
        requests = [Request(p, tenant=tn, max_new_tokens=answer_tokens) for p, tn in zip(mixed, tenants)]
        engine.generate(rows[:2], [NO_STEERING] * 2, 4)  # warm-up

        log(f"{batch} mixed-tenant requests at once: plain vs guarded ...")
        plain = _median(lambda: engine.generate(rows, [NO_STEERING] * batch, answer_tokens), rounds)
        guarded = _median(lambda: guard.generate_batch(requests), rounds)
        report["vllm_plain_batch_s"], report["vllm_guarded_batch_s"] = plain, guarded
        report["vllm_guarded_over_plain_throughput"] = plain / guarded
        if engine.states is not None:  # the default policy: pooled layer states from the states server
            log(f"{batch} requests at once under policies/default.yaml (states server) ...")
            default = Guardrail(engine, DEFAULT_POLICY)
            plain_requests = [Request(p, max_new_tokens=answer_tokens) for p in mixed]
            default_s = _median(lambda: default.generate_batch(plain_requests), rounds)
            report["vllm_default_guarded_batch_s"] = default_s
            report["vllm_default_guarded_over_plain_throughput"] = plain / default_s
        t = time.perf_counter()
        guard.assess_batch(requests)
        report["vllm_risk_pass_batch_s"] = time.perf_counter() - t
        # What the readout replaced: the same rows' risk pass as full-vocabulary log-probabilities
        # of the same greedy steps (what an assessor asking for raw step logits still gets).
        from guardrail.method.prompts import risk_row

        risk_rows = [risk_row(p) for p in mixed]
        steps = int(engine.artifacts.block("prototype_similarity").meta["steps"])
        t = time.perf_counter()
        engine.risk_pass(risk_rows, steps, [])
        report["vllm_logprob_risk_pass_batch_s"] = time.perf_counter() - t
        log("steering per decode token ...")
        target = engine.artifacts.tensors["prototypes/logits"]
        n = min(answer_tokens, int(target.shape[0]))
        steer = SteeringPlan((LogitInterpolation(0.5, n, target),), 0.5, n)
        ids = [engine.prompt_ids(r) for r in rows]

        def forced(plan: SteeringPlan, length: int) -> Callable[[], Any]:
            extra = engine.xargs(plan)
            bodies = [engine._body(p, length, min_tokens=length, **({"vllm_xargs": extra} if extra else {})) for p in ids]
            return lambda: engine._map(engine._post, bodies)

        t_on, t_on1 = _median(forced(steer, n), rounds), _median(forced(steer, 1), rounds)
        t_off, t_off1 = _median(forced(NO_STEERING, n), rounds), _median(forced(NO_STEERING, 1), rounds)
        report["vllm_steer_per_token_ratio"] = ((t_on - t_on1) / (n - 1)) / ((t_off - t_off1) / (n - 1))
        report["vllm_steer_tokens"] = n

        log("one request, 128-token answer: plain vs guarded ...")
        one = Request(benign[0], tenant="lab", max_new_tokens=128)
        single_plain = _median(lambda: engine.generate([ChatRow(benign[0])], [NO_STEERING], 128), rounds)
        single_guarded = _median(lambda: guard.generate(one), rounds)
        report["vllm_guarded_latency_ratio"] = single_guarded / single_plain

        log(f"open-loop stream of {batch} mixed requests, one every {interval_ms:.0f} ms: vLLM ...")
        stream = [Request(p, tenant="acme", max_new_tokens=128) for p in mixed]
        on_vllm = _stream(guard.generate, stream, interval_ms / 1000)
    finally:
        engine.close()

    log("... and transformers behind its micro-batcher ...")
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.method.artifacts import load_artifacts
    from guardrail.models import load_model

    adapter = load_model(model)
    hf = Guardrail(TransformersBackend(adapter, load_artifacts(artifacts, adapter.fingerprint()), batch_size=batch), policies)
    batcher = MicroBatcher(hf, max_batch=batch, window_ms=10.0)
    try:
        hf.generate_batch(stream[:2])  # warm-up
        on_hf = _stream(batcher.generate, stream, interval_ms / 1000)
    finally:
        batcher.close()
    report["stream"] = {"vllm": on_vllm, "transformers": on_hf}
    report["vllm_over_transformers_guarded_throughput"] = on_vllm["throughput_rps"] / on_hf["throughput_rps"]
    report["vllm_over_transformers_guarded_p95"] = on_hf["p95_s"] / on_vllm["p95_s"]
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["targets"] = {k: {"target": f"{op} {v}", "met": (report[k] >= v) if op == ">=" else (report[k] <= v)}
                         for k, (op, v) in TARGETS.items()}
    return report


def execute(args: Any) -> int:
    import sys

    model = "smollm2" if args.model.startswith("tiny-random:") else args.model  # text-only on vLLM
    report = run(model, args.artifacts, max(1, args.rounds), args.vllm_batch, args.answer_tokens, args.vllm_interval_ms,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    emit(report, args.out)
    return 0


def emit(report: dict[str, Any], out: Path | None) -> None:
    """The report as JSON on stdout, and in `out` when given."""
    text = json.dumps(report, indent=2) + "\n"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
    print(text)
