"""Calibration artifacts: tensors in safetensors plus a JSON sidecar that says what they belong to.

An artifact is a set of named, versioned **blocks**, one per calibrator (a plugin's): the
calibrator that writes a block is the stage that reads it back, through a typed view of its own.
The core knows no block by name; it owns the guarantees:

  artifacts.safetensors   every block's tensors, named "BLOCK/TENSOR"
  artifacts.json          model fingerprint, data hashes, library version, sha256 of the tensor file,
                          warnings, and per block: {"version", "meta": {...}, "dims": {TENSOR: [...]}}

`dims` names each tensor axis that must match the model ("hidden", "vocab", "layers"; null for a
free axis), so a wrong-size tensor is refused at load without knowing what the block is for.
Loading verifies the tensor file's sha256, the sidecar's own hash, the model fingerprint, every
tensor's recorded shape and dims, and names the first thing that does not match.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrail.errors import ArtifactError
from guardrail.lazy import lazy_module

if TYPE_CHECKING:
    import safetensors.torch as safetensors_torch
    import torch
else:  # imported when an artifact is first read or written, so registering needs neither
    torch = lazy_module("torch")
    safetensors_torch = lazy_module("safetensors.torch")

TENSORS = "artifacts.safetensors"
SIDECAR = "artifacts.json"
FORMAT_VERSION = 2
MODEL_DIMS = {"hidden": "hidden_size", "vocab": "vocab_size", "layers": "num_layers"}


@dataclass(frozen=True)
class Block:
    """What one calibrator fitted: JSON-ready meta, tensors, and each tensor's model-bound axes."""

    version: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dims: dict[str, tuple[str | None, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, tensor in self.tensors.items():
            if "/" in key:
                raise ArtifactError(f"block tensor name {key!r} may not contain '/'")
            axes = self.dims.get(key)
            if axes is not None and len(axes) != tensor.dim():
                raise ArtifactError(f"block tensor {key!r} has {tensor.dim()} axes but dims {list(axes)}")
            for axis in axes or ():
                if axis is not None and axis not in MODEL_DIMS:
                    raise ArtifactError(f"block tensor {key!r}: unknown dim {axis!r} (known: {', '.join(MODEL_DIMS)})")


@dataclass(frozen=True)
class BlockView:
    """A read-only view of one stored block; a plugin wraps it in its own typed view."""

    name: str
    version: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ArtifactError(f"artifact block {self.name!r} has no tensor {key!r}; recalibrate")
        return self.tensors[key]

    def field(self, key: str, kind: type | tuple[type, ...] = (int, float)) -> Any:
        """A meta field of the expected type, or an ArtifactError naming it (a hand-edited,
        re-hashed sidecar must fail here, not as a TypeError deep inside a stage)."""
        value = self.meta.get(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not isinstance(value, bool)
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            names = "/".join(k.__name__ for k in kinds)
            raise ArtifactError(f"artifact block {self.name!r}: field {key!r} must be {names}, got {value!r:.60}")
        return value


@dataclass
class Artifacts:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def blocks(self) -> list[str]:
        return sorted(self.meta.get("blocks", {}))

    def has(self, name: str) -> bool:
        return name in self.meta.get("blocks", {})

    def block(self, name: str) -> BlockView:
        """One calibrator's block, or an ArtifactError saying the artifact lacks it."""
        entry = self.meta.get("blocks", {}).get(name)
        if entry is None:
            have = ", ".join(self.blocks()) or "none"
            raise ArtifactError(f"the artifact has no calibration block {name!r} (it has: {have}); recalibrate")
        prefix = f"{name}/"
        tensors = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return BlockView(name, int(entry["version"]), dict(entry.get("meta", {})), tensors)

    def stored_block(self, name: str) -> Block:
        """One block as its calibrator wrote it (tensors and model-bound axes), to carry it into
        another artifact unchanged."""
        view = self.block(name)
        dims = self.meta["blocks"][name].get("dims", {})
        return Block(view.version, view.meta, dict(view.tensors), {k: tuple(v) for k, v in dims.items()})

    @classmethod
    def from_blocks(cls, meta: dict[str, Any], blocks: dict[str, Block]) -> "Artifacts":
        """An in-memory artifact (what save_artifacts would write), e.g. for one cross-validation fold."""
        tensors, stored = flatten(blocks)
        full = dict(meta)
        full["blocks"] = stored
        return cls(meta=full, tensors={k: v.detach().float().cpu() for k, v in tensors.items()})


def flatten(blocks: dict[str, Block]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Blocks -> ("BLOCK/TENSOR" -> tensor, the sidecar's "blocks" entry)."""
    tensors: dict[str, torch.Tensor] = {}
    stored: dict[str, Any] = {}
    for name, block in blocks.items():
        if "/" in name or not name:
            raise ArtifactError(f"calibration block name {name!r} must be non-empty and contain no '/'")
        if not isinstance(block, Block):
            raise ArtifactError(f"calibration block {name!r} is a {type(block).__name__}, not a Block")
        for key, tensor in block.tensors.items():
            tensors[f"{name}/{key}"] = tensor
        stored[name] = {"version": int(block.version), "meta": block.meta,
                        "dims": {k: list(v) for k, v in block.dims.items()}}
    return tensors, stored


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_artifacts(directory: str | Path, blocks: dict[str, Block], meta: dict[str, Any]) -> Path:
    """Write both files atomically (temp file + rename): a reader never sees a half-written pair."""
    tensors, stored = flatten(blocks)
    meta = {**meta, "blocks": stored}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".tensors-", dir=out)
    os.close(fd)
    safetensors_torch.save_file(clean, tmp)
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
        tensors = safetensors_torch.load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{tensor_file} cannot be read: {exc}") from exc
    for key, shape in meta.get("tensor_shapes", {}).items():
        if key not in tensors or list(tensors[key].shape) != shape:
            raise ArtifactError(f"{tensor_file}: tensor {key!r} does not have the recorded shape {shape}")
    art = Artifacts(meta=meta, tensors=tensors)
    if fingerprint is not None:
        check_shapes(art, fingerprint)
    return art


def check_structure(meta: dict[str, Any], where: Path | str) -> None:
    """The sidecar's fields have the types the loader reads. The self-hash only shows the file is as
    written; a sidecar edited by hand and re-hashed must still fail here, with its field named.
    Inside a block, numbers must be finite; what else a block's meta must hold is its owner's to
    check, through BlockView.field, when a policy that uses it loads."""

    def fail(field: str, what: str, value: Any) -> None:
        raise ArtifactError(f"{where}: {field} must be {what}, got {value!r:.60}")

    for field, kind, what in (("fingerprint", dict, "an object"), ("tensor_shapes", dict, "an object"),
                              ("blocks", dict, "an object"), ("tensors_sha256", str, "a string")):
        if field in meta and not isinstance(meta[field], kind):
            fail(field, what, meta[field])
    for key, shape in meta.get("tensor_shapes", {}).items():
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            fail(f"tensor_shapes.{key}", "a list of sizes", shape)
    for name, block in meta.get("blocks", {}).items():
        if not isinstance(block, dict):
            fail(f"blocks.{name}", "an object", block)
        if type(block.get("version")) is not int or block["version"] < 1:
            fail(f"blocks.{name}.version", "a whole number >= 1", block.get("version"))
        if not isinstance(block.get("meta", {}), dict):
            fail(f"blocks.{name}.meta", "an object", block.get("meta"))
        _check_finite(block.get("meta", {}), f"blocks.{name}.meta", fail)
        dims = block.get("dims", {})
        if not isinstance(dims, dict):
            fail(f"blocks.{name}.dims", "an object", dims)
        for key, axes in dims.items():
            if not isinstance(axes, list) or not all(a is None or (isinstance(a, str) and a in MODEL_DIMS) for a in axes):
                fail(f"blocks.{name}.dims.{key}", f"a list of {', '.join(MODEL_DIMS)} or null", axes)
            shape = meta.get("tensor_shapes", {}).get(f"{name}/{key}")
            if shape is not None and len(shape) != len(axes):
                fail(f"blocks.{name}.dims.{key}", f"{len(shape)} axes long", axes)


def _check_finite(value: Any, where: str, fail: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        fail(where, "a finite number", value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}", fail)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]", fail)


def check_fingerprint(recorded: dict[str, Any], actual: dict[str, Any], where: Path | str) -> None:
    diffs = [
        f"{key}: artifact {recorded.get(key)!r} vs model {actual.get(key)!r}"
        for key in sorted(set(recorded) | set(actual))
        if recorded.get(key) != actual.get(key)
    ]
    if diffs:
        raise ArtifactError(f"{where} was calibrated for another model ({'; '.join(diffs)})")


def check_shapes(art: Artifacts, fingerprint: dict[str, Any]) -> None:
    """Every tensor axis a block bound to the model (hidden size, vocab, layer count) matches it."""
    for name, entry in art.meta.get("blocks", {}).items():
        for key, axes in entry.get("dims", {}).items():
            full = f"{name}/{key}"
            if full not in art.tensors:
                raise ArtifactError(f"artifact block {name!r} declares tensor {key!r} but the file lacks it")
            got = tuple(art.tensors[full].shape)
            want = tuple(None if a is None else fingerprint[MODEL_DIMS[a]] for a in axes)
            if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
                shown = "×".join("*" if a is None else f"{fingerprint[MODEL_DIMS[a]]} ({a})" for a in axes)
                raise ArtifactError(f"artifact tensor {full!r} has shape {list(got)}, the model needs {shown}")
