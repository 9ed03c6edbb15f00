"""Calibration artifacts: tensors in safetensors plus a JSON sidecar that says what they belong to.

Layout of an artifact folder:
  artifacts.safetensors   prototypes [K, d], prototype_logits [K, V], directions [L, d],
                          midpoints [L, d], probe.weight [d], probe.bias [1], probe.mean [d], probe.scale [d]
  artifacts.json          model fingerprint, method, N, γ, per-assessor calibration (S_base, α, layer),
                          data hashes, library version, sha256 of the tensor file, warnings

Loading verifies the tensor file's sha256, the sidecar's own hash, the model fingerprint and every
tensor's shape, and names the first thing that does not match.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file

from guardrail.errors import ArtifactError

TENSORS = "artifacts.safetensors"
SIDECAR = "artifacts.json"
FORMAT_VERSION = 1


@dataclass
class Artifacts:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prototypes(self) -> torch.Tensor:
        return self._get("prototypes")

    @property
    def prototype_logits(self) -> torch.Tensor:
        return self._get("prototype_logits")

    @property
    def directions(self) -> torch.Tensor:
        return self._get("directions")

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ArtifactError(f"the artifact has no tensor {key!r}")
        return self.tensors[key]

    def assessor(self, name: str) -> dict[str, Any]:
        """The calibration block (S_base, α, layer, ...) for one assessor."""
        block = self.meta.get("assessors", {}).get(name)
        if block is None:
            raise ArtifactError(f"the artifact has no calibration for assessor {name!r}; recalibrate")
        return block


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_artifacts(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write both files atomically (temp file + rename): a reader never sees a half-written pair."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".tensors-", dir=out)
    os.close(fd)
    save_file(clean, tmp)
    full = dict(meta)
    full["format_version"] = FORMAT_VERSION
    full["tensors_sha256"] = _sha256_file(Path(tmp))
    full["tensor_shapes"] = {k: list(v.shape) for k, v in clean.items()}
    full["sidecar_sha256"] = _sidecar_digest(full)
    os.replace(tmp, out / TENSORS)
    fd, tmp_meta = tempfile.mkstemp(prefix=".sidecar-", dir=out)
    with os.fdopen(fd, "w") as fh:
        json.dump(full, fh, indent=2, sort_keys=True)
    os.replace(tmp_meta, out / SIDECAR)
    return out


def load_artifacts(directory: str | Path, fingerprint: dict[str, Any] | None = None) -> Artifacts:
    """Load and verify an artifact folder; with `fingerprint`, refuse one made for another model."""
    folder = Path(directory)
    sidecar, tensor_file = folder / SIDECAR, folder / TENSORS
    for path in (sidecar, tensor_file):
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: not a guardrail artifact folder (run `guardrail calibrate`)")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{sidecar} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{sidecar}: unknown artifact format version {meta.get('format_version') if isinstance(meta, dict) else None!r}")
    if meta.get("sidecar_sha256") != _sidecar_digest(meta):
        raise ArtifactError(f"{sidecar} was modified after calibration (its sha256 does not match)")
    check_structure(meta, sidecar)
    # Hash and load the same bytes: reading the file twice would load what was never verified if
    # it were replaced in between.
    data = tensor_file.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.get("tensors_sha256"):
        raise ArtifactError(
            f"{tensor_file} does not match its sidecar: sha256 {actual[:12]}… != recorded "
            f"{str(meta.get('tensors_sha256'))[:12]}… (tampered, truncated or replaced)"
        )
    if fingerprint is not None:
        check_fingerprint(meta.get("fingerprint", {}), fingerprint, folder)
    try:
        tensors = load_tensors(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{tensor_file} cannot be read: {exc}") from exc
    for key, shape in meta.get("tensor_shapes", {}).items():
        if key not in tensors or list(tensors[key].shape) != shape:
            raise ArtifactError(f"{tensor_file}: tensor {key!r} does not have the recorded shape {shape}")
    art = Artifacts(meta=meta, tensors=tensors)
    if fingerprint is not None:
        check_shapes(art, fingerprint)
    return art


CALIBRATION_NUMBERS = ("s_base", "alpha", "s_ref", "gamma", "steps", "layer")
INTEGER_NUMBERS = ("steps", "layer")


def check_structure(meta: dict[str, Any], where: Path | str) -> None:
    """The sidecar's fields have the types the loader and the assessors read. The self-hash only
    shows the file is as written; a sidecar edited by hand and re-hashed must still fail here,
    with its field named, instead of as a TypeError inside an assessor."""

    def fail(field: str, what: str, value: Any) -> None:
        raise ArtifactError(f"{where}: {field} must be {what}, got {value!r:.60}")

    for field, kind, what in (("fingerprint", dict, "an object"), ("tensor_shapes", dict, "an object"),
                              ("assessors", dict, "an object"), ("tensors_sha256", str, "a string")):
        if field in meta and not isinstance(meta[field], kind):
            fail(field, what, meta[field])
    for key, shape in meta.get("tensor_shapes", {}).items():
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            fail(f"tensor_shapes.{key}", "a list of sizes", shape)
    for name, block in meta.get("assessors", {}).items():
        if not isinstance(block, dict):
            fail(f"assessors.{name}", "an object", block)
        for field in CALIBRATION_NUMBERS:
            if field not in block:
                continue
            value = block[field]
            integer = field in INTEGER_NUMBERS
            if type(value) not in ((int,) if integer else (int, float)) or not math.isfinite(value) or (integer and value < 0):
                fail(f"assessors.{name}.{field}", "a whole number >= 0" if integer else "a finite number", value)
        layers = block.get("layers")
        if layers is not None and (not isinstance(layers, list) or not layers
                                   or not all(type(n) is int and n >= 0 for n in layers)):
            fail(f"assessors.{name}.layers", "a non-empty list of layer numbers", layers)


def check_fingerprint(recorded: dict[str, Any], actual: dict[str, Any], where: Path | str) -> None:
    diffs = [
        f"{key}: artifact {recorded.get(key)!r} vs model {actual.get(key)!r}"
        for key in sorted(set(recorded) | set(actual))
        if recorded.get(key) != actual.get(key)
    ]
    if diffs:
        raise ArtifactError(f"{where} was calibrated for another model ({'; '.join(diffs)})")


def check_shapes(art: Artifacts, fingerprint: dict[str, Any]) -> None:
    """Every steering tensor must fit the model: d = hidden size, V = vocab, L = layer count."""
    d, vocab, layers = fingerprint["hidden_size"], fingerprint["vocab_size"], fingerprint["num_layers"]
    # A multi-layer probe reads its layers' states side by side: k·d features.
    k = len(art.meta.get("assessors", {}).get("linear_probe", {}).get("layers", [0]))
    expected = {
        "prototypes": (None, d),
        "prototype_logits": (None, vocab),
        "directions": (layers, d),
        "midpoints": (layers, d),
        "probe.weight": (k * d,),
        "probe.mean": (k * d,),
        "probe.scale": (k * d,),
    }
    for key, shape in expected.items():
        if key not in art.tensors:
            continue
        got = tuple(art.tensors[key].shape)
        if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
            want = "×".join("*" if e is None else str(e) for e in shape)
            raise ArtifactError(f"artifact tensor {key!r} has shape {list(got)}, the model needs {want}")
