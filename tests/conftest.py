"""Shared fixtures: tiny random models of every family, small calibrations, policy folders.

Nothing here downloads anything: models are built from config, the tokenizer is byte-level.
Calibration uses a few of the packaged prompts so each family calibrates in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # only in test_pipeline_fake's torch-free rerun, which uses no fixture below
    torch = None

FAMILIES = ["llama", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma"]
VLM_FAMILIES = [f for f in FAMILIES if f != "llama"]
REPO = Path(__file__).resolve().parent.parent

if torch is not None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep caches (converted models aside) out of the user's home during tests."""
    home = tmp_path_factory.getbasetemp() / "guardrail-home"
    monkeypatch.setenv("GUARDRAIL_HOME", str(home))
    real = Path.home() / ".cache" / "guardrail" / "models"
    if real.is_dir() and not (home / "models").exists():
        home.mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(real)  # reuse converted models (smollm2) across runs


_ADAPTERS: dict[str, object] = {}
_ARTIFACTS: dict[str, Path] = {}


def tiny_adapter(family: str):
    """One model per family per test session (building is cheap, but not free)."""
    from guardrail.models import load_model

    if family not in _ADAPTERS:
        _ADAPTERS[family] = load_model(f"tiny-random:{family}")
    return _ADAPTERS[family]


def tiny_artifacts(family: str, root: Path) -> Path:
    """A small, real calibration of the family's tiny model, written once per session."""
    from guardrail.calibration import CalibrationConfig, calibrate, packaged_prompts
    from guardrail.engine.transformers import TransformersBackend

    if family not in _ARTIFACTS:
        out = root / f"art-{family}"
        backend = TransformersBackend(tiny_adapter(family))
        cfg = CalibrationConfig(steps=3, steer_steps=16, folds=2, progress=False)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random models never open a refusal; that warning is expected
            calibrate(backend, packaged_prompts("harmful")[:8], packaged_prompts("benign")[:8], cfg, out=out)
        _ARTIFACTS[family] = out
    return _ARTIFACTS[family]


@pytest.fixture(scope="session")
def art_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture
def policies_dir(tmp_path) -> Path:
    """A writable copy of the shipped policies folder."""
    dst = tmp_path / "policies"
    shutil.copytree(REPO / "policies", dst)
    return dst


def red_image(size=(40, 30), color="red"):
    from PIL import Image

    return Image.new("RGB", size, color)


def png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----- steering plans and artifacts built the way the plugins build them --------------------------
def mechanics_blocks(prototypes=None, logits=None, directions=None, midpoints=None, layer: int = 0):
    """Artifact blocks from raw tensors (what the prototypes and mean_difference calibrators write)."""
    from guardrail.method.artifacts import Block

    blocks = {}
    if prototypes is not None:
        blocks["prototypes"] = Block(1, {"method": "test"}, {"states": prototypes, "logits": logits},
                                     {"states": (None, "hidden"), "logits": (None, "vocab")})
    if directions is not None:
        mids = midpoints if midpoints is not None else torch.zeros_like(directions)
        blocks["mean_difference"] = Block(1, {"layer": layer, "s_base": 0.0, "alpha": 1.0},
                                          {"directions": directions, "midpoints": mids},
                                          {"directions": ("layers", "hidden"), "midpoints": ("layers", "hidden")})
    return blocks


def artifacts_of(**tensors):
    from guardrail.method.artifacts import Artifacts

    return Artifacts.from_blocks({}, mechanics_blocks(**tensors))


def proto_plan(art, strength: float, tokens: int):
    """The plan `prototype_interpolation` makes at this strength (empty at 0)."""
    from guardrail.engine.interventions import NO_STEERING, LogitInterpolation, SteeringPlan
    from guardrail_plugins.steering.prototypes import PrototypeView

    if strength <= 0:
        return NO_STEERING
    view = PrototypeView.of(art.block("prototypes"))
    return SteeringPlan((LogitInterpolation(strength, tokens, view.logits, view.states),), strength, tokens,
                        "prototype_interpolation")


def direction_plan(art, strength: float, layers, coefficient: float = 1.0):
    """The plan `refusal_direction` makes: strength · coefficient · the mean_difference directions."""
    from guardrail.engine.interventions import AdditiveDirection, SteeringPlan

    vectors = art.block("mean_difference").tensor("directions")[list(layers)]
    return SteeringPlan((AdditiveDirection(tuple(layers), vectors, strength * coefficient),), strength, 3,
                        "refusal_direction")
