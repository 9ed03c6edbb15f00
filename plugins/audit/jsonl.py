"""Audit sink `jsonl`: one JSON line per record, written through structlog to a file.

    Guardrail(..., audit_log="audit.jsonl")     # or
    plugins.create("audit_sinks", "jsonl", {"path": "audit.jsonl", "fsync": True, "max_bytes": 10_000_000})

Rotated files are all kept unless `backups` says how many to keep (see guardrail.audit.JsonlWriter).
"""

from __future__ import annotations

from typing import Any

from guardrail.plugin.sdk import JsonlSink, hookimpl


@hookimpl
def guardrail_register_audit_sinks(register):
    register("jsonl", JsonlSink)
