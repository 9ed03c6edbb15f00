"""First contact (issue 13, friction list): `python -m guardrail`, help text for every option with
its default, `--model` naming the forms it accepts, no carriage-return spam when stderr is not a
terminal, the refusal warning once, and README/serving snippets that work as written."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import warnings

import pytest

from conftest import REPO
from guardrail.cli import build_parser, main

OWN_COMMANDS = ["calibrate", "generate", "serve", "demo", "diagnose", "eval", "plugins", "policy"]
MODEL_COMMANDS = ["calibrate", "generate", "serve", "demo", "diagnose", "eval"]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f"{name} {k}": v for k, v in subparsers(sub).items()})
    return out


def test_python_dash_m_guardrail_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "guardrail", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("guardrail "), done.stderr


@pytest.mark.parametrize("command", OWN_COMMANDS + ["policy check"])
def test_every_option_has_help(command):
    parser = subparsers(build_parser())[command]
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.help in (None, "") and not isinstance(a, argparse._HelpAction)]
    assert missing == [], f"guardrail {command}: options without help: {missing}"


def test_help_shows_defaults():
    text = subparsers(build_parser())["calibrate"].format_help()
    flat = " ".join(text.split()).split("options:", 1)[1]  # the option list, not the usage line
    for option, default in (("--steps", "3"), ("--gamma", "0.3"), ("--batch-size", "16"), ("--prototypes", "elicited")):
        shown = re.search(rf"{option} \S+ (.*?)(?= --|$)", flat)
        assert shown and f"default: {default}" in shown.group(1), (option, shown and shown.group(1))
    serve = " ".join(subparsers(build_parser())["serve"].format_help().split()).split("options:", 1)[1]
    assert "default: 8000" in serve and "default: 256" in serve


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_option_names_the_accepted_forms(command):
    parser = subparsers(build_parser())[command]
    (model,) = [a for a in parser._actions if "--model" in a.option_strings]
    for form in ("smollm2", "tiny-random:ARCH", ".gguf", "folder", "llava", "qwen2_vl"):
        assert form in model.help, (command, form)


def test_calibrate_off_a_terminal_draws_no_progress_bars_and_warns_once(tmp_path, capsys):
    from guardrail.calibration import packaged_prompts

    (tmp_path / "h.txt").write_text("\n".join(packaged_prompts("harmful")[:6]))
    (tmp_path / "b.txt").write_text("\n".join(packaged_prompts("benign")[:6]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # No --no-progress: under pytest stderr is not a terminal, as in CI or `2> log`.
        assert main(["calibrate", "--model", "tiny-random:llama", "--out", str(tmp_path / "art"),
                     "--harmful", str(tmp_path / "h.txt"), "--benign", str(tmp_path / "b.txt")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "it/s" not in err
    said = out + err + "".join(str(w.message) for w in caught)
    assert said.count("do not open a refusal") == 1  # in the summary, not again as a Python warning


# ----- snippets that work as written -------------------------------------------------------------
DOCS = [REPO / "README.md", REPO / "docs" / "serving.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_images_named_in_the_docs_exist(doc):
    text = doc.read_text()
    named = re.findall(r"--image (\S+)", text) + re.findall(r'open\("([^"]+\.(?:png|jpg))"', text)
    assert named, f"{doc.name} names no example image"
    assert [p for p in named if not (REPO / p).is_file()] == []


def test_the_readme_calibrates_before_it_loads_artifacts():
    text = (REPO / "README.md").read_text()
    for match in re.finditer(r'artifacts="([^"]+)"', text):
        calibrated = re.findall(r"calibrate [^\n]*--out (\S+)", text[: match.start()])
        assert match.group(1).rstrip("/") in [c.rstrip("/") for c in calibrated], match.group(1)
