"""The `guardrail` command. Each subcommand lives in guardrail/commands/<name>.py and exposes
`register(subparsers)` (adds its parser, sets `func`) so the CLI grows without one long file."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from guardrail.errors import GuardrailError

COMMANDS = ["plugins", "policy", "generate", "calibrate", "serve", "data", "eval", "demo", "diagnose", "bench", "crossval", "vllm-files"]


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is
    none worth showing (None, False: a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """The formatter for a parser and every subcommand under it (they are made by the commands)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _use_formatter(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardrail", description="Risk-adaptive steering middleware for (multimodal) LLMs")
    from guardrail import __version__

    parser.add_argument("--version", action="version", version=f"guardrail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"guardrail.commands.{name.replace('-', '_')}").register(sub)
    _use_formatter(parser)
    return parser


def _quiet_library_progress() -> None:
    """transformers' and huggingface_hub's own progress bars (GGUF conversion, weight loading)
    write carriage returns into logs and pipes; guardrail's bars already stay off there."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not sys.stderr.isatty():
        _quiet_library_progress()
    try:
        return int(args.func(args) or 0)
    except GuardrailError as exc:
        print(f"guardrail: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
