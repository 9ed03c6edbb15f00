"""`guardrail bench`: guardrail's overhead over plain `generate`, measured side by side (issue 7).

    guardrail bench --model tiny-random:llava --out bench.json
    guardrail bench --model smollm2 --rounds 5 --out bench-smollm2.json

The measurement itself lives in `guardrail.evaluation.benchmark` (also runnable as benchmarks/bench.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from guardrail.evaluation.benchmark import add_arguments

    p = sub.add_parser("bench", help="measure the guard's overhead over plain generate (ratios, JSON)")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardrail.evaluation.benchmark import execute

    return execute(args)
