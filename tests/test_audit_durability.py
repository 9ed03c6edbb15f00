"""Audit durability: concurrent writers, fsync, rotation by size, write failures (full disk,
permissions), and content capture off by default."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fault_plugins import FaultPlugin, RecordingSink, policy_yaml, random_artifacts
from guardrail.audit import AuditError, JsonlWriter
from guardrail.pipeline import Guardrail
from guardrail.plugin.manager import PluginManager
from guardrail.types import Request
from guardrail.audit import JsonlSink as JsonlAuditSink


def strict_json(line: str) -> dict:
    """json.loads that also refuses NaN/Infinity (not JSON, though Python writes them)."""

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    record = json.loads(line, parse_constant=no_constants)
    assert isinstance(record, dict)
    return record


def all_lines(path: Path) -> list[dict]:
    """Every line of the log and its rotated files, each a whole, valid JSON record."""
    files = sorted(path.parent.glob(path.name + "*"))
    out = []
    for file in files:
        data = file.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{file.name} ends inside a record"
        out += [strict_json(line) for line in data.decode("utf-8").splitlines()]
    return out


def write_from_threads(sink, n_records: int, n_threads: int, payload: str = "") -> None:
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        barrier.wait()
        try:
            for i in range(t, n_records, n_threads):
                sink.write({"event": "request", "request_id": f"r{i:04d}", "thread": t, "payload": payload, "risk": i / n_records})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_1000_records_from_16_threads_are_1000_valid_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(str(path))
    # payloads of a few kB: bigger than one write() of a pipe buffer, so interleaving would show
    write_from_threads(sink, 1000, 16, payload="é" * 3000)
    sink.close()
    records = all_lines(path)
    assert len(records) == 1000 and len(path.read_text().splitlines()) == 1000
    assert sorted(r["request_id"] for r in records) == [f"r{i:04d}" for i in range(1000)]
    assert all(r["payload"] == "é" * 3000 and "ts" in r for r in records)


def test_fsync_option_syncs_every_record_to_the_file(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr("guardrail.audit.os.fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "audit.jsonl"
    writer = JsonlWriter(path, fsync=True)
    for i in range(5):
        writer.msg(json.dumps({"i": i}))
        # what was synced is this file, and the record is in it before msg returns
        assert os.path.samefile(f"/proc/self/fd/{synced[-1]}", path)
        assert len(path.read_text().splitlines()) == i + 1
    assert len(synced) == 5
    writer.close()
    unsynced = JsonlWriter(tmp_path / "other.jsonl")
    unsynced.msg("{}")
    assert len(synced) == 5
    unsynced.close()


def test_fsync_through_the_jsonl_sink_plugin(tmp_path, monkeypatch):
    synced: list[int] = []
    monkeypatch.setattr("guardrail.audit.os.fsync", lambda fd: synced.append(fd))
    sink = PluginManager(entry_points=False).create("audit_sinks", "jsonl", {"path": str(tmp_path / "a.jsonl"), "fsync": True})
    sink.write({"event": "request", "request_id": "x"})
    assert len(synced) == 1
    sink.close()


def test_rotation_by_size_loses_and_splits_nothing(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(str(path), max_bytes=4000)
    write_from_threads(sink, 600, 8, payload="x" * 100)
    sink.close()
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert len(files) > 10, "the test must rotate many times"
    for file in files:
        assert file.stat().st_size <= 4000
    records = all_lines(path)
    assert sorted(r["request_id"] for r in records) == [f"r{i:04d}" for i in range(600)]


def test_rotation_keeps_at_most_backups_files_when_asked(tmp_path):
    """Retention is opt-in: `backups=N` keeps the newest N rotated files (and says so)."""
    path = tmp_path / "audit.jsonl"
    writer = JsonlWriter(path, max_bytes=100, backups=2)
    for i in range(20):
        writer.msg(json.dumps({"i": i, "pad": "y" * 40}))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert [r["i"] for r in all_lines(path)] == [19, 18, 17]  # one record per file, newest first


def test_a_record_bigger_than_max_bytes_is_written_whole(tmp_path):
    path = tmp_path / "audit.jsonl"
    writer = JsonlWriter(path, max_bytes=50)
    writer.msg(json.dumps({"big": "z" * 200}))
    writer.msg(json.dumps({"small": 1}))
    writer.close()
    assert [list(r) for r in all_lines(path)] == [["small"], ["big"]]


# ----- write failures ----------------------------------------------------------------------------
def test_disk_full_raises_audit_error(tmp_path):
    writer = JsonlWriter("/dev/full")
    with pytest.raises(AuditError, match=r"audit write to /dev/full failed: .*No space left on device"):
        writer.msg('{"a": 1}')
    sink = JsonlAuditSink("/dev/full")
    with pytest.raises(AuditError, match="No space left"):
        sink.write({"event": "request"})


class _HalfWritingFile:
    """A real file that, while `full` is set, writes half of what it is given and then fails as a
    full disk does (the kernel accepted part of the write)."""

    def __init__(self, real, state):
        self.real, self.state = real, state

    def write(self, data):
        if self.state["full"]:
            self.real.write(data[: len(data) // 2])
            self.real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


class DiskFillingWriter(JsonlWriter):
    """A JsonlWriter whose file is a _HalfWritingFile (the disk fills when the test says so)."""

    def __init__(self, path: Path, state: dict):
        super().__init__(path)
        self.state = state

    def _open(self):
        return _HalfWritingFile(super()._open(), self.state)


def test_a_write_that_fails_half_way_leaves_no_partial_record(tmp_path):
    state = {"full": False}
    path = tmp_path / "audit.jsonl"
    writer = DiskFillingWriter(path, state)
    writer.msg(json.dumps({"n": 1}))
    state["full"] = True
    with pytest.raises(AuditError, match="No space left on device"):
        writer.msg(json.dumps({"n": 2, "pad": "p" * 500}))
    state["full"] = False  # space freed
    writer.msg(json.dumps({"n": 3}))
    writer.close()
    assert [r["n"] for r in all_lines(path)] == [1, 3]


def _without_root_file_powers() -> None:
    """preexec_fn for a child run as root: drop the capabilities that let root write anywhere
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) from its bounding set, so after exec
    file permissions apply to it like to anyone."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_permission_denied_raises_audit_error(tmp_path):
    """A log in a read-only directory, written from a child process (as root, one without the
    capabilities that bypass file permissions)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    script = (
        "import sys\n"
        "from guardrail.audit import AuditError, JsonlWriter\n"
        "try:\n"
        f"    JsonlWriter({str(folder / 'audit.jsonl')!r}).msg('{{}}')\n"
        "except AuditError as exc:\n"
        "    print('AuditError:', exc)\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    preexec = _without_root_file_powers if os.geteuid() == 0 else None
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, preexec_fn=preexec, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Permission denied" in done.stdout and "readonly/audit.jsonl" in done.stdout
    assert list(folder.iterdir()) == []


# ----- through the guard -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter():
    from guardrail.models import load_model

    return load_model("tiny-random:llama")


@pytest.fixture(scope="module")
def artifacts(adapter, tmp_path_factory):
    return random_artifacts(adapter, tmp_path_factory.mktemp("audit-art"))


def make_guard(adapter, artifacts, folder: Path, policy: str, audit_log, sinks=()):
    from guardrail.engine.transformers import TransformersBackend

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "p.yaml").write_text(policy)
    return Guardrail(
        TransformersBackend(adapter, artifacts), folder / "p.yaml",
        plugins=PluginManager(entry_points=False, plugins=[FaultPlugin()]), audit_log=audit_log, audit_sinks=sinks,
    )


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_full_disk_under_the_guard_is_never_swallowed(adapter, artifacts, tmp_path, on_error):
    memory = RecordingSink()
    guard = make_guard(adapter, artifacts, tmp_path / "p", policy_yaml(on_error=on_error), "/dev/full", [memory])
    result = guard.generate(Request("How do I bake bread?"))
    guard.close()
    assert "audit: AuditError: audit write to /dev/full failed" in result.error
    if on_error == "fail_closed":
        assert result.text == "REFUSED by faulty" and result.action == "error"
    else:
        assert result.text != "REFUSED by faulty" and result.degraded
    # the memory sink took the record and the failure notice
    assert [r["event"] for r in memory.records] == ["request", "audit_error"]
    assert memory.records[1]["error"] == result.error


def test_concurrent_guarded_requests_each_get_one_record(adapter, artifacts, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = make_guard(adapter, artifacts, tmp_path / "p", policy_yaml(), log)
    results: list = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(3):
            r = guard.assess(Request(f"question {t}-{i}", request_id=f"q{t}-{i}"))
            with lock:
                results.append(r)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    guard.close()
    records = all_lines(log)
    assert sorted(r["request_id"] for r in records) == sorted(r.request_id for r in results)
    assert len(records) == 48


CAPTURE_MARKER = "zebra-marmalade-4711"


@pytest.mark.parametrize("capture", [None, False, True])
def test_content_is_captured_only_when_the_policy_says_so(adapter, artifacts, tmp_path, capture):
    extra = "" if capture is None else f"audit: {{capture_content: {str(capture).lower()}}}\n"
    log = tmp_path / "audit.jsonl"
    guard = make_guard(adapter, artifacts, tmp_path / "p", policy_yaml(extra=extra), log)
    result = guard.generate(Request(f"Tell me about {CAPTURE_MARKER}", max_new_tokens=8))
    guard.close()
    (record,) = all_lines(log)
    text = log.read_text()
    if capture:
        assert record["prompt"] == f"Tell me about {CAPTURE_MARKER}" and record["output"] == result.text
        assert record["visual_context"] == result.visual_context
    else:
        assert not {"prompt", "output", "visual_context"} & set(record)
        assert CAPTURE_MARKER not in text
        assert result.text not in text or not result.text.strip()
        assert record["prompt_sha256"] and record["output_sha256"]
