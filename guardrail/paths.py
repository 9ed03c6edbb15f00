"""Where guardrail keeps what it builds once and reuses: converted models, data sets, artifacts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """`$GUARDRAIL_HOME`, else `$XDG_CACHE_HOME/guardrail`, else `~/.cache/guardrail`."""
    env = os.environ.get("GUARDRAIL_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "guardrail"
