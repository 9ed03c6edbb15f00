"""What several subcommands share: how `--model` is described, and when to draw progress bars."""

from __future__ import annotations

import argparse
import sys
from typing import Any

TINY_ARCHS = "llama, llava, llava_next, qwen2_vl, qwen2_5_vl, idefics3, smolvlm, paligemma"
MODEL_HELP = (
    "the model: a local transformers folder, a local .gguf file, 'smollm2' (the embedded default, "
    f"nothing to download) or 'tiny-random:ARCH', a seeded tiny random model (ARCH: {TINY_ARCHS})"
)


def add_model(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
    parser.add_argument("--model", help=MODEL_HELP, **({"required": True} | kwargs))


def add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                        help="the engine: transformers in this process, or vLLM (a `vllm serve` started on loopback "
                             "from .venv-vllm, or the one at --vllm-url; text-only models, logit-interpolation "
                             "steering; hidden-state assessors through a second, pooling vLLM server; docs/serving.md)")
    parser.add_argument("--vllm-url", default=None,
                        help="with --backend vllm: a running vLLM server started with guardrail's logits processor "
                             "and the same artifacts (the remote shape)")
    parser.add_argument("--vllm-states-url", default=None,
                        help="with --vllm-url: a running vLLM states server (guardrail's pooling model) for the "
                             "decoder-layer states hidden-state assessors read; without it such a policy is refused")


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are drawn only when stderr is a terminal anyway)")


def show_progress(args: argparse.Namespace, stream: Any = None) -> bool:
    """Progress bars redraw themselves with carriage returns: on a terminal that is a bar, in a log
    file or a CI transcript it is thousands of lines of noise. Draw them only on a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not getattr(args, "no_progress", False) and bool(isatty and isatty())
