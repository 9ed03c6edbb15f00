"""`guardrail vllm-files --dest DIR --model M [--artifacts ART]`: what a remote vLLM host installs.

Writes the in-engine modules (the logits processor, the layer-states pooling model and the entry
point that registers it) into DIR and prints the two `vllm serve` command lines that load them:
the generating server (`--vllm-url`) and, when the artifact's assessors read decoder layers, the
states server (`--vllm-states-url`) for exactly those layers. For a vision-language checkpoint the
generating server keeps its tokenizer and passes content parts to the chat template (image rows
go to its chat endpoint), and there is no states server (it wraps text-only architectures)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vllm-files", help="write the modules a vLLM server loads and print its `vllm serve` flags")
    p.add_argument("--dest", required=True, help="folder to write (put it on the vLLM server's PYTHONPATH)")
    p.add_argument("--model", required=True, help="the checkpoint folder the vLLM server serves, or smollm2")
    p.add_argument("--artifacts", default=None, help="the calibration artifact the guard uses (its layers and sha256)")
    p.add_argument("--states-layers", default=None,
                   help="comma-separated decoder layers for the states server instead of the artifact's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardrail.engine.vllm import (PROCESSOR_CLASS, PROCESSOR_MODULE, checkpoint_architecture, headless_adapter,
                                       processor_dir)
    from guardrail.engine.vllm_states import artifact_layers, states_server_args
    from guardrail.errors import InputError
    from guardrail.method.artifacts import load_artifacts

    if args.model == "smollm2":
        from guardrail.models.smollm2 import ensure_converted

        folder = ensure_converted()
    else:
        folder = Path(args.model).expanduser()
    if not (folder / "config.json").is_file():
        raise InputError(f"--model: {folder} is not a checkpoint folder (no config.json)")
    adapter = headless_adapter(folder, args.model)
    vision = bool(adapter.supports_images)
    if vision and args.states_layers:
        raise InputError(f"--states-layers: the states server serves text-only checkpoints; {args.model} is a "
                         "vision-language model")
    if vision:
        layers = []
        if args.artifacts:
            load_artifacts(args.artifacts, adapter.fingerprint())  # the artifact must be this model's
    elif args.states_layers is not None:
        try:
            layers = sorted({int(x) for x in args.states_layers.split(",") if x.strip()})
        except ValueError:
            raise InputError(f"--states-layers: comma-separated integers, got {args.states_layers!r}") from None
    else:
        art = load_artifacts(args.artifacts, adapter.fingerprint()) if args.artifacts else None
        layers = artifact_layers(art)
    dest = processor_dir(Path(args.dest).expanduser()).resolve()
    model = shlex.quote(str(folder))
    env = f"PYTHONPATH={shlex.quote(str(dest))}"
    artifacts = f"GUARDRAIL_ARTIFACTS={shlex.quote(str(Path(args.artifacts).resolve()))} " if args.artifacts else ""
    print(f"wrote {dest}")
    print("# the generating server (guardrail ... --vllm-url http://HOST:PORT)")
    tokens = "--chat-template-content-format openai" if vision else "--skip-tokenizer-init"
    print(f"{artifacts}{env} vllm serve {model} --max-logprobs -1 {tokens} "
          f"--logits-processors {PROCESSOR_MODULE}:{PROCESSOR_CLASS}")
    if vision:
        print("# no states server: it serves text-only checkpoints, so policies reading layer states are refused")
    elif layers:
        flags = " ".join(shlex.quote(a) for a in states_server_args(checkpoint_architecture(folder), layers))
        print(f"# the states server for layers {layers} (guardrail ... --vllm-states-url http://HOST:PORT)")
        print(f"{env} vllm serve {model} {flags}")
    else:
        print("# no states server: the artifact's assessors read no decoder layers")
    print("# GPUs: add --tensor-parallel-size N (and --pipeline-parallel-size P across nodes) to each")
    return 0
