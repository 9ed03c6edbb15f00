"""`guardrail eval`: attack success, over-refusal, risk AUROC and cost of RAS and its baselines."""

from __future__ import annotations

import argparse
from pathlib import Path

from guardrail.commands.common import add_backend, add_model, add_progress, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate RAS and baselines: ASR, refusal rates, AUROC, latency, plots")
    add_model(p)
    p.add_argument("--artifacts", required=True, type=Path, help="calibration artifact folder")
    p.add_argument("--policy", required=True, type=Path, help="the policy evaluated as `ras`")
    p.add_argument("--harmful", required=True, type=Path, action="append",
                   help="harmful prompts (.txt/.csv/.jsonl, image rows allowed); repeatable")
    p.add_argument("--benign", required=True, type=Path, action="append", help="benign prompts; repeatable")
    p.add_argument("--edgy", type=Path, action="append", default=[], help="benign but sensitive prompts; repeatable")
    p.add_argument("--matched", type=Path, action="append", default=[],
                   help="harmful prompts matched in style to --benign: risk AUROC only, not answered; repeatable")
    p.add_argument("--methods", default=None,
                   help="comma-separated: no_defense, safety_prompt, fixed:S[:T], ras, ras:ASSESSOR, policy:FILE "
                        "(default: no_defense, safety_prompt, fixed 0.25-1.0, ras and ras:A for each calibrated assessor)")
    p.add_argument("--limit", type=int, default=None, help="at most N prompts from each input file (evenly spaced)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length per request")
    p.add_argument("--batch-size", type=int, default=16, help="requests per batch")
    p.add_argument("--judge", default=None, help="refusal judge, by plugin name (default: the one a plugin declares default; built in: the rule-based `rules`)")
    p.add_argument("--out", required=True, type=Path, help="folder for the report, per-method results and plots")
    p.add_argument("--device", default=None, help="torch device (default: the model loader's choice, CPU here)")
    add_backend(p)
    add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardrail.errors import InputError
    from guardrail.evaluation.evaluate import EvalConfig, run_eval

    if args.limit is not None and args.limit < 1:
        raise InputError("--limit must be at least 1")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise InputError("--max-new-tokens and --batch-size must be at least 1")
    cfg = EvalConfig(
        model=args.model, artifacts=args.artifacts, policy=args.policy, out=args.out, harmful=args.harmful,
        benign=args.benign, edgy=args.edgy, matched=args.matched, methods=args.methods, limit=args.limit,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, judge=args.judge, device=args.device,
        progress=show_progress(args), backend=args.backend, vllm_url=args.vllm_url, vllm_states_url=args.vllm_states_url,
    )
    run_eval(cfg)
    return 0
