"""Audit sink `jsonl`: one JSON line per record, written through structlog to a file.

    Guardrail(..., audit_log="audit.jsonl")     # or
    plugins.create("audit_sinks", "jsonl", {"path": "audit.jsonl", "fsync": True, "max_bytes": 10_000_000})

Rotated files are all kept unless `backups` says how many to keep (see guardrail.audit.JsonlWriter).
"""

from __future__ import annotations

from typing import Any

from guardrail.plugin.sdk import JsonlWriter, hookimpl, structlog_writer


class JsonlAuditSink:
    def __init__(self, path: str, fsync: bool = False, max_bytes: int | None = None, backups: int | None = None):
        self.writer = JsonlWriter(path, fsync=fsync, max_bytes=max_bytes, backups=backups)
        self.log = structlog_writer(self.writer)

    def write(self, record: dict[str, Any]) -> None:
        fields = dict(record)
        event = fields.pop("event", "request")
        self.log.info(event, **fields)

    def close(self) -> None:
        self.writer.close()


@hookimpl
def guardrail_register_audit_sinks(register):
    register("jsonl", JsonlAuditSink)
