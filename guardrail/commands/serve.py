"""`guardrail serve`: the OpenAI-compatible HTTP server (needs the `serve` extra)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from guardrail.commands.common import add_backend, add_model

ADMIN_TOKEN_ENV = "GUARDRAIL_ADMIN_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible chat endpoint through the guard")
    add_model(p)
    add_backend(p)
    p.add_argument("--artifacts", type=Path, help="calibration artifact folder (guardrail calibrate)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--policies", type=Path, help="a policies directory with tenants.yaml (api_keys too)")
    where.add_argument("--policy", type=Path, help="one policy file, for every tenant")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--device", default=None, help="torch device (default: the model loader's choice, CPU here)")
    p.add_argument("--audit-log", type=Path, default=None, help="append audit records to this JSONL file")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off: only data: URLs are accepted)")
    p.add_argument("--remote-image-deadline-s", type=float, default=20.0,
                   help="with --allow-remote-images: all of one request's fetches must finish within this")
    p.add_argument("--remote-fetch-concurrency", type=int, default=8,
                   help="with --allow-remote-images: image fetches in flight across the whole server")
    p.add_argument("--require-api-key", action="store_true",
                   help="accept only requests whose tenant comes from a listed API key; /healthz and "
                        "/metrics then need a listed key or the admin token too (see --open-probes)")
    p.add_argument("--open-probes", action="store_true",
                   help="with --require-api-key, keep /healthz and /metrics open to anyone who can reach "
                        "the port (for probes and scrapers that cannot send a key)")
    p.add_argument("--admin-token-file", type=Path, default=None,
                   help=f"file holding the admin token for POST /v1/guardrail/admin/reload "
                        f"(or set {ADMIN_TOKEN_ENV}); without one the endpoint is disabled")
    p.add_argument("--max-batch", type=int, default=32, help="requests per micro-batch")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch waits for company")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--model-name", default=None, help="the `model` reported in responses and /v1/models "
                                                       "(default: the served model's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=run)


def admin_token(args: argparse.Namespace) -> str | None:
    # Not a command-line value: it would show in `ps` and shell history.
    if args.admin_token_file is not None:
        token = args.admin_token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise SystemExit(f"guardrail serve: {args.admin_token_file} is empty")
        return token
    return os.environ.get(ADMIN_TOKEN_ENV) or None


def run(args: argparse.Namespace) -> int:
    from guardrail.pipeline import Guardrail
    from guardrail.serve import ServeConfig, create_app
    from guardrail.serve.server import run as serve_forever

    config = ServeConfig(
        allow_remote_images=args.allow_remote_images,
        admin_token=admin_token(args),
        require_api_key=args.require_api_key,
        open_probes=args.open_probes,
        remote_image_deadline_s=args.remote_image_deadline_s,
        remote_fetch_concurrency=args.remote_fetch_concurrency,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        max_queue=args.max_queue,
        model_name=args.model_name,
    )
    guard = Guardrail.from_model(
        args.model,
        policies=args.policies or args.policy,
        artifacts=args.artifacts,
        device=args.device,
        audit_log=args.audit_log,
        backend=args.backend,
        vllm_url=args.vllm_url, vllm_states_url=args.vllm_states_url,
    )
    try:
        serve_forever(create_app(guard, config), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        guard.close()
        getattr(guard.engine, "close", lambda: None)()  # a vLLM server started for this command
    return 0
