"""Calibration: the core gathers the model's states once, every registered calibrator fits its block.

    1. every calibrator says what it needs (`needs(ctx)`: greedy steps of the risk pass, layers)
    2. one shared risk pass over the calibration rows (reformulated queries) computes all of it
    3. the calibrators fit in dependency order (`requires`), each writing its own named, versioned
       block; a calibrator may read the blocks fitted before it (`ctx.block(name)`) and may run the
       engine itself (the prototypes' elicitation does)
    4. the blocks, the model fingerprint and the data hashes go into one artifact

The core knows no calibrator by name; calibrators come from plugins through the hook
`guardrail_register_calibrators`. `gather` and `fit_blocks` are public so an evaluation can gather
once and fit on subsets of rows (leave-one-source-out cross-validation) without running the model
again: `GatheredStates.subset(rows)` is all a fold needs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence


from guardrail.lazy import lazy_module
from guardrail.errors import GuardrailError
from guardrail.method.artifacts import Artifacts, Block, BlockView, save_artifacts
from guardrail.method.prompts import risk_row
from guardrail.plugin.protocols import RiskNeeds

if TYPE_CHECKING:
    import torch
else:  # imported when a tensor is first made, so registering and routing need no torch
    torch = lazy_module("torch")

if TYPE_CHECKING:  # pragma: no cover
    from guardrail.plugin.manager import PluginManager


class CalibrationError(GuardrailError):
    pass


@dataclass
class CalibrationConfig:
    method: str = "elicited"  # how the prototypes are made (the prototypes calibrator reads it)
    steps: int = 3  # N: response steps of the risk pass
    steer_steps: int = 16  # K ≥ N: prototype steps available to steering bands
    gamma: float = 0.3
    folds: int = 5
    elicit_tokens: int = 24  # greedy tokens read to decide whether an answer refuses (and ends)
    elicit_prompts: int = 64  # harmful prompts (evenly spaced) used to elicit refusals
    progress: bool = True
    calibrators: Sequence[str] | None = None  # None: every registered calibrator
    held_out_folds: int = 5  # folds for the held-out benign risks behind error-rate band edges (0: none)
    extra_meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationRow:
    """One calibration request: its question, its label, and where it came from."""

    text: str
    harmful: bool
    source: str = "guardrail-lists"
    format: str = "text"  # the input format band edges are resolved for: text, typographic, image
    category: str | None = None
    images: tuple[Any, ...] = ()
    visual_context: str = ""  # what the reformulator wrote for its images (e.g. the OCR'd text)


@dataclass
class GatheredStates:
    """What the shared risk pass computed over the calibration rows, row-aligned with them."""

    rows: tuple[CalibrationRow, ...]
    step_logits: torch.Tensor | None  # [n, steps, V] raw logits, or None
    states: dict[int, torch.Tensor]  # layer -> [n, d] at the last token of the reformulated query
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, d] mean over its tokens

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([r.harmful for r in self.rows], dtype=torch.bool)

    @property
    def formats(self) -> list[str]:
        return [r.format for r in self.rows]

    @property
    def harmful_texts(self) -> list[str]:
        return [r.text for r in self.rows if r.harmful]

    def subset(self, index: Sequence[int]) -> "GatheredStates":
        idx = torch.tensor(list(index), dtype=torch.long)
        return GatheredStates(
            rows=tuple(self.rows[i] for i in index),
            step_logits=None if self.step_logits is None else self.step_logits[idx],
            states={l: v[idx] for l, v in self.states.items()},
            pooled={l: v[idx] for l, v in self.pooled.items()},
        )

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class CalibrationContext:
    """What a calibrator may use besides the gathered states: the engine (for passes of its own),
    the configuration, the model's sizes, and the blocks fitted before it."""

    engine: Any
    config: CalibrationConfig
    fitted: dict[str, Block] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return int(self.engine.fingerprint()["num_layers"])

    def block(self, name: str) -> BlockView:
        if name not in self.fitted:
            raise CalibrationError(f"block {name!r} is needed but was not fitted (is its calibrator registered?)")
        b = self.fitted[name]
        return BlockView(name, b.version, b.meta, b.tensors)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, stacklevel=3)


