"""`guardrail diagnose`: does this model separate safe from unsafe requests at all, and where?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from guardrail.commands.common import add_model, add_progress, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="per-layer Fisher discriminant ratio, safe vs unsafe, with and without reformulation")
    add_model(p)
    p.add_argument("--policy", required=True, type=Path, help="whose reformulator (and captioner) to use")
    p.add_argument("--safe", type=Path, help="safe prompts (.txt/.csv/.jsonl); default: the packaged benign list")
    p.add_argument("--unsafe", type=Path, help="unsafe prompts; default: the packaged harmful list")
    p.add_argument("--typographic", action="store_true",
                   help="render every prompt as a FigStep-style image and ask with the FigStep text prompt")
    p.add_argument("--limit", type=int, default=None, help="at most N prompts per set")
    p.add_argument("--out", type=Path, default=None, help="write fisher.json and fisher.png here")
    p.add_argument("--device", default=None, help="torch device (default: the model loader's choice, CPU here)")
    add_progress(p)
    p.set_defaults(func=run)


def _items(path, packaged: str, typographic: bool, limit, scratch: Path):
    from guardrail.calibration import packaged_prompts
    from guardrail.evaluation.datasets import subsample
    from guardrail.evaluation.typography import FIGSTEP_PROMPT, png_bytes
    from guardrail.prompt_files import PromptItem, read_prompt_items

    items = read_prompt_items(path) if path else [PromptItem(p) for p in packaged_prompts(packaged)]
    items = subsample(items, limit)
    if not typographic:
        return items
    out = []
    for i, item in enumerate(items):
        image = scratch / f"{packaged}-{i:04d}.png"
        image.write_bytes(png_bytes(item.prompt))
        out.append(PromptItem(FIGSTEP_PROMPT, image))
    return out


def run(args: argparse.Namespace) -> int:
    import tempfile

    from guardrail.evaluation.diagnose import diagnose
    from guardrail.models import load_model
    from guardrail.policy import load_policy
    from guardrail.engine.transformers import TransformersBackend

    policy = load_policy(args.policy)
    engine = TransformersBackend(load_model(args.model, device=args.device))
    with tempfile.TemporaryDirectory(prefix="guardrail-diagnose-") as tmp:
        safe = _items(args.safe, "benign", args.typographic, args.limit, Path(tmp))
        unsafe = _items(args.unsafe, "harmful", args.typographic, args.limit, Path(tmp))
        result = diagnose(engine, policy, safe, unsafe, progress=show_progress(args))
    print(f"Fisher discriminant ratio, {len(safe)} safe vs {len(unsafe)} unsafe"
          f"{' (typographic images)' if args.typographic else ''}, model {engine.name}")
    print(f"{'layer':>5}  {'without':>10}  {'with reformulation':>18}")
    for layer, (a, b) in enumerate(zip(result.without, result.with_reformulation)):
        print(f"{layer:5d}  {a:10.3f}  {b:18.3f}")
    best = result.best()
    print(f"best layer without: {best['without'][0]} ({best['without'][1]:.3f}); "
          f"with reformulation: {best['with'][0]} ({best['with'][1]:.3f})")
    if args.out:
        from guardrail.evaluation import plots

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fisher.json").write_text(json.dumps(
            {"model": engine.name, "typographic": args.typographic, "safe": len(safe), "unsafe": len(unsafe),
             "without": result.without, "with_reformulation": result.with_reformulation}, indent=2), encoding="utf-8")
        plots.fisher(args.out / "fisher.png", {"without reformulation": result.without,
                                               "with reformulation": result.with_reformulation})
        print(f"wrote {args.out / 'fisher.json'} and {args.out / 'fisher.png'}")
    return 0
