"""Audit records and the JSON-lines writer behind the built-in `jsonl` audit sink.

One record per request: who (tenant), under what (policy name and hash), what was decided (risk,
band, strength, action) and how long each stage took. Content is not recorded unless the policy
says `audit: {capture_content: true}`; hashes of the prompt, images and answer are, so a record can
be matched to content the app kept.

`JsonlWriter` writes each record as one `write()` of one whole line under a lock, so records from
concurrent threads never interleave; it can fsync every record and rotate by size (rotation happens
between records, never inside one). A failed write raises `AuditError`: it is never swallowed, and
whatever part of the record reached the file is cut off again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from guardrail.errors import GuardrailError


class AuditError(GuardrailError):
    """An audit record could not be written."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class JsonlWriter:
    """Appends JSON lines to a file; thread-safe, optionally fsynced and size-rotated.

    Rotation renames `audit.jsonl` to `audit.jsonl.1` (older files move up one number) before a
    record that would take the file past `max_bytes`; records are never split across files. Every
    rotated file is kept unless `backups` is given, in which case only the newest `backups` are.
    """

    def __init__(self, path: str | Path, fsync: bool = False, max_bytes: int | None = None, backups: int | None = None):
        self.path = Path(path)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.backups = None if backups is None else max(1, backups)
        self._lock = threading.Lock()
        self._fh: Any = None
        self._torn = False  # a failed write left part of a line that could not be removed

    def _open(self) -> Any:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab")
        return self._fh

    def _rotated(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _rotate(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.backups is not None:
            last = self.backups
        else:
            last = 1
            while self._rotated(last).exists():
                last += 1
        for i in range(last - 1, 0, -1):
            if self._rotated(i).exists():
                os.replace(self._rotated(i), self._rotated(i + 1))
        if self.path.exists():
            os.replace(self.path, self._rotated(1))

    def msg(self, message: str) -> None:
        """Write one already-rendered JSON line (structlog's logger interface)."""
        with self._lock:
            start = None
            try:
                data = (message.rstrip("\n") + "\n").encode("utf-8")
                fh = self._open()
                if self.max_bytes is not None and fh.tell() > 0 and fh.tell() + len(data) > self.max_bytes:
                    self._rotate()
                    fh = self._open()
                    self._torn = False
                if self._torn:
                    data = b"\n" + data  # end the partial line a failed write left behind
                start = fh.tell()
                fh.write(data)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
                self._torn = False
            except (OSError, ValueError) as exc:
                self._undo(start)
                raise AuditError(f"audit write to {self.path} failed: {exc}") from exc

    def _undo(self, start: int | None) -> None:
        """After a failed write: drop the handle (the next write starts clean) and cut off what
        part of the record reached the file (a full disk accepts part of a write), so the log
        never holds half a record glued to the next one."""
        try:
            if self._fh is not None:
                self._fh.close()  # may flush a little more of the record; cut below
        except OSError:
            pass
        self._fh = None
        if start is None:
            return
        try:
            os.truncate(self.path, start)
        except OSError:
            self._torn = True

    # structlog calls the method named after the level; every level writes the same way.
    info = warning = error = critical = debug = log = msg

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _timestamp(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict.setdefault("ts", datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    return event_dict


def structlog_writer(writer: JsonlWriter) -> Any:
    """A structlog logger bound to one writer, with its own processors: no global configuration."""
    return structlog.wrap_logger(
        writer,
        processors=[_timestamp, structlog.processors.JSONRenderer(sort_keys=True, ensure_ascii=False)],
        cache_logger_on_first_use=False,
    )


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """Opt-in structlog setup for an app's own logs (guardrail never calls this at import)."""
    import logging

    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(message)s")
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"), renderer],
        logger_factory=structlog.stdlib.LoggerFactory(),
    )


def now_ms() -> float:
    return time.perf_counter() * 1000.0


class JsonlSink:
    """An audit sink: one JSON line per record, written through structlog to a rotating file.
    `Guardrail(audit_log=PATH)` uses it; the `jsonl` audit-sink plugin registers it by name."""

    def __init__(self, path: str, fsync: bool = False, max_bytes: int | None = None, backups: int | None = None):
        self.writer = JsonlWriter(path, fsync=fsync, max_bytes=max_bytes, backups=backups)
        self.log = structlog_writer(self.writer)

    def write(self, record: dict[str, Any]) -> None:
        fields = dict(record)
        event = fields.pop("event", "request")
        self.log.info(event, **fields)

    def close(self) -> None:
        self.writer.close()
