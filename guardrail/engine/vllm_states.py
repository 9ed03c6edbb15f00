"""The host side of the vLLM states pass: decoder-layer states from a pooling `vllm serve`.

A vLLM engine either generates or pools, so the layer states a hidden-state assessor reads
(`pooled_probe`'s averages over the request's own tokens, `linear_probe`'s last-token states) come from a second server
on the same checkpoint, started as a pooling model with guardrail's states architecture
(`guardrail/engine/vllm_states_model.py`, which the server imports as `guardrail_vllm_states`).
It answers `/v1/embeddings` for token ids with one vector per prompt:
`[k, l_1 … l_k, mean_1 … mean_k, last_1 … last_k]` (every token's average, then the last token,
for each served layer). This client sends the prompts (the same token ids as the generating
server gets), checks the layout and hands back what the risk pass asked for. The average over the
request's own tokens (what `pooled` means, guardrail/engine/request_span.py) is the prompt's less
its fixed prefix's, whose average the client asks for once per distinct prefix (`fetch`).

Wire cost: 2·k·d float32 per prompt, base64-encoded (SmolLM2, 7 layers: 32 KB); nothing
vocabulary-sized and no per-token states cross the wire.
"""

from __future__ import annotations

import base64
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import torch

from guardrail.errors import ModelError

STATES_ARCH_PREFIX = "GuardrailStates"  # guardrail_vllm_states.ARCH_PREFIX
STATES_CONFIG_KEY = "guardrail_layers"  # guardrail_vllm_states.CONFIG_KEY
PREFIX_MEANS_KEPT = 64  # distinct prompt prefixes whose average a client keeps (one per template and safety prompt)


def states_server_args(architecture: str, layers: Sequence[int]) -> list[str]:
    """`vllm serve` flags that make a checkpoint of `architecture` the states server for `layers`."""
    import json

    overrides = {"architectures": [STATES_ARCH_PREFIX + architecture], STATES_CONFIG_KEY: sorted(int(l) for l in layers)}
    return ["--runner", "pooling", "--hf-overrides", json.dumps(overrides),
            # each prompt must reach the pooler whole (guardrail_vllm_states.StatesPooler)
            "--no-enable-chunked-prefill", "--no-enable-prefix-caching"]


