#!/usr/bin/env python3
"""Benchmark: guardrail's overhead over a plain `generate` of the same model, as medians of ratios
from interleaved runs in one process (peak RSS from one fresh subprocess per variant).

    .venv/bin/python benchmarks/bench.py --model tiny-random:llava --out bench.json
    .venv/bin/python benchmarks/bench.py --model smollm2 --rounds 5 --out bench-smollm2.json

Same options as `guardrail bench`; see docs/PERFORMANCE.md for what each number means."""

import sys

from guardrail.evaluation.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
