"""The host side of the vLLM states pass without an engine: the vector layout, the layers an
artifact needs, the server flags and the folder a vLLM server installs (tests/test_vllm.py runs the
real pooling engine against transformers)."""

from __future__ import annotations

import json

import pytest
import torch

from guardrail.engine.vllm_states import artifact_layers, decode_states, states_server_args
from guardrail.errors import ModelError
from guardrail.method.artifacts import Artifacts, Block


def _vector(layers: list[int], mean: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    header = torch.tensor([float(len(layers))] + [float(l) for l in layers])
    return torch.cat([header, mean.flatten(), last.flatten()])


def test_decode_states_reads_the_layers_then_averages_then_last_tokens():
    mean, last = torch.randn(3, 8), torch.randn(3, 8)
    layers, got_mean, got_last = decode_states(_vector([4, 9, 12], mean, last), hidden=8)
    assert layers == [4, 9, 12]
    assert torch.equal(got_mean, mean) and torch.equal(got_last, last)


@pytest.mark.parametrize("vector", [torch.zeros(10), torch.cat([torch.tensor([2.0, 1, 2]), torch.zeros(31)])],
                         ids=["no-header", "short"])
def test_a_vector_of_another_shape_is_refused(vector):
    # e.g. a plain embedding model at the URL, or a checkpoint of another width
    with pytest.raises(ModelError, match="not guardrail's layer states for hidden size 8"):
        decode_states(vector, hidden=8)
    with pytest.raises(ModelError, match="empty vector"):
        decode_states(torch.zeros(0), hidden=8)


def test_artifact_layers_are_every_layer_a_block_records():
    art = Artifacts.from_blocks({}, {
        "probe": Block(1, {"layers": [14, 12]}),
        "single": Block(1, {"layer": 27}),
        "logits_only": Block(1, {"steps": 3}),
        "odd": Block(1, {"layers": ["x", True, 3]}),
    })
    assert artifact_layers(art) == [3, 12, 14, 27]
    assert artifact_layers(Artifacts.from_blocks({}, {"logits_only": Block(1, {"steps": 3})})) == []
    assert artifact_layers(None) == []


def test_states_server_args_name_the_states_architecture_and_keep_prompts_whole():
    args = states_server_args("LlamaForCausalLM", [16, 12])
    overrides = json.loads(args[args.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["GuardrailStatesLlamaForCausalLM"], "guardrail_layers": [12, 16]}
    assert args[args.index("--runner") + 1] == "pooling"
    assert "--no-enable-chunked-prefill" in args and "--no-enable-prefix-caching" in args


def test_processor_dir_holds_both_modules_and_the_plugin_entry_point(tmp_path):
    from importlib.metadata import distributions

    from guardrail.engine.vllm import PROCESSOR_MODULE, STATES_MODULE, processor_dir

    folder = processor_dir(tmp_path / "proc")
    assert (folder / f"{PROCESSOR_MODULE}.py").is_file() and (folder / f"{STATES_MODULE}.py").is_file()
    found = [d for d in distributions(path=[str(folder)]) if d.metadata["Name"] == STATES_MODULE]
    assert len(found) == 1
    (entry,) = [e for e in found[0].entry_points if e.group == "vllm.general_plugins"]
    assert entry.value == f"{STATES_MODULE}:register"


def test_cli_vllm_files_writes_the_folder_and_prints_both_servers(tmp_path, capsys):
    """`guardrail vllm-files`: what a remote vLLM host installs, and the two command lines."""
    from guardrail.cli import main
    from guardrail.models.smollm2 import ensure_converted

    assert main(["vllm-files", "--dest", str(tmp_path / "opt"), "--model", "smollm2", "--states-layers", "14,12"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "opt" / "guardrail_vllm_states.py").is_file()
    assert "--logits-processors guardrail_vllm_processor:GuardrailInterpolation" in out
    assert '"guardrail_layers": [12, 14]' in out and "GuardrailStatesLlamaForCausalLM" in out
    assert main(["vllm-files", "--dest", str(tmp_path / "opt"), "--model", "smollm2", "--states-layers", "a"]) == 1
    assert "--states-layers" in capsys.readouterr().err
    assert main(["vllm-files", "--dest", str(tmp_path / "x"), "--model", str(tmp_path)]) == 1
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert ensure_converted().is_dir()


def test_cli_bench_verdicts_says_what_it_needs(tmp_path, capsys):
    from guardrail.cli import main

    assert main(["bench", "--verdicts", "--model", "smollm2"]) == 1
    assert "add --backend vllm" in capsys.readouterr().err
    assert main(["bench", "--verdicts", "--backend", "vllm", "--model", "smollm2"]) == 1
    assert "needs --artifacts" in capsys.readouterr().err


def test_verdict_sets_must_exist(tmp_path):
    from guardrail.engine.vllm_verdicts import _prompts
    from guardrail.errors import InputError

    with pytest.raises(InputError, match="no harmbench.jsonl .*guardrail data --dir"):
        _prompts(tmp_path)
