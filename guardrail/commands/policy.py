"""`guardrail policy check FILE...`: validate policy files and tenants maps.

Exit 0 when every file is valid; exit 1 with one `FILE:LINE: message` line per problem otherwise.
Stage names are checked against the installed plugins.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="policy tools")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    check = psub.add_parser("check", help="validate policy files and tenants maps")
    check.add_argument("files", nargs="+", type=Path)
    check.set_defaults(func=run_check)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def check_file(path: Path, known: dict) -> list[tuple[str, int, str]]:
    from guardrail.errors import PolicyError
    from guardrail.policy import load_policy
    from guardrail.tenants import TENANTS_FILE, load_policy_set, load_tenants_map
    from guardrail.yaml_lines import load_yaml

    try:
        if path.name == TENANTS_FILE or _looks_like_tenants_map(path, load_yaml):
            load_tenants_map(path)
            # The routes must reach real, valid policies of the same directory.
            load_policy_set(path.parent, known)
        else:
            load_policy(path, known)
    except PolicyError as exc:
        return exc.problems
    return []


def _looks_like_tenants_map(path: Path, load_yaml) -> bool:
    try:
        data, _ = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except Exception:
        return False
    return isinstance(data, dict) and "tenants" in data and "bands" not in data


def run_check(args: argparse.Namespace) -> int:
    from guardrail.plugin.manager import PluginManager

    known = PluginManager().known_stages()
    problems = []
    for path in args.files:
        problems.extend(check_file(path, known))
    seen = set()
    for file, line, message in problems:
        if (file, line, message) not in seen:
            seen.add((file, line, message))
            print(f"{file}:{line}: {message}", file=sys.stdout)
    if not problems:
        print(f"ok: {len(args.files)} file(s) valid")
    return 1 if problems else 0
