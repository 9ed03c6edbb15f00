"""Policies: pydantic models loaded from YAML, with `extends:` and file:line errors.

A policy says which implementation (and parameters) each stage uses, whether it enforces or only
observes, what happens when a stage fails, and the risk bands: ascending intervals covering [0, 1],
each with an action (`steer` at a strength, or `refuse`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from guardrail.errors import PolicyError
from guardrail.yaml_lines import LineMap, load_yaml

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


class LocatedValueError(ValueError):
    """A validation error that knows where below the validated field it belongs (e.g. a band's
    index), so the message can point at that line of the YAML file."""

    def __init__(self, message: str, loc: tuple[Any, ...]):
        super().__init__(message)
        self.loc = loc


class _Strict(BaseModel):
    # No .inf/.nan: an infinite weight makes the combined risk NaN, an infinite timeout overflows.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


MAX_PARAM_DEPTH = 32


def _plain_data(value: Any, loc: tuple[Any, ...] = ()) -> None:
    """Stage parameters must be JSON data: the policy hash (in every result and audit record) is
    taken over them, and a value it cannot serialise would fail every request, not the load."""
    if len(loc) > MAX_PARAM_DEPTH:
        raise LocatedValueError(f"parameters nest deeper than {MAX_PARAM_DEPTH} levels", loc[:1])
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise LocatedValueError(f"parameter keys must be strings, got {key!r}", loc)
            _plain_data(item, loc + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain_data(item, loc + (i,))
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        where = ".".join(str(p) for p in loc) or "value"
        raise LocatedValueError(
            f"parameter {where} is a {type(value).__name__}; use strings, numbers, booleans, lists and mappings", loc
        )


class StageSpec(_Strict):
    """Which named implementation runs a stage, and its parameters (`with:`)."""

    use: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict, alias="with")

    @field_validator("params")
    @classmethod
    def _params_are_plain_data(cls, params: dict[str, Any]) -> dict[str, Any]:
        _plain_data(params)
        return params


class AssessorSpec(StageSpec):
    name: str | None = Field(default=None, description="label in audit records; defaults to `use`")
    weight: float = Field(default=1.0, ge=0.0)

    @property
    def label(self) -> str:
        return self.name or self.use


class RiskSpec(_Strict):
    assessors: list[AssessorSpec] = Field(min_length=1)
    combine: Literal["max", "mean", "weighted"] = "max"

    @model_validator(mode="after")
    def _labels_unique(self) -> "RiskSpec":
        labels = [a.label for a in self.assessors]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"assessor labels must be unique (give each a `name:`): {', '.join(dup)}")
        if self.combine == "weighted" and sum(a.weight for a in self.assessors) <= 0:
            raise ValueError("combine: weighted needs at least one positive weight")
        return self


class FprTarget(_Strict):
    """A band edge stated as an error rate: the edge is resolved, per input format (text,
    typographic, image), so that at most this share of benign requests of that format the policy's
    assessors were not fitted on rises above it (guardrail.method.edges; from the artifact)."""

    benign_fpr: float = Field(gt=0.0, lt=1.0)


class Band(_Strict):
    """Risks in (previous band's `upto`, `upto`] fall in this band; the first band starts at 0.
    `upto` is a risk, or `{benign_fpr: RATE}`, resolved per input format when the policy loads."""

    name: str = Field(min_length=1)
    upto: Union[float, FprTarget]
    action: Literal["steer", "refuse"] = "steer"
    strength: Union[float, Literal["risk"]] = 0.0
    scale: float = Field(default=1.0, ge=0.0, description="multiplies the risk when strength is `risk`")
    tokens: int = Field(default=3, ge=1, le=64, description="response tokens to steer")

    @field_validator("upto")
    @classmethod
    def _upto_range(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("upto must be in (0, 1] or {benign_fpr: RATE}")
        return value

    @field_validator("strength")
    @classmethod
    def _strength_range(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError("strength must be in [0, 1] or the word `risk`")
        return value

    @model_validator(mode="after")
    def _scale_only_with_risk(self) -> "Band":
        if self.scale != 1.0 and self.strength != "risk":
            raise ValueError("scale applies only when strength is `risk`")
        return self

    def strength_for(self, risk: float) -> float:
        """The steering strength this band applies at a given risk (0 for refuse bands)."""
        if self.action != "steer":
            return 0.0
        if self.strength == "risk":
            return float(min(1.0, max(0.0, risk * self.scale)))
        return float(self.strength)


class AuditSpec(_Strict):
    capture_content: bool = False


class Limits(_Strict):
    max_images: int = Field(default=4, ge=0)
    max_image_pixels: int = Field(default=25_000_000, ge=1, description="decompression-bomb guard")
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    stage_timeout_s: float | None = Field(default=None, gt=0, le=86_400)


DEFAULTED_STAGES = {"reformulator": "reformulators", "steering": "steering_controllers"}


class Policy(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    mode: Literal["enforce", "observe"] = "enforce"
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    refusal_text: str = Field(default=DEFAULT_REFUSAL, min_length=1)
    # None: the installed plugins' default of that kind (`register(..., default=True)`), filled in
    # by `with_default_stages` when the policy is built; the core names no plugin.
    reformulator: StageSpec | None = None
    risk: RiskSpec
    steering: StageSpec | None = None
    bands: list[Band] = Field(min_length=1)
    audit: AuditSpec = AuditSpec()
    limits: Limits = Limits()

    @field_validator("bands")
    @classmethod
    def _bands_cover_unit_interval(cls, bands: list[Band]) -> list[Band]:
        previous = 0.0
        previous_fpr = 1.0
        for i, band in enumerate(bands):
            if isinstance(band.upto, FprTarget):
                # an edge higher up flags fewer benign requests: rates must fall as bands ascend
                if band.upto.benign_fpr >= previous_fpr:
                    raise LocatedValueError(f"bands must ascend: band {i} ({band.name}) has benign_fpr "
                                            f"{band.upto.benign_fpr}, not below {previous_fpr}", (i, "upto"))
                previous_fpr = band.upto.benign_fpr
                continue
            if band.upto <= previous:
                raise LocatedValueError(f"bands must ascend: band {i} ({band.name}) ends at {band.upto}, not above {previous}", (i, "upto"))
            previous = band.upto
        last = bands[-1].upto
        if isinstance(last, FprTarget) or last != 1.0:
            raise LocatedValueError(f"bands must reach 1.0; the last ends at {last}", (len(bands) - 1, "upto"))
        seen: set[str] = set()
        for i, band in enumerate(bands):
            if band.name in seen:
                raise LocatedValueError(f"band names must be unique: {band.name!r} repeats", (i, "name"))
            seen.add(band.name)
        return bands

    @property
    def error_rate_edges(self) -> bool:
        """Whether some band edge is a benign false-positive rate (resolved per format at load)."""
        return any(isinstance(b.upto, FprTarget) for b in self.bands)

    def band_for(self, risk: float, bands: "Sequence[Band] | None" = None) -> Band:
        """The band a risk falls in, over `bands` (numeric edges: a format's resolved ones)."""
        bands = self.bands if bands is None else bands
        for band in bands:
            if isinstance(band.upto, FprTarget):
                raise ValueError(f"band {band.name!r} has an error-rate edge; resolve it first (PolicyRuntime.bands_for)")
            if risk <= band.upto:
                return band
        return bands[-1]

    def with_default_stages(self, default_stage: Callable[[str], str]) -> "Policy":
        """This policy with each stage it leaves out set to `default_stage(kind)` (a plugin
        manager's), so everything downstream reads a concrete stage."""
        updates = {field: StageSpec(use=default_stage(kind)) for field, kind in DEFAULTED_STAGES.items()
                   if getattr(self, field) is None}
        return self.model_copy(update=updates) if updates else self

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @property
    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced by the override."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError([(str(path), 1, "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([(str(path), 1, f"cannot read: {exc}")]) from None


def _resolve_extends(ref: str, here: Path) -> Path:
    candidate = Path(ref)
    if not candidate.suffix:
        candidate = candidate.with_suffix(".yaml")
    return candidate if candidate.is_absolute() else here.parent / candidate


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], LineMap]:
    """The policy document with its `extends:` chain merged in, and where each key came from."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(p.name for p in _chain + (resolved,))
        raise PolicyError([(str(path), 1, f"extends cycle: {cycle}")])
    data, lines = load_yaml(_read(path), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError([(str(path), lines.line_for(())[1], "a policy must be a YAML mapping")])
    data.setdefault("name", path.stem)
    parent = data.pop("extends", None)
    if parent is None:
        return data, lines
    if not isinstance(parent, str) or not parent.strip():
        raise PolicyError([(str(path), lines.line_for(("extends",))[1], "extends must name a policy file")])
    base_path = _resolve_extends(parent, path)
    if not base_path.is_file():
        raise PolicyError([(str(path), lines.line_for(("extends",))[1], f"extends: {parent!r} not found ({base_path})")])
    base, base_lines = load_raw(base_path, _chain + (resolved,))
    # The child's own name (explicit, or its file name) wins over the base's.
    return deep_merge(base, data), lines.merged_over(base_lines)


def problems_from(exc: ValidationError, lines: LineMap) -> list[tuple[str, int, str]]:
    out = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, LocatedValueError):
            loc = loc + cause.loc
        file, line = lines.line_for(loc)
        where = ".".join(str(p) for p in loc)
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}" if loc else "unknown key"
        out.append((file, line, f"{where}: {msg}" if where and err.get("type") != "extra_forbidden" else msg))
    return out


def load_policy(path: str | Path, known_stages: Mapping[str, set[str]] | None = None,
                default_stage: Callable[[str], str] | None = None) -> Policy:
    """Load, merge and validate one policy file. With `known_stages` (stage kind -> names), also
    reject stages that no installed plugin provides; with `default_stage` (a plugin manager's),
    fill in the stages the policy leaves out, so the policy as loaded is the policy as served (and
    hashed). Errors carry file and line."""
    data, lines = load_raw(Path(path))
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(problems_from(exc, lines)) from None
    if known_stages is not None:
        problems = unknown_stages(policy, lines, known_stages)
        if problems:
            raise PolicyError(problems)
    if default_stage is not None:
        from guardrail.errors import PluginError

        try:
            policy = policy.with_default_stages(default_stage)
        except PluginError as exc:
            raise PolicyError([(str(path), 1, str(exc))]) from None
    return policy


def unknown_stages(policy: Policy, lines: LineMap, known: Mapping[str, set[str]]) -> list[tuple[str, int, str]]:
    uses: list[tuple[str, tuple[Any, ...], str]] = [
        (kind, (field, "use"), getattr(policy, field).use) for field, kind in DEFAULTED_STAGES.items()
        if getattr(policy, field) is not None  # a default is checked when the policy is built
    ]
    uses += [("risk_assessors", ("risk", "assessors", i, "use"), a.use) for i, a in enumerate(policy.risk.assessors)]
    captioner = policy.reformulator.params.get("captioner") if policy.reformulator else None
    if isinstance(captioner, str):
        uses.append(("captioners", ("reformulator", "with", "captioner"), captioner))
    problems = []
    for kind, loc, name in uses:
        names = known.get(kind, set())
        if name not in names:
            file, line = lines.line_for(loc)
            hint = f" (known: {', '.join(sorted(names))})" if names else ""
            problems.append((file, line, f"unknown {kind[:-1].replace('_', ' ')} {name!r}: no installed plugin provides it{hint}"))
    return problems
