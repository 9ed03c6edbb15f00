"""`guardrail bench --backend vllm --verdicts`: do the vLLM and transformers backends give the same
verdicts on the evaluation requests? (issue 14, "same verdicts")

For each policy (default: policies/default.yaml, which reads pooled layer states through the states
server, and policies/paper.yaml, the paper's similarity read in the engine), every text request of
the evaluation sets in `--data` (HarmBench, the benign, sensitive-but-benign and matched-harmful
lists that `guardrail data` prepares) is assessed on both backends with the same artifact: band,
strength (to 1e-3: paper.yaml's strength is the risk itself) and risk are compared. Then the first
`sample` requests (harmful and benign interleaved) are answered on both: unsteered rows must give identical tokens; for steered rows the report counts
identical answers and lists every difference with the first position where the tokens part (a
greedy tie under float32 reordering shows as a late, isolated split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
POLICIES = [REPO / "policies" / "default.yaml", REPO / "policies" / "paper.yaml"]
SETS = ["harmbench", "benign", "edgy", "harmful_matched"]
STRENGTH_TOLERANCE = 1e-3


def _prompts(data: Path) -> dict[str, list[str]]:
    from guardrail.errors import InputError

    out: dict[str, list[str]] = {}
    for name in SETS:
        path = data / f"{name}.jsonl"
        if not path.is_file():
            raise InputError(f"--data {data}: no {path.name} (run `guardrail data --dir {data}`)")
        out[name] = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def _first_split(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare(model: str, artifacts: Path, data: Path, *, sample: int = 64, answer_tokens: int = 32,
            policies: list[Path] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start both backends on `artifacts` and compare them on the evaluation sets in `data`."""
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.engine.vllm import build
    from guardrail.method.artifacts import load_artifacts
    from guardrail.models import load_model

    sets = _prompts(data)
    adapter = load_model(model)
    hf = TransformersBackend(adapter, load_artifacts(artifacts, adapter.fingerprint()))
    log("starting vLLM (generating + states servers) ...")
    engine = build(model, artifacts)
    try:
        report = compare_backends(engine, hf, sets, sample=sample, answer_tokens=answer_tokens, policies=policies, log=log)
    finally:
        engine.close()
    return {"model": model, "artifacts": str(artifacts), "data": str(data), **report}


def compare_backends(engine: Any, hf: Any, sets: dict[str, list[str]], *, sample: int = 64, answer_tokens: int = 32,
                     policies: list[Path] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The comparison itself, on two running backends (`sets`: name -> prompts, SETS' names)."""
    from guardrail.pipeline import Guardrail
    from guardrail.types import Request

    requests = [(name, p) for name in SETS for p in sets[name]]
    report: dict[str, Any] = {"sets": {k: len(v) for k, v in sets.items()}, "policies": {}}
    for policy in policies or POLICIES:
        on_vllm, reference = Guardrail(engine, policy), Guardrail(hf, policy)
        log(f"{policy.name}: assessing {len(requests)} requests on both backends ...")
        batch = [Request(p) for _, p in requests]
        got, want = on_vllm.assess_batch(batch), reference.assess_batch(batch)
        diffs = [abs(g.risk - w.risk) for g, w in zip(got, want) if g.risk is not None and w.risk is not None]
        disagree = [{"set": s, "prompt": p[:80], "vllm": [g.band, g.risk], "transformers": [w.band, w.risk]}
                    for (s, p), g, w in zip(requests, got, want)
                    # a policy whose strength follows the risk (paper.yaml) differs by float noise
                    if g.band != w.band or abs(g.strength - w.strength) > STRENGTH_TOLERANCE]
        entry: dict[str, Any] = {
            "n": len(requests), "band_agreement": 1 - len(disagree) / len(requests),
            "risk_max_abs_diff": max(diffs, default=None), "disagreements": disagree,
        }
        harmful, benign = sets["harmbench"], sets["benign"]
        mixed = [(harmful if i % 2 else benign)[i // 2] for i in range(min(sample, 2 * min(len(harmful), len(benign))))]
        log(f"{policy.name}: answering {len(mixed)} requests ({answer_tokens} tokens) on both ...")
        answers = [Request(p, max_new_tokens=answer_tokens) for p in mixed]
        a, b = on_vllm.generate_batch(answers), reference.generate_batch(answers)
        steered = [i for i, w in enumerate(b) if w.strength > 0]
        plain = [i for i, w in enumerate(b) if w.strength == 0]
        entry["generated"] = {
            "n": len(mixed), "unsteered": len(plain), "steered": len(steered),
            "unsteered_identical": sum(a[i].token_ids == b[i].token_ids for i in plain),
            "steered_identical": sum(a[i].token_ids == b[i].token_ids for i in steered),
            "differences": [{"prompt": mixed[i][:80], "strength": [a[i].strength, b[i].strength],
                             "first_split": _first_split(a[i].token_ids, b[i].token_ids),
                             "vllm": a[i].text[:80], "transformers": b[i].text[:80]}
                            for i in range(len(mixed)) if a[i].token_ids != b[i].token_ids],
        }
        report["policies"][policy.stem] = entry
        log(f"  bands agree on {entry['band_agreement']:.2%}, max |Δrisk| {entry['risk_max_abs_diff']}; "
            f"identical answers: unsteered {entry['generated']['unsteered_identical']}/{len(plain)}, "
            f"steered {entry['generated']['steered_identical']}/{len(steered)}")
    report["target"] = {"band_agreement": ">= 0.99",
                        "met": all(e["band_agreement"] >= 0.99 for e in report["policies"].values())}
    return report


def execute(args: Any) -> int:
    import sys

    from guardrail.errors import InputError

    if args.backend != "vllm":
        raise InputError("--verdicts compares the vLLM backend with transformers: add --backend vllm")
    if args.artifacts is None:
        raise InputError("--verdicts needs --artifacts (the calibration both backends load, e.g. the demo's)")
    from guardrail.engine.vllm_bench import emit
    from guardrail.evaluation.datasets import data_home

    model = "smollm2" if args.model.startswith("tiny-random:") else args.model  # text-only on vLLM
    report = compare(model, args.artifacts, args.data or data_home(), log=lambda m: print(m, file=sys.stderr, flush=True))
    emit(report, args.out)
    return 0
