"""`guardrail crossval`: leave-one-source-out evaluation of the risk assessors (text and typographic)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crossval", help="leave-one-source-out: fit on all sources but one, score it at the policy's bands, rotate")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, type=Path, help="crossval.json, report.md, plots; cache/ keeps the model's states")
    p.add_argument("--policy", type=Path, default=Path("policies/default.yaml"), help="bands and reformulator (default: %(default)s)")
    p.add_argument("--sources", default=None, help="comma-separated source names (default: every prepared source)")
    p.add_argument("--assessors", default=None, help="comma-separated: plugin:NAME for each installed calibrated assessor (the "
                   "policy's own are always compared), and the experiments " + ", ".join(_assessor_names()) + " (default: all)")
    p.add_argument("--formats", default="text,typographic", help="input formats (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="at most N evenly spaced rows per source and label (text)")
    p.add_argument("--typo-limit", type=int, default=None, help="the same for typographic rows (default: --limit)")
    p.add_argument("--data", type=Path, default=None, help="prepared data folder (default: <cache>/data, from `guardrail data`)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="greedy steps of the risk pass (default: %(default)s)")
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument("--device", default=None)
    p.add_argument("--calibrate-text-only", action="store_true",
                   help="the policy's assessors are calibrated on text rows only, as `guardrail calibrate` on "
                        "prompt lists (default: text and typographic rows, as the default calibration and "
                        "`guardrail calibrate --data` fit them)")
    p.add_argument("--policy-risk", default=None, metavar="ASSESSOR",
                   help="score the policy's (single) assessor with this compared assessor instead, e.g. an "
                        "experiment shown to reproduce its plugin at a fraction of the cost (nested edges refit it "
                        "per inner fold)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _assessor_names() -> list[str]:
    from guardrail.evaluation.crossval import EXPERIMENTS

    return list(EXPERIMENTS)


def run(args: argparse.Namespace) -> int:
    from guardrail.evaluation import crossval as cv
    from guardrail.evaluation.datasets import data_home
    from guardrail.evaluation.sources import SOURCE_ORDER, SOURCES
    from guardrail.policy import load_policy

    progress = not args.no_progress and sys.stderr.isatty()
    policy = load_policy(args.policy)
    home = args.data or data_home()
    manifest_path = home / "SOURCES.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    names = [s.strip() for s in args.sources.split(",")] if args.sources else list(manifest.get("order", SOURCE_ORDER))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in cv.MODALITIES]
    if bad:
        raise cv.CrossvalError(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(cv.MODALITIES)}")
    from guardrail.plugin.manager import PluginManager

    plugins = PluginManager().load()
    known = cv.available(plugins)
    chosen = [a.strip() for a in args.assessors.split(",")] if args.assessors else list(known)
    unknown = [a for a in chosen if a not in known]
    if unknown:
        raise cv.CrossvalError(f"unknown assessor(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    keys = cv.policy_keys(policy, not args.calibrate_text_only)
    if args.policy_risk:
        if len(keys) != 1 or args.policy_risk not in known:
            raise cv.CrossvalError(f"--policy-risk needs a policy with one assessor and a compared assessor "
                                   f"(choose from {', '.join(known)})")
        keys = {use: args.policy_risk for use in keys}
    for key in keys.values():
        if key not in chosen and key in known:
            chosen.append(key)  # the policy's own assessor is always compared
    assessors = [known[a] for a in chosen]

    limits = {"text": args.limit, "typographic": args.typo_limit if args.typo_limit is not None else args.limit}
    per_source = {(m, s): cv.load_rows(home, [s], m, limits[m]) for m in formats for s in names}
    out, cache = args.out, args.out / "cache"
    out.mkdir(parents=True, exist_ok=True)

    engine = env = None

    def load_engine():
        nonlocal engine, env
        if engine is None:
            from guardrail.engine.transformers import TransformersBackend
            from guardrail.models import load_model
            from guardrail.pipeline.caption_cache import CaptionCache
            from guardrail.plugin.manager import PluginManager
            from guardrail.plugin.protocols import StageEnv

            print(f"loading {args.model} ...", file=sys.stderr)
            engine = TransformersBackend(load_model(args.model, device=args.device), batch_size=args.batch_size)
            env = StageEnv(engine=engine, captions=CaptionCache(8192), plugins=plugins)
        return engine, env

    # The model is needed only for what the cache does not hold yet; its fingerprint keys the cache.
    load_engine()
    tables = []
    for (m, s), rows in per_source.items():
        if rows:
            tables.append(cv.gather(engine, env, policy, rows, args.steps, cache, progress))
    table = cv.Table.concat(tables)
    ctx = cv.FitContext(engine=engine, num_layers=engine.adapter.num_layers, steps=args.steps, gamma=args.gamma,
                        cache=cache, progress=progress)
    result = cv.run(table, policy, assessors, ctx, names, engine.name, str(args.policy), progress, keys=keys)
    shaped = {s.name: s.shaped_guard for s in SOURCES}
    report = {**result.report, "formats": formats, "limits": limits,
              "rows": {m: sum(1 for r in table.rows if r["modality"] == m) for m in formats},
              "development_sources": sorted(s for s in names if shaped.get(s))}
    (out / "crossval.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(cv.report_md(report, shaped, manifest), encoding="utf-8")
    with open(out / "rows.jsonl", "w", encoding="utf-8") as fh:
        for r in result.rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    cv.plots(out, table.rows, result.oof, report["band_edges"])
    pooled = report["pooled"]
    for m in formats:
        p = pooled[m]
        print(f"{m:>11}: ASR {cv._pct(p['asr'])}  benign refused {cv._pct(p['benign_refusal'])}  "
              f"edgy refused {cv._pct(p['edgy_refusal'])}  AUROC {cv._num(p['auroc'])}  (policy assessor {report['policy_assessor']})")
    print(f"wrote {out / 'crossval.json'}, {out / 'report.md'} and plots")
    return 0
