"""`guardrail policy check FILE...`: validate policy files and tenants maps.

Exit 0 when every file is valid; exit 1 with one `FILE:LINE: message` line per problem otherwise.
Stage names are checked against the installed plugins. With `--model` (and `--artifacts`), every
policy's stages are also built and checked against that model exactly as a guard does at startup
(Protocols, the interventions the backend can apply, each stage's calibration block); without it,
the output says the stages were not built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="policy tools")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    check = psub.add_parser("check", help="validate policy files and tenants maps")
    check.add_argument("files", nargs="+", type=Path, help="policy files and tenants.yaml maps")
    check.add_argument("--model", default=None,
                       help="also build every policy's stages for this model (smollm2, tiny-random:ARCH, a folder, a .gguf)")
    check.add_argument("--artifacts", type=Path, default=None, help="calibration artifact folder for --model")
    check.set_defaults(func=run_check)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def check_file(path: Path, known: dict, default_stage=None) -> list[tuple[str, int, str]]:
    from guardrail.errors import PolicyError
    from guardrail.policy import load_policy
    from guardrail.tenants import TENANTS_FILE, load_policy_set, load_tenants_map
    from guardrail.yaml_lines import load_yaml

    try:
        if path.name == TENANTS_FILE or _looks_like_tenants_map(path, load_yaml):
            load_tenants_map(path)
            # The routes must reach real, valid policies of the same directory.
            load_policy_set(path.parent, known, default_stage)
        else:
            load_policy(path, known, default_stage)  # a stage left out needs an installed default
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

    plugins = PluginManager()
    known = plugins.known_stages()
    problems = []
    for path in args.files:
        problems.extend(check_file(path, known, plugins.default_stage))
    seen = set()
    for file, line, message in problems:
        if (file, line, message) not in seen:
            seen.add((file, line, message))
            print(f"{file}:{line}: {message}", file=sys.stdout)
    if problems:
        return 1
    if args.model is None:
        print(f"ok: {len(args.files)} file(s) valid (stages not built: pass --model [--artifacts] to build and check them)")
        return 0
    built = build_stages(args.files, args.model, args.artifacts)
    for line in built:
        print(line)
    if any(line.startswith("error") for line in built):
        return 1
    print(f"ok: {len(args.files)} file(s) valid; stages built and checked for {args.model}")
    return 0


def build_stages(files: list[Path], model: str, artifacts: Path | None) -> list[str]:
    """Build each policy's stages as a guard would; one line per policy file."""
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.errors import GuardrailError, PolicyError
    from guardrail.method.artifacts import load_artifacts
    from guardrail.models import load_model
    from guardrail.pipeline.caption_cache import CaptionCache
    from guardrail.pipeline.runtime import prepare
    from guardrail.plugin.manager import PluginManager
    from guardrail.plugin.protocols import StageEnv
    from guardrail.policy import load_policy
    from guardrail.tenants import TENANTS_FILE

    adapter = load_model(model)
    art = load_artifacts(artifacts, adapter.fingerprint()) if artifacts is not None else None
    plugins = PluginManager().load()
    env = StageEnv(engine=TransformersBackend(adapter, art), captions=CaptionCache(1), plugins=plugins)
    lines = []
    for path in files:
        if path.name == TENANTS_FILE:
            continue
        try:
            policy = load_policy(path, plugins.known_stages())
            runtime = prepare({policy.name: policy}, env)[policy.name]
        except (PolicyError, GuardrailError) as exc:
            lines.append(f"error: {path}: {exc}")
            continue
        lines.append(f"built: {path} (policy {policy.name})")
        if policy.error_rate_edges:
            for fmt, bands in sorted(runtime.bands.items()):
                edges = ", ".join(f"{b.name} <= {b.upto:.4f}" for b in bands)
                label = "any other format (the strictest)" if fmt == "*" else fmt
                lines.append(f"  edges for {label}: {edges}")
    return lines
