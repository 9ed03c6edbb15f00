"""`guardrail calibrate`: prototypes, sigmoid, directions and probes for one model."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from guardrail.commands.common import add_model, add_progress, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="calibrate a model and write its artifact folder")
    add_model(p)
    p.add_argument("--out", required=True, type=Path, help="the artifact folder to write (created if missing)")
    p.add_argument("--harmful", type=Path, help="harmful prompts (.txt/.csv/.jsonl); default: the packaged list")
    p.add_argument("--benign", type=Path, help="benign prompts; default: the packaged list")
    p.add_argument("--data", type=Path, default=None,
                   help="calibrate on the sources of a `guardrail data` folder (every source, harmful and benign, "
                        "text and typographic) instead of the packaged lists")
    p.add_argument("--default", action="store_true",
                   help="write the default calibration (what `guardrail demo` uses: the packaged lists' "
                        "prototypes, every other block fitted on the calibration sources except the evaluation "
                        "ones, text and typographic; --data names the sources folder, prepared when missing) "
                        "to --out; the other calibration options do not apply")
    p.add_argument("--sources", default=None, help="with --data: comma-separated sources (default: all prepared)")
    p.add_argument("--no-typographic", action="store_true", help="with --data: text rows only")
    p.add_argument("--limit", type=int, default=None,
                   help="with --data: at most N evenly spaced text rows per source and label (default: all)")
    p.add_argument("--typo-limit", type=int, default=None,
                   help="with --data: the same for typographic rows, each OCR'd once (default: all)")
    p.add_argument("--policy", type=Path, default=None,
                   help="with --data: the policy whose reformulator writes the typographic rows' visual context "
                        "(default: policies/default.yaml)")
    p.add_argument("--prototypes", default="elicited", choices=["paper", "elicited", "teacher-forced"],
                   help="how the prototypes calibrator makes the refusal states (default: %(default)s)")
    p.add_argument("--calibrators", default=None,
                   help="comma-separated calibrators to run (default: every registered one; see `guardrail plugins`)")
    p.add_argument("--steps", type=int, default=3, help="N, response steps of the risk pass")
    p.add_argument("--steer-steps", type=int, default=16,
                   help="prototype steps available to steering bands (the default policy steers up to 16)")
    p.add_argument("--gamma", type=float, default=0.3,
                   help="decay of later response steps in prototype_similarity's distribution (paper's gamma)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--device", default=None, help="torch device (default: the model loader's choice, CPU here)")
    add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardrail.calibration import CalibrationConfig, calibrate, calibrate_rows, packaged_prompts
    from guardrail.models import load_model
    from guardrail.prompt_files import read_prompts
    from guardrail.engine.transformers import TransformersBackend

    if args.default:
        return write_default(args)
    harmful = read_prompts(args.harmful) if args.harmful else packaged_prompts("harmful")
    benign = read_prompts(args.benign) if args.benign else packaged_prompts("benign")
    backend = TransformersBackend(load_model(args.model, device=args.device), batch_size=args.batch_size)
    cfg = CalibrationConfig(
        method=args.prototypes, steps=args.steps, steer_steps=args.steer_steps, gamma=args.gamma,
        progress=show_progress(args),
        calibrators=[c.strip() for c in args.calibrators.split(",") if c.strip()] if args.calibrators else None,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.data is not None:
            rows = source_rows(backend, args.data, args.sources, not args.no_typographic, args.policy,
                               args.limit, args.typo_limit)
            art = calibrate_rows(backend, rows, cfg, out=args.out)
        else:
            art = calibrate(backend, harmful, benign, cfg, out=args.out)
    print(summary(art.meta, args.out))
    _reraise(caught, art.meta.get("warnings", []))
    return 0


def write_default(args: argparse.Namespace) -> int:
    """The cached default calibration (built once), copied to --out."""
    import shutil

    from guardrail.errors import InputError
    from guardrail.evaluation.cached import ensure_artifacts
    from guardrail.models import load_model

    chosen = [f"--{k.replace('_', '-')}" for k in ("harmful", "benign", "sources", "calibrators", "limit", "typo_limit")
              if getattr(args, k) is not None] + (["--no-typographic"] if args.no_typographic else [])
    if chosen:
        raise InputError(f"--default calibrates as the demo does; it takes no {', '.join(chosen)}")
    adapter = load_model(args.model, device=args.device)
    folder, art = ensure_artifacts(adapter, progress=show_progress(args), data=args.data)
    if args.out.resolve() != folder.resolve():
        args.out.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            shutil.copy2(f, args.out / f.name)
    print(summary(art.meta, args.out))
    return 0


def source_rows(backend, data: Path, sources: str | None, typographic: bool, policy_file: Path | None,
                limit: int | None = None, typo_limit: int | None = None) -> list:
    from guardrail.evaluation import source_rows as calibration_rows

    names = [s.strip() for s in sources.split(",") if s.strip()] if sources else None
    rows = calibration_rows.load(data, names, typographic, limit, typo_limit)
    return calibration_rows.reformulate(backend, rows, policy_file)


def _reraise(caught: list, shown: list[str]) -> None:
    """Calibration warns (Python warnings) and also records its warnings in the artifact, which
    the summary prints as WARNING lines; re-raise only the ones the summary did not show, so none
    is printed twice."""
    for w in caught:
        if str(w.message) not in shown:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def summary(meta: dict, out: Path) -> str:
    lines = [
        f"artifacts written to {out}",
        f"  model {meta['model']} ({meta['fingerprint']['architecture']}, {meta['fingerprint']['num_layers']} layers)",
    ]
    for name, entry in sorted(meta["blocks"].items()):
        lines.append(f"  {name} (v{entry['version']}): {_describe(entry['meta'], meta['steps'])}")
    for w in meta.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    return "\n".join(lines)


def _describe(block: dict, steps: int) -> str:
    """A block's headline numbers, whatever calibrator wrote it."""
    parts = []
    if "method" in block:
        parts.append(f"method {block['method']}")
    if "text" in block:
        parts.append(f"argmax tokens {block.get('tokens', [])[:steps]} -> {block['text']!r}")
    for key in ("layer", "layers", "s_base", "alpha", "calibration_auroc", "cv_auroc"):
        if key in block:
            value = block[key]
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts) or "fitted"
