"""`guardrail bench`: guardrail's overhead over plain `generate`, measured side by side (issue 7).

    guardrail bench --model tiny-random:llava --out bench.json
    guardrail bench --model smollm2 --rounds 5 --out bench-smollm2.json

The measurement itself lives in `guardrail.evaluation.benchmark` (also runnable as benchmarks/bench.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from guardrail.evaluation.benchmark import add_arguments

    p = sub.add_parser("bench", help="measure the guard's overhead over plain generate (ratios, JSON)")
    add_arguments(p)
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="vllm: the guard on vLLM vs plain vLLM and vs the guard on transformers (issue 14; "
                        "text-only, smollm2 unless --model names a folder; guardrail.engine.vllm_bench)")
    p.add_argument("--vllm-batch", type=int, default=32, help="with --backend vllm: concurrent requests")
    p.add_argument("--vllm-interval-ms", type=float, default=100.0,
                   help="with --backend vllm: arrival interval of the open-loop stream")
    p.add_argument("--verdicts", action="store_true",
                   help="with --backend vllm: instead of timing, compare the vLLM and transformers verdicts "
                        "(bands, risks, answers) on the evaluation sets of --data, for the default and paper "
                        "policies, with --artifacts (guardrail.engine.vllm_verdicts)")
    p.add_argument("--data", type=Path, default=None,
                   help="with --verdicts: a folder `guardrail data` prepared (default: the cache's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.verdicts:
        from guardrail.engine.vllm_verdicts import execute as execute_verdicts

        return execute_verdicts(args)
    if args.backend == "vllm":
        from guardrail.engine.vllm_bench import execute as execute_vllm

        return execute_vllm(args)
    from guardrail.evaluation.benchmark import execute

    return execute(args)
