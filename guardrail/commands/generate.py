"""`guardrail generate`: one guarded answer from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from guardrail.commands.common import add_backend, add_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one prompt through the guard")
    add_model(p)
    add_backend(p)
    p.add_argument("--artifacts", type=Path, help="calibration artifact folder (guardrail calibrate)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--policy", type=Path, help="one policy file, for every tenant")
    where.add_argument("--policies", type=Path, help="a policies directory with tenants.yaml")
    p.add_argument("--tenant", default=None,
                   help="tenant id, routed by tenants.yaml (case and surrounding space do not matter; "
                        "default: the tenants map's default_policy)")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--image", action="append", default=[], type=Path, help="an image file (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit (default: the policy's limits.max_new_tokens)")
    p.add_argument("--force-strength", type=float, default=None, help="override the band's strength")
    p.add_argument("--unguarded", action="store_true", help="plain generation, no risk and no steering")
    p.add_argument("--audit-log", type=Path, default=None, help="append the audit record to this JSONL file")
    p.add_argument("--device", default=None, help="torch device (default: the model loader's choice, CPU here)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardrail.pipeline import Guardrail
    from guardrail.types import Request

    guard = Guardrail.from_model(
        args.model,
        policies=args.policy or args.policies,
        artifacts=args.artifacts,
        device=args.device,
        audit_log=args.audit_log,
        backend=args.backend,
        vllm_url=args.vllm_url, vllm_states_url=args.vllm_states_url,
    )
    try:
        result = guard.generate(
            Request(
                text=args.prompt,
                images=tuple(args.image),
                tenant=args.tenant,
                max_new_tokens=args.max_new_tokens,
                force_strength=args.force_strength,
                unguarded=args.unguarded,
            )
        )
    finally:
        guard.close()
        getattr(guard.engine, "close", lambda: None)()  # a vLLM server started for this command
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        risk = "-" if result.risk is None else f"{result.risk:.3f}"
        print(f"[tenant {result.tenant} | policy {result.policy} | risk {risk} | band {result.band} | "
              f"strength {result.strength:.2f} | {result.action}]")
        if result.visual_context:
            print(f"visual context: {result.visual_context}")
        print(result.text)
    return 0
