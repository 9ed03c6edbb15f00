"""The core names no built-in plugin: every stage a policy gets without naming one comes from a
plugin's `register(..., default=True)`, baselines and judges are plugins, and consumers read
blocks generically. A string in guardrail/ equal to a built-in stage or block name (or a YAML
`use: NAME` inside a string) fails here, except the words below, which are not stage references."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from guardrail.errors import PluginError
from guardrail.plugin.manager import PluginManager
from guardrail.policy import Policy

CORE = Path(__file__).resolve().parents[1] / "guardrail"

# Words that happen to equal a built-in name but mean something else where the core uses them.
NOT_STAGE_REFERENCES = {
    "model": "the JSON key / field for a model spec",
    "plain": "the benchmark's label for unguarded generation",
    "visual_context": "the result and audit field the paper names (a reformulation's output)",
    "prototype_similarity": "the paper's S as a maths function the SDK exports (risk_math)",
}


def builtin_names() -> set[str]:
    pm = PluginManager(entry_points=False)
    builtin = {p["name"] for p in pm.plugins() if p["builtin"]}
    return {name for entries in pm.stages().values() for name, e in entries.items() if e.plugin in builtin}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def test_no_builtin_stage_or_block_name_in_the_core():
    names = builtin_names()
    assert {"visual_context", "prototype_interpolation", "linear_probe", "rules", "fixed"} <= names  # the scan sees them
    hits = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docs:
                continue
            if node.value in names and node.value not in NOT_STAGE_REFERENCES:
                hits.append(f"{path.relative_to(CORE.parent)}:{node.lineno}: {node.value!r}")
            for name in names:
                if re.search(rf"\buse:\s*\{{?\s*{re.escape(name)}\b", node.value):
                    hits.append(f"{path.relative_to(CORE.parent)}:{node.lineno}: 'use: {name}' in a string")
    assert not hits, "built-in plugin names in guardrail/:\n" + "\n".join(hits)


def test_policy_defaults_come_from_the_plugins():
    pm = PluginManager(entry_points=False)
    bare = Policy.model_validate({"name": "bare", "risk": {"assessors": [{"use": "constant"}]},
                                  "bands": [{"name": "all", "upto": 1.0, "strength": 0.0}]})
    assert bare.reformulator is None and bare.steering is None
    filled = bare.with_default_stages(pm.default_stage)
    assert (filled.reformulator.use, filled.steering.use) == ("visual_context", "prototype_interpolation")
    assert pm.default_stage("judges") == "rules"


def test_a_missing_or_doubled_default_is_refused_only_where_a_policy_relies_on_it():
    from guardrail import hookimpl

    class Rival:
        @hookimpl
        def guardrail_register_reformulators(self, register):
            register("rival", lambda **p: None, default=True)

    pm = PluginManager(entry_points=False, plugins=[Rival()])
    with pytest.raises(PluginError, match=r"several plugins declare a default reformulator: 'rival'.*'visual_context'"):
        pm.default_stage("reformulators")
    assert pm.default_stage("steering_controllers") == "prototype_interpolation"  # other kinds unaffected
    with pytest.raises(PluginError, match="no installed plugin declares a default audit sink"):
        pm.default_stage("audit_sinks")
