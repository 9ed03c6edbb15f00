"""`guardrail plugins [--json]`: installed plugins, their versions and the stages they provide."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list plugins and the stages they provide")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardrail.plugin.manager import PluginManager

    plugins = PluginManager().plugins()
    if args.json:
        print(json.dumps(plugins, indent=2))
        return 0
    for p in plugins:
        origin = "built-in" if p["builtin"] else (p["distribution"] or "local")
        print(f"{p['name']}  ({origin} {p['version'] or ''})".rstrip())
        for kind, names in p["stages"].items():
            marked = [f"{n} (default)" if p["defaults"].get(kind) == n else n for n in names]
            print(f"    {kind}: {', '.join(marked)}")
        other = [h for h in p["hooks"] if not h.startswith("guardrail_register_")]
        if other:
            print(f"    hooks: {', '.join(other)}")
    return 0
