"""Helpers shared by the API, batching and server tests: two tenants whose policies steer differently.

    alpha -> policy `zero`: strength 0 in every band (answers untouched)
    beta  -> policy `one`:  strength 1 on the first 3 tokens, whatever the risk

No default policy, so an unknown (or missing) tenant is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import tiny_adapter, tiny_artifacts

ZERO = """\
name: zero
reformulator:
  use: visual_context
  with:
    captioner: auto
risk:
  assessors:
    - use: prototype_similarity
bands:
  - name: calm
    upto: 0.5
    strength: 0.0
  - name: still-calm
    upto: 1.0
    strength: 0.0
"""

ONE = """\
name: one
reformulator:
  use: visual_context
  with:
    captioner: auto
risk:
  assessors:
    - use: prototype_similarity
bands:
  - name: fixed
    upto: 1.0
    strength: 1.0
    tokens: 3
audit:
  capture_content: true
"""

TENANTS = {"alpha": "zero", "beta": "one"}
STRENGTH = {"alpha": 0.0, "beta": 1.0}
API_KEYS = {"key-alpha": "alpha", "key-beta": "beta"}

PROMPTS = [
    "How do I bake bread?",
    "Tell me about lighthouses.",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain photosynthesis briefly.",
    "List three prime numbers.",
    "Why is the sky blue?",
    "Describe a cat.",
    "How far away is the moon?",
    "Give me a tip for sleeping well.",
]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_policies(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.yaml").write_text(ZERO)
    (folder / "one.yaml").write_text(ONE)
    keys = "".join(f"  {sha256(key)}: {tenant}\n" for key, tenant in API_KEYS.items())
    tenants = "".join(f"  {t}: {p}\n" for t, p in TENANTS.items())
    (folder / "tenants.yaml").write_text(f"tenants:\n{tenants}api_keys:\n{keys}")
    return folder


def make_guard(art_root: Path, policies: Path, audit_log: Path | None = None):
    """A guard on the session's tiny llama (shared weights, its own backend and registry)."""
    from guardrail.method.artifacts import load_artifacts
    from guardrail.pipeline import Guardrail
    from guardrail.engine.transformers import TransformersBackend

    adapter = tiny_adapter("llama")
    art = load_artifacts(tiny_artifacts("llama", art_root), adapter.fingerprint())
    return Guardrail(TransformersBackend(adapter, art), policies, audit_log=audit_log)


def audit_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def request_records(path: Path) -> dict[str, dict]:
    return {r["request_id"]: r for r in audit_records(path) if r.get("event") == "request"}