def packaged_prompts(name: str) -> list[str]:
    """The project's own calibration lists (guardrail/data/calibration_*.txt)."""
    text = resources.files("guardrail").joinpath("data", f"calibration_{name}.txt").read_text(encoding="utf-8")
    return read_prompt_lines(text)


def read_prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _hash_list(items: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(items)).encode()).hexdigest()


def progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def chunked(items: list[Any], size: int, desc: str, enabled: bool, fn: Callable[[list[Any]], Any]) -> list[Any]:
    """fn over consecutive chunks of `items`, with one progress bar."""
    out = []
    with progress(len(items), desc, enabled) as bar:
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            out.append(fn(chunk))
            bar.update(len(chunk))
    return out


def order_calibrators(calibrators: dict[str, Any]) -> list[tuple[str, Any]]:
    """Dependency order (`requires`), stable by name; a missing or circular requirement is an error."""
    done: list[str] = []
    pending = dict(sorted(calibrators.items()))
    while pending:
        ready = [n for n, c in pending.items() if all(r in done for r in getattr(c, "requires", ()))]
        if not ready:
            missing = {n: [r for r in getattr(c, "requires", ()) if r not in done] for n, c in pending.items()}
            raise CalibrationError(f"calibrators with unmet or circular requirements: {missing}")
        for name in ready:
            done.append(name)
            del pending[name]
    return [(n, calibrators[n]) for n in done]


def build_calibrators(plugins: "PluginManager", names: Sequence[str] | None = None) -> dict[str, Any]:
    known = plugins.stages()["calibrators"]
    chosen = list(known) if names is None else list(names)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise CalibrationError(f"unknown calibrator(s) {', '.join(unknown)} (known: {', '.join(sorted(known)) or 'none'})")
    # Whatever an explicit choice requires is fitted too.
    out: dict[str, Any] = {}
    queue = list(chosen)
    while queue:
        name = queue.pop()
        if name in out:
            continue
        if name not in known:
            raise CalibrationError(f"a calibrator requires {name!r}, which no plugin registers")
        out[name] = plugins.create("calibrators", name)
        queue.extend(getattr(out[name], "requires", ()))
    return out


def gather(engine: Any, rows: Sequence[CalibrationRow], need: RiskNeeds, show: bool = True) -> GatheredStates:
    """The shared risk pass over the rows' reformulated queries: N greedy steps' logits, the chosen
    layers' states at the last prompt token and the pooled ones, in one batched pass."""
    sees = bool(getattr(engine, "supports_images", False))
    chats = [risk_row(r.text, r.visual_context, tuple(r.images) if sees else ()) for r in rows]
    steps, layers, pooled = int(need.steps), sorted(need.layers), sorted(need.pooled)
    extra = {"pooled": pooled} if pooled else {}  # as the pipeline asks: only when wanted
    # Rows of similar length batch together (less padding to compute); results go back in order.
    order = sorted(range(len(chats)), key=lambda i: len(chats[i].text))
    passes = chunked([chats[i] for i in order], engine.batch_size, "risk pass", show,
                     lambda chunk: engine.risk_pass(chunk, steps, layers, **extra))
    back = torch.argsort(torch.tensor(order))

    def joined(per_pass: list[Any]) -> torch.Tensor:
        # as_tensor: a backend (a test double) may hand plain nested lists; calibration is tensor maths
        return torch.cat([torch.as_tensor(v, dtype=torch.float32) for v in per_pass])[back]

    return GatheredStates(
        rows=tuple(rows),
        step_logits=joined([p.step_logits for p in passes]) if steps else None,
        states={l: joined([p.states[l] for p in passes]) for l in layers},
        pooled={l: joined([p.pooled[l] for p in passes]) for l in pooled},
    )


