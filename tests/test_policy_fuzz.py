"""Policies under fuzz: the loader either accepts a usable policy or raises PolicyError with file and
line; nothing else escapes, and a failed reload leaves the registry exactly as it was."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardrail.errors import PolicyError
from guardrail.policy import Policy, load_policy
from guardrail.plugin.manager import PluginManager
from guardrail.tenants import PolicySet, TenantRegistry, load_policy_set

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "policies"
SHIPPED_FILES = sorted(p.name for p in SHIPPED.glob("*.yaml"))
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KNOWN = PluginManager(entry_points=False).known_stages()

# Words the schema knows, so generated documents get past the first key often enough to reach
# the deeper validators.
KEYS = [
    "name", "description", "mode", "on_error", "refusal_text", "reformulator", "risk", "steering",
    "bands", "audit", "limits", "extends", "use", "with", "assessors", "combine", "weight", "upto",
    "action", "strength", "scale", "tokens", "capture_content", "max_images", "max_image_pixels",
    "max_image_bytes", "max_new_tokens", "stage_timeout_s", "captioner", "default_policy", "tenants",
]
WORDS = KEYS + [
    "enforce", "observe", "fail_closed", "fail_open", "steer", "refuse", "risk", "max", "mean",
    "weighted", "visual_context", "linear_probe", "mean_difference", "prototype_similarity",
    "prototype_interpolation", "ocr", "auto", "default", "strict",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=12),
)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=6),
    max_leaves=30,
)
# Fragments that exercise the YAML layer itself: tags, anchors, merges, odd scalars, tabs.
YAML_BITS = [
    "!!binary /w==", "!!python/object:os.system ls", "!!set {a, b}", "&a [1, 2]", "*a", "<<: *a",
    "? [1, 2]\n: x", "2001-12-14", "1e999", ".nan", "-.inf", "0x1F", "~", "'", '"', "\t", "{", "[", "---",
    "...", "%YAML 1.1", "- ", ": ", "|\n  text", ">-\n  folded", "\\u0000", "\x00", "\ufeff", "#",
]


def check_outcome(load, files: list[Path]) -> object | None:
    """Run `load`; it may return or raise PolicyError whose problems name one of `files` and a
    line inside it. Any other exception fails the test (hypothesis shows the input)."""
    try:
        return load()
    except PolicyError as exc:
        assert exc.problems, "a PolicyError must say what is wrong"
        for file, line, message in exc.problems:
            path = Path(file)
            assert path in files, f"problem names {file}, not one of the loaded files"
            n_lines = len(path.read_bytes().splitlines()) if path.is_file() else 0
            assert isinstance(line, int) and 1 <= line <= max(1, n_lines + 1), f"{file}:{line} is outside the file"
            assert isinstance(message, str) and message.strip()
        return None


def check_usable(policy: Policy) -> None:
    """An accepted policy works for requests: hash, canonical form, bands over [0, 1]."""
    assert len(policy.hash) == 64
    assert Policy.model_validate(policy.canonical()) == policy
    for risk in (0.0, 0.3, 0.5, 0.99, 1.0):
        band = policy.band_for(risk)
        assert 0.0 <= band.strength_for(risk) <= 1.0
    timeout = policy.limits.stage_timeout_s
    assert timeout is None or 0 < timeout < 10**6


@FUZZ
@given(st.text(max_size=300) | st.lists(st.sampled_from(YAML_BITS + WORDS + [": ", "\n", "\n  ", "- "]), max_size=40).map("".join))
def test_any_text_is_a_policy_or_a_policy_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        policy = check_outcome(lambda: load_policy(path, KNOWN), [path])
        if policy is not None:
            check_usable(policy)


@FUZZ
@given(documents)
def test_any_yaml_document_is_a_policy_or_a_policy_error(doc):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        policy = check_outcome(lambda: load_policy(path), [path])
        if policy is not None:
            check_usable(policy)


# ----- mutations of the shipped policies ---------------------------------------------------------
@st.composite
def mutated(draw) -> tuple[str, bytes]:
    """One shipped file with a few line- or byte-level edits."""
    name = draw(st.sampled_from(SHIPPED_FILES))
    lines = (SHIPPED / name).read_text().splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "indent", "dedent", "replace_value", "replace_char", "insert", "truncate"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent":
            lines[i] = "  " + lines[i]
        elif op == "dedent":
            lines[i] = lines[i].lstrip(" ")
        elif op == "replace_value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            value = draw(st.sampled_from(YAML_BITS + WORDS + ["-1", "0", "1.5", "1e308", "[]", "{}", "''", "null", "true", "9" * 30]))
            lines[i] = f"{key}: {value}\n"
        elif op == "replace_char" and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:j] + draw(st.characters(codec="utf-8")) + lines[i][j + 1:]
        elif op == "insert":
            lines.insert(i, draw(st.sampled_from(YAML_BITS + [f"{k}: x\n" for k in KEYS])) + "\n")
        elif op == "truncate":
            lines = lines[:i]
    return name, "".join(lines).encode("utf-8")


def _copy_shipped(tmp: str) -> Path:
    folder = Path(tmp) / "policies"
    shutil.copytree(SHIPPED, folder)
    return folder


@FUZZ
@given(mutated())
def test_mutated_shipped_policies_load_or_fail_with_file_and_line(mutation):
    name, data = mutation
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_shipped(tmp)
        (folder / name).write_bytes(data)
        files = sorted(folder.glob("*.yaml"))
        policy_set = check_outcome(lambda: load_policy_set(folder, KNOWN), files)
        if policy_set is not None:
            assert isinstance(policy_set, PolicySet)
            for policy in policy_set.policies.values():
                check_usable(policy)
            for tenant in list(policy_set.tenants.tenants) + ["someone-unlisted"]:
                if tenant in policy_set.tenants.tenants or policy_set.tenants.default_policy:
                    assert policy_set.resolve(tenant)[1].name in policy_set.policies


@FUZZ
@given(st.lists(mutated(), min_size=1, max_size=3))
def test_registry_reload_is_all_or_nothing(mutations):
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_shipped(tmp)
        audit: list[dict] = []
        registry = TenantRegistry(folder, known_stages=KNOWN, on_reload=audit.append)
        for name, data in mutations:
            before = registry.snapshot()
            (folder / name).write_bytes(data)
            record = registry.reload()  # never raises on bad files
            assert audit[-1] is record
            if record["ok"]:
                assert registry.snapshot() is not before
                assert sorted(registry.current.policies) == record["policies"]
                for policy in registry.current.policies.values():
                    check_usable(policy)
            else:
                assert registry.snapshot() is before, "a rejected reload must keep the old set, whole"
                assert record["kept_hash"] == before[0].hash and record["problems"]
                assert all(":" in p for p in record["problems"])


def test_shipped_policies_are_valid_as_they_are():
    """The mutations above start from files that load (otherwise the fuzz proves little)."""
    policy_set = load_policy_set(SHIPPED, KNOWN)
    assert set(policy_set.policies) >= {"default", "strict", "permissive", "observe", "paper"}
    for policy in policy_set.policies.values():
        check_usable(policy)


@pytest.mark.parametrize(
    "fragment, where",
    [
        ("limits: {stage_timeout_s: .inf}", "stage_timeout_s"),
        ("limits: {stage_timeout_s: 1e300}", "stage_timeout_s"),
        ("reformulator: {use: visual_context, with: {captioner: auto, blob: !!binary /w==}}", "reformulator"),
        ("reformulator: {use: visual_context, with: {captioner: auto, deep: " + "[" * 300 + "]" * 300 + "}}", "reformulator"),
        ("risk: {combine: weighted, assessors: [{use: linear_probe, weight: .inf}, {use: mean_difference}]}", "weight"),
        ("bands: [{name: all, upto: 1.0, strength: risk, scale: .inf}]", "scale"),
    ],
)
def test_values_that_would_break_requests_are_rejected_at_load(tmp_path, fragment, where):
    """Found by the fuzz: each of these loaded, then broke every request (an infinite timeout
    overflows the wait, an unserialisable parameter breaks the policy hash in every result, an
    infinite weight makes the combined risk NaN)."""
    base = (SHIPPED / "default.yaml").read_text()
    key = fragment.split(":", 1)[0]
    kept = _without_top_level_key(base, key)
    path = tmp_path / "bad.yaml"
    path.write_text(kept + fragment + "\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(path, KNOWN)
    file, line, message = exc.value.problems[0]
    assert file == str(path) and line == len(kept.splitlines()) + 1
    assert where in message


def _without_top_level_key(text: str, key: str) -> str:
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith(f"{key}:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or line.startswith("-")):
            continue
        skipping = False
        out.append(line)
    return "".join(out)
