"""`TransformersBackend`: the `Backend` seam implemented on a local transformers model.

All generation is greedy (the method's risk pass and steering are defined for greedy decoding) and
goes through `model.generate`, so each family's own input preparation (multimodal rope positions,
caches) is used unchanged. Steering is added as an lm_head hook (prototype interpolation on an
affine head), a final-norm hook (prototype interpolation on a soft-capped head) or decoder-layer
hooks (additive steering); with no row steered, none of them is installed, and the interpolation
hooks remove themselves after the last steered step, so later decode steps run no guard code.

Inside a `prefix_scope()` (the pipeline opens one per batch) the caption, risk and answer passes of
a request reuse one KV cache of their common image prefix (see `guardrail.engine.prefix_cache`): the
vision encoder and the prefix run once per request, and the token ids stay those of the unshared
path. Outside a scope, and for families that cannot share soundly, every pass runs in full.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from guardrail.method.artifacts import Artifacts
from guardrail.engine.backend import RiskPass, TokenCallback
from guardrail.errors import ModelError
from guardrail.models.base import ModelAdapter
from guardrail.engine.prefix_cache import PrefixStore, SharedBatch, sharing_supported
from guardrail.engine.prefix_sharing import PrefixSharing
from guardrail.engine.request_span import own_token_counts, tail_mask
from guardrail.engine.hooks import (
    ForcedPrefixProcessor,
    additive_steering,
    capture_pooled,
    capture_states,
    logit_interpolation,
    state_interpolation,
)
from guardrail.engine.interventions import (
    AdditiveDirection,
    ForcedPrefix,
    LogitInterpolation,
    SteeringPlan,
    rows_with,
    unsupported,
)
from guardrail.types import ChatRow, Generation


class _RowStreamer(BaseStreamer):
    """Forwards each new token of each unfinished row to a callback (skips the prompt)."""

    def __init__(self, callback: TokenCallback, row_ids: Sequence[int], eos: set[int]):
        self.callback = callback
        self.row_ids = list(row_ids)
        self.eos = eos
        self.finished = [False] * len(self.row_ids)
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.finished[i]:
                continue
            if token in self.eos:
                self.finished[i] = True
                continue
            self.callback(self.row_ids[i], int(token))

    def end(self) -> None:
        pass


class TransformersBackend:
    """Runs caption, risk and answer passes on one transformers model, serialised by a lock."""

    def __init__(self, adapter: ModelAdapter, artifacts: Artifacts | None = None, batch_size: int = 16):
        self.adapter = adapter
        self.artifacts = artifacts
        self.batch_size = batch_size
        self.name = adapter.name
        self.supports_images = adapter.supports_images
        # What a steering plan may ask of this backend (guardrail.engine.interventions).
        self.interventions: frozenset[type] = frozenset({LogitInterpolation, AdditiveDirection, ForcedPrefix})
        cfg = adapter.text_config()
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        # Hooks live on shared modules, so two generations at once would see each other's hooks.
        self.lock = threading.RLock()
        # The transformers tokenizer wrapper switches the Rust tokenizer's padding on and off per
        # call, so an unpadded call (count_tokens, from a request thread) racing a padded batch
        # encode makes the batch fail to tensorize. Tokenizer calls take this short lock.
        self.tokenizer_lock = threading.Lock()
        # Image-prefix KV caches of the open pipeline batches (empty, and unused, outside them).
        self.sharing = PrefixSharing(adapter, self.tokenizer_lock, batch_size)

    def prefix_scope(self) -> contextlib.AbstractContextManager:
        """Keep image-prefix KV caches for reuse until the scope (a pipeline batch) closes."""
        return self.sharing.store.session()

    @property
    def prefixes(self) -> PrefixStore:
        """The store, with `hits`/`misses` counters for metrics."""
        return self.sharing.store

    @property
    def share_prefixes(self) -> bool:
        return self.sharing.supported

    @share_prefixes.setter
    def share_prefixes(self, value: bool) -> None:
        self.sharing.supported = bool(value) and sharing_supported(self.adapter)

    def _inputs(self, rows: Sequence[ChatRow], eligible: Sequence[bool] | None = None) -> tuple[dict[str, Any], SharedBatch | None]:
        """Generate inputs for a chunk: continuing from shared image prefixes where possible
        (`guardrail.engine.prefix_sharing`), else the plain encoded batch."""
        shared = self.sharing.fast(rows, eligible)
        if shared is None:
            batch = self.sharing.encode(rows)
            shared = self.sharing.full(rows, batch, eligible)
            if shared is None:
                return batch, None
        return shared.generate_kwargs(self.adapter.model.config), shared

    # ----- small helpers -------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        return self.adapter.fingerprint()

    def count_tokens(self, text: str) -> int:
        with self.tokenizer_lock:
            return len(self.adapter.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.adapter.decode(token_ids)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens), e.g. a refusal to teacher-force."""
        with self.tokenizer_lock:
            return list(self.adapter.tokenizer(text, add_special_tokens=False)["input_ids"])

    def eos_token_ids(self) -> list[int]:
        return list(self.adapter.eos_token_ids())

    def _config(self, max_new_tokens: int, **extra: Any) -> GenerationConfig:
        eos = self.adapter.eos_token_ids()
        return GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos or None,
            pad_token_id=self.adapter.tokenizer.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
            **extra,
        )

    def _chunks(self, rows: Sequence[ChatRow]) -> Iterator[list[int]]:
        """Row indices in batches; rows with and without images apart where a family can't mix."""
        groups: list[list[int]] = [list(range(len(rows)))]
        if not getattr(self.adapter, "mixed_image_batches", True):
            groups = [[i for i, r in enumerate(rows) if r.images], [i for i, r in enumerate(rows) if not r.images]]
        for group in groups:
            for start in range(0, len(group), self.batch_size):
                if group[start : start + self.batch_size]:
                    yield group[start : start + self.batch_size]

    def _trim(self, ids: list[int]) -> tuple[tuple[int, ...], str]:
        eos = set(self.adapter.eos_token_ids())
        for i, token in enumerate(ids):
            if token in eos:
                return tuple(ids[:i]), "stop"
        return tuple(ids), "length"

    # ----- the seam ------------------------------------------------------------------------------
    def caption(self, rows: Sequence[ChatRow], max_new_tokens: int) -> list[str]:
        gens = self.generate(rows, [SteeringPlan()] * len(rows), max_new_tokens)
        return [g.text.strip() for g in gens]

    @torch.inference_mode()
    def risk_pass(self, rows: Sequence[ChatRow], steps: int, layers: Sequence[int], pooled: Sequence[int] = (),
                  readouts: Sequence[Any] = ()) -> RiskPass:
        # A readout is computed from the step logits this pass records anyway.
        steps = max([int(steps)] + [int(r.steps) for r in readouts])
        n = len(rows)
        layer_list = sorted(set(int(l) for l in layers))
        pooled_list = sorted(set(int(l) for l in pooled))
        decoder = self.adapter.decoder_layers()
        for layer in layer_list + pooled_list:
            if not 0 <= layer < len(decoder):
                raise ModelError(f"layer {layer} out of range: {self.name} has {len(decoder)} decoder layers")
        logits = torch.zeros(n, steps, self.adapter.vocab_size) if steps else None
        tokens = torch.zeros(n, steps, dtype=torch.long) if steps else None
        states = {l: torch.zeros(n, self.adapter.hidden_size) for l in layer_list}
        means = {l: torch.zeros(n, self.adapter.hidden_size) for l in pooled_list}
        with self.lock:
            for idx in self._chunks(rows):
                chunk = [rows[i] for i in idx]
                inputs, shared = self._inputs(chunk)
                prompt_len = inputs["input_ids"].shape[1]
                counts = own_token_counts(self.adapter, chunk) if pooled_list else []
                if shared is not None and counts and max(counts) > prompt_len - shared.cached:
                    # The hooks see only the positions a forward computes; the request's own
                    # tokens follow the shared image prefix (its text differs from the caption
                    # prompt's from the first character), so this is a safeguard.
                    inputs, shared = self.sharing.encode(chunk), None
                mask = inputs["attention_mask"]
                own = tail_mask(mask, counts) if pooled_list else mask
                with contextlib.ExitStack() as stack:
                    cap = stack.enter_context(capture_states({l: decoder[l] for l in layer_list}, calls=1))
                    pool = stack.enter_context(capture_pooled({l: decoder[l] for l in pooled_list}, own))
                    if steps:
                        # min_new_tokens keeps all N steps even if EOS is the argmax; the recorded
                        # logits are the raw ones, taken before that processor.
                        out = self.adapter.model.generate(
                            **inputs,
                            generation_config=self._config(
                                steps, min_new_tokens=steps, output_logits=True, return_dict_in_generate=True
                            ),
                        )
                        logits[idx] = torch.stack([z.float().cpu() for z in out.logits], dim=1)
                        tokens[idx] = out.sequences[:, prompt_len:].cpu()
                    elif shared:  # one forward over the uncached tokens, on the cache just built
                        c = shared.cached
                        self.adapter.model(
                            input_ids=inputs["input_ids"][:, c:], attention_mask=inputs["attention_mask"],
                            position_ids=inputs["position_ids"][..., c:], cache=inputs["cache"], use_cache=True, logits_to_keep=1,
                        )
                    else:
                        self.adapter.model(**inputs, use_cache=False)
                for l in layer_list:
                    states[l][idx] = cap.states[l][0]
                for l in pooled_list:
                    means[l][idx] = pool.states[l]
        values = {r: r.from_logits(logits, self.artifacts) for r in readouts}
        return RiskPass(step_logits=logits, states=states, tokens=tokens, pooled=means, readouts=values)

    def _steering(self, plans: Sequence[SteeringPlan], prompt_len: int) -> tuple[list[Any], contextlib.ExitStack]:
        """Logits processors and hooks for a batch's plans; none at all when no row is steered."""
        processors: list[Any] = []
        stack = contextlib.ExitStack()
        for b, plan in enumerate(plans):
            missing = unsupported(plan, self.interventions)
            if missing:
                raise ModelError(f"row {b}: the transformers backend cannot apply {', '.join(missing)}")
        batch = len(plans)
        interp = rows_with(plans, LogitInterpolation)
        if interp.rows:
            if self.adapter.logits_are_affine:
                stack.enter_context(logit_interpolation(self.adapter.lm_head(), batch, interp))
            else:
                if any(iv.states is None for iv in interp.items):
                    raise ModelError(f"{self.name} has a non-affine head: LogitInterpolation needs target states")
                stack.enter_context(state_interpolation(self.adapter.final_norm(), batch, interp))
        additive = rows_with(plans, AdditiveDirection)
        if additive.rows:
            stack.enter_context(additive_steering(self.adapter.decoder_layers(), batch, additive))
        forced = rows_with(plans, ForcedPrefix)
        if forced.rows:
            processors.append(ForcedPrefixProcessor(prompt_len, forced))
        return processors, stack

    @torch.inference_mode()
    def generate(
        self,
        rows: Sequence[ChatRow],
        plans: Sequence[SteeringPlan],
        max_new_tokens: int,
        on_tokens: TokenCallback | None = None,
    ) -> list[Generation]:
        if len(rows) != len(plans):
            raise ValueError("one steering plan per row")
        results: list[Generation | None] = [None] * len(rows)
        with self.lock:
            for idx in self._chunks(rows):
                chunk_plans = [plans[i] for i in idx]
                # An intervention that changes the prompt's KV (additive steering) cannot continue
                # from a shared prefix: such rows run unshared.
                eligible = [not p.touches_prompt for p in chunk_plans]
                inputs, _ = self._inputs([rows[i] for i in idx], eligible)  # before any hook is installed
                prompt_len = inputs["input_ids"].shape[1]
                processors, hooks = self._steering(chunk_plans, prompt_len)
                streamer = _RowStreamer(on_tokens, idx, set(self.adapter.eos_token_ids())) if on_tokens else None
                with hooks:
                    out = self.adapter.model.generate(
                        **inputs,
                        generation_config=self._config(max_new_tokens),
                        logits_processor=LogitsProcessorList(processors),
                        streamer=streamer,
                    )
                for j, i in enumerate(idx):
                    ids, reason = self._trim(out[j, prompt_len:].tolist())
                    results[i] = Generation(text=self.adapter.decode(ids), token_ids=ids, finish_reason=reason)
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def response_states(
        self, rows: Sequence[ChatRow], steps: int, max_new_tokens: int, forced_ids: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[Generation]]:
        """Final post-norm states [B, steps, d] at response steps 1..steps of greedy (or
        teacher-forced) answers, with the answers themselves. Used by calibration."""
        out_states = torch.zeros(len(rows), steps, self.adapter.hidden_size)
        gens: list[Generation | None] = [None] * len(rows)
        with self.lock:
            for idx in self._chunks(rows):
                batch = self.sharing.encode([rows[i] for i in idx])
                prompt_len = batch["input_ids"].shape[1]
                plans = [SteeringPlan((ForcedPrefix(tuple(forced_ids)),))] * len(idx) if forced_ids else []
                procs, _ = self._steering(plans, prompt_len) if plans else ([], None)
                with capture_states({"final": self.adapter.final_norm()}, calls=steps) as cap:
                    out = self.adapter.model.generate(
                        **batch,
                        generation_config=self._config(max(max_new_tokens, steps), min_new_tokens=steps),
                        logits_processor=LogitsProcessorList(procs),
                    )
                out_states[idx] = torch.stack(cap.states["final"], dim=1)
                for j, i in enumerate(idx):
                    ids, reason = self._trim(out[j, prompt_len:].tolist())
                    gens[i] = Generation(text=self.adapter.decode(ids), token_ids=ids, finish_reason=reason)
        return out_states, [g for g in gens if g is not None]

    @torch.inference_mode()
    def head_logits(self, states: torch.Tensor) -> torch.Tensor:
        """lm_head applied to final post-norm states (float32), e.g. prototype logits P = W_U μ."""
        head = self.adapter.lm_head()
        weight = head.weight
        logits = head(states.to(device=weight.device, dtype=weight.dtype)).float().cpu()
        cap = getattr(self.adapter.text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