def gather_needs(calibrators: dict[str, Any], ctx: CalibrationContext) -> RiskNeeds:
    """The union of what every calibrator needs from the shared pass (the longest step count)."""
    steps, layers, pooled = 0, set(), set()
    for _, cal in order_calibrators(calibrators):
        need = cal.needs(ctx)
        steps = max(steps, int(need.steps))
        layers |= set(int(l) for l in need.layers)
        pooled |= set(int(l) for l in need.pooled)
    return RiskNeeds(steps=steps, layers=frozenset(layers), pooled=frozenset(pooled))


def fit_blocks(calibrators: dict[str, Any], data: GatheredStates, ctx: CalibrationContext,
               keep: dict[str, Block] | None = None) -> dict[str, Block]:
    """Every calibrator's block, fitted on `data` only (a fold passes a subset); blocks in `keep`
    are taken as they are instead of being fitted again."""
    labels = data.labels
    if int(labels.sum()) < 4 or int((~labels).sum()) < 4:
        raise CalibrationError("calibration needs at least 4 harmful and 4 benign prompts")
    ctx.fitted = {}
    for name, cal in order_calibrators(calibrators):
        block = keep[name] if keep and name in keep else cal.fit(data, ctx)
        if not isinstance(block, Block):
            raise CalibrationError(f"calibrator {name!r} returned {type(block).__name__}, not a Block")
        ctx.fitted[name] = block
    return dict(ctx.fitted)


def calibrate(
    backend: Any,
    harmful: list[str],
    benign: list[str],
    cfg: CalibrationConfig | None = None,
    out: str | Path | None = None,
    plugins: "PluginManager | None" = None,
) -> Artifacts:
    """Calibrate from two prompt lists (one source, text format)."""
    rows = [CalibrationRow(h, True) for h in harmful] + [CalibrationRow(b, False) for b in benign]
    return calibrate_rows(backend, rows, cfg, out, plugins)


def calibrate_rows(
    backend: Any,
    rows: Sequence[CalibrationRow],
    cfg: CalibrationConfig | None = None,
    out: str | Path | None = None,
    plugins: "PluginManager | None" = None,
    keep: dict[str, Block] | None = None,
) -> Artifacts:
    """Calibrate on `rows`; blocks in `keep` (e.g. prototypes made from another artifact's rows)
    are carried into the artifact as they are and not fitted again, held-out folds included."""
    from guardrail import __version__
    from guardrail.plugin.manager import PluginManager

    cfg = cfg or CalibrationConfig()
    if cfg.steer_steps < cfg.steps:
        raise CalibrationError("steer_steps must be at least steps")
    plugins_loaded = (plugins or PluginManager()).load()
    calibrators = build_calibrators(plugins_loaded, cfg.calibrators)
    stray = sorted(set(keep or {}) - set(calibrators))
    if stray:
        raise CalibrationError(f"blocks to keep {stray} belong to no calibrator of this run ({', '.join(sorted(calibrators))})")
    ctx = CalibrationContext(engine=backend, config=cfg)
    data = gather(backend, rows, gather_needs(calibrators, ctx), cfg.progress)
    blocks = fit_blocks(calibrators, data, ctx, keep)
    held_out = held_out_benign(calibrators, blocks, data, ctx, plugins_loaded, keep) if cfg.held_out_folds else None
    harmful = [r.text for r in rows if r.harmful]
    benign = [r.text for r in rows if not r.harmful]
    meta: dict[str, Any] = {
        "model": backend.name,
        "fingerprint": backend.fingerprint(),
        "library_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps": cfg.steps,
        "gamma": cfg.gamma,
        "data": {"harmful": len(harmful), "benign": len(benign),
                 "harmful_sha256": _hash_list(harmful), "benign_sha256": _hash_list(benign),
                 "sources": sorted({r.source for r in rows}), "formats": sorted({r.format for r in rows})},
        "warnings": list(ctx.warnings),
        **({"kept_blocks": sorted(keep)} if keep else {}),
        **cfg.extra_meta,
    }
    if held_out is not None:
        meta["held_out_benign"] = held_out
    if out is not None:
        save_artifacts(out, blocks, meta)
    return Artifacts.from_blocks(meta, blocks)