def decode_states(vector: torch.Tensor, hidden: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(served layers, pooled [k, d], last [k, d]) from one states vector; a vector of another
    shape is a ModelError (not guardrail's states model, or a checkpoint of another width)."""
    if vector.numel() < 1:
        raise ModelError("the vLLM states server returned an empty vector")
    k = int(vector[0].item())
    if k < 1 or vector.numel() != 1 + k + 2 * k * hidden:
        raise ModelError(f"the vLLM states server returned a vector of {vector.numel()} numbers, not guardrail's "
                         f"layer states for hidden size {hidden} (is it serving {STATES_ARCH_PREFIX}<Arch>?)")
    layers = [int(x) for x in vector[1:1 + k].tolist()]
    body = vector[1 + k:].view(2, k, hidden)
    return layers, body[0], body[1]


class StatesClient:
    """Layer states for prompts (token ids) from a vLLM states server at `url`."""

    def __init__(self, url: str, hidden: int, *, concurrency: int = 16, request_timeout_s: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        self.hidden = int(hidden)
        self.client = httpx.Client(base_url=self.url, timeout=request_timeout_s,
                                   limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="guardrail-vllm-states")
        # whole passes wait on requests in `pool`, never the other way round: no pool starves itself
        self.passes = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="guardrail-vllm-states-pass")
        self.prefix_means: dict[tuple[int, ...], tuple[list[int], torch.Tensor]] = {}
        self.prefix_lock = threading.Lock()
        try:
            self.model_name = str(self.client.get("/v1/models").json()["data"][0]["id"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            self.close()
            raise ModelError(f"no vLLM states server answers at {self.url}: {exc}") from exc

    def close(self) -> None:
        self.passes.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def _one(self, prompt: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        body = {"model": self.model_name, "input": [prompt], "encoding_format": "base64",
                "embed_dtype": "float32", "endianness": "little"}
        response = self.client.post("/v1/embeddings", json=body)
        if response.status_code != 200:
            raise ModelError(f"the vLLM states server answered {response.status_code}: {response.text[:500]}")
        raw = base64.b64decode(response.json()["data"][0]["embedding"])
        vector = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        if sys.byteorder != "little":
            vector = vector.view(torch.int32).byteswap().view(torch.float32)  # pragma: no cover
        return decode_states(vector, self.hidden)

    def _prefix_mean(self, prefix: tuple[int, ...]) -> tuple[list[int], torch.Tensor]:
        """(served layers, [k, d] average) over a prompt prefix alone, asked once per distinct prefix."""
        with self.prefix_lock:
            hit = self.prefix_means.get(prefix)
        if hit is not None:
            return hit
        served, avg, _ = self._one(list(prefix))
        with self.prefix_lock:
            if len(self.prefix_means) >= PREFIX_MEANS_KEPT:
                self.prefix_means.pop(next(iter(self.prefix_means)))
            self.prefix_means[prefix] = (served, avg)
        return served, avg

    def submit(self, prompts: Sequence[list[int]], layers: Sequence[int], pooled: Sequence[int],
               own_counts: Sequence[int] = ()) -> Future:
        """`fetch` in the background (the risk pass's greedy steps run meanwhile on the other engine)."""
        return self.passes.submit(self.fetch, prompts, layers, pooled, own_counts)

    def fetch(self, prompts: Sequence[list[int]], layers: Sequence[int], pooled: Sequence[int],
              own_counts: Sequence[int] = ()) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """({layer: [B, d] last-token state}, {layer: [B, d] average over the request's own tokens})
        for `prompts`, whose last `own_counts[i]` tokens are row i's own (all of them when not given).

        The server averages every token. A causal model gives a prompt's first T − n tokens the
        states they have in that prefix alone, so the own tokens' average is the prompt's sum less
        the prefix's: (T·mean − (T − n)·prefix mean) / n, the prefix's mean asked for once per
        distinct prefix (in the risk prompts, the template and the safety prompt)."""
        n_rows = len(prompts)
        counts = [len(p) for p in prompts] if not own_counts else [int(c) for c in own_counts]
        if len(counts) != n_rows or any(not 1 <= c <= len(p) for c, p in zip(counts, prompts)):
            raise ModelError(f"own-token counts {list(counts)[:8]} do not fit prompts of {[len(p) for p in prompts][:8]} tokens")
        parts = list(self.pool.map(self._one, prompts))
        prefixes = sorted({tuple(p[:len(p) - c]) for p, c in zip(prompts, counts) if c < len(p)}) if pooled else []
        prefix_means = dict(zip(prefixes, self.pool.map(self._prefix_mean, prefixes)))
        states = {int(l): torch.zeros(n_rows, self.hidden) for l in layers}
        means = {int(l): torch.zeros(n_rows, self.hidden) for l in pooled}
        for row, (served, avg, last) in enumerate(parts):
            index = {l: i for i, l in enumerate(served)}
            missing = sorted({l for l in list(states) + list(means) if l not in index})
            if missing:
                raise ModelError(f"the vLLM states server serves layers {served}, not {missing}: start it with "
                                 f"{STATES_CONFIG_KEY} covering every layer the artifact's assessors read")
            for l in states:
                states[l][row] = last[index[l]]
            if not means:
                continue
            total, own = len(prompts[row]), counts[row]
            if own < total:
                p_served, p_avg = prefix_means[tuple(prompts[row][:total - own])]
                p_index = {l: i for i, l in enumerate(p_served)}
            for l in means:
                whole = avg[index[l]].double() * total
                if own < total:
                    whole -= p_avg[p_index[l]].double() * (total - own)
                means[l][row] = (whole / own).float()
        return states, means


def artifact_layers(artifacts: Any) -> list[int]:
    """Every decoder layer an artifact's blocks record under `layers` or `layer` (the layers their
    hidden-state assessors read), sorted; empty when no block reads layer states."""
    found: set[int] = set()
    if artifacts is None:
        return []
    for name in artifacts.blocks():
        meta = artifacts.block(name).meta
        for value in (meta.get("layers"), [meta.get("layer")]):
            if isinstance(value, (list, tuple)):
                found.update(int(l) for l in value if isinstance(l, int) and not isinstance(l, bool))
    return sorted(found)