class _FoldEngine:
    """The engine as an assessor sees it while scoring one fold: the fold's artifact instead of
    the final one; everything else is the real engine's."""

    def __init__(self, engine: Any, artifacts: Artifacts):
        self._engine = engine
        self.artifacts = artifacts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def held_out_folds(data: GatheredStates, k: int) -> tuple[str, list[list[int]]]:
    """Test rows of each fold: whole sources left out when there are several, else rows by index."""
    sources = sorted({r.source for r in data.rows})
    if len(sources) >= 2:
        return "source", [[i for i, r in enumerate(data.rows) if r.source == s] for s in sources]
    return "row", [[i for i in range(len(data)) if i % k == f] for f in range(k)]


def held_out_benign(calibrators: dict[str, Any], blocks: dict[str, Block], data: GatheredStates,
                    ctx: CalibrationContext, plugins: "PluginManager",
                    kept: dict[str, Block] | None = None) -> dict[str, Any]:
    """Each assessor's risk for every benign row, from blocks fitted without that row's fold: the
    scores error-rate band edges are resolved from (per input format). Assessors are the risk
    stages named like a calibrator's block; a calibrator with `refit_per_fold = False` (the
    prototypes, fitted on harmful rows only, so benign rows stay unseen) keeps its full block."""
    from guardrail.engine.backend import RiskPass
    from guardrail.pipeline.caption_cache import CaptionCache
    from guardrail.plugin.protocols import StageEnv

    assessors = [n for n in calibrators if n in plugins.stages()["risk_assessors"]]
    split, folds = held_out_folds(data, ctx.config.held_out_folds)
    keep = {n: b for n, b in blocks.items() if not getattr(calibrators[n], "refit_per_fold", True) or n in (kept or {})}
    risk: dict[str, dict[int, float]] = {n: {} for n in assessors}
    skipped: list[str] = []
    with progress(len(folds), "held-out benign risks", ctx.config.progress) as bar:
        for f, test in enumerate(folds):
            bar.update(1)
            test_benign = [i for i in test if not data.rows[i].harmful]
            train = sorted(set(range(len(data))) - set(test))
            if not test_benign:
                continue
            try:
                fold_ctx = CalibrationContext(engine=ctx.engine, config=ctx.config)
                fold_blocks = fit_blocks(calibrators, data.subset(train), fold_ctx, keep)
            except CalibrationError as exc:
                skipped.append(f"fold {f}: {exc}")
                continue
            env = StageEnv(engine=_FoldEngine(ctx.engine, Artifacts.from_blocks({}, fold_blocks)),
                           captions=CaptionCache(1), plugins=plugins)
            held = data.subset(test_benign)
            rp = RiskPass(step_logits=held.step_logits, states=held.states, pooled=held.pooled)
            for name in assessors:
                stage = plugins.create("risk_assessors", name)
                stage.check(env, None)
                for i, score in zip(test_benign, stage.score(rp, [None] * len(test_benign), env)):
                    risk[name][i] = float(score.risk)
    scored = sorted(set().union(*(set(r) for r in risk.values()))) if risk else []
    formats = sorted({data.rows[i].format for i in scored})
    return {
        "split": split, "folds": len(folds), "skipped": skipped,
        "rows": {fmt: sum(1 for i in scored if data.rows[i].format == fmt) for fmt in formats},
        "risk": {name: {fmt: [round(r[i], 6) for i in scored if data.rows[i].format == fmt and i in r] for fmt in formats}
                 for name, r in risk.items()},
    }
