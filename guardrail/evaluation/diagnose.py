"""The paper's diagnostic: per-layer Fisher discriminant ratio between safe and unsafe requests,
read at the last prompt token, for the prompt as the model sees it without reformulation and for
the reformulated risk prompt (safety prompt + visual context + question).

With typographic images (the request only in the pixels) the text a text-only model sees is the
same for safe and unsafe rows, so without reformulation the ratio is ~0 at every layer; the visual
context brings the request back into the prompt, and the ratio shows whether the model's own
states then tell safe from unsafe at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from guardrail.prompt_files import PromptItem
from guardrail.method.risk_math import fisher_ratio


@dataclass
class Diagnosis:
    without: list[float]  # FDR per layer, prompt as the model sees it
    with_reformulation: list[float]  # FDR per layer, reformulated risk prompt

    def best(self) -> dict[str, tuple[int, float]]:
        out = {}
        for label, values in (("without", self.without), ("with", self.with_reformulation)):
            layer = max(range(len(values)), key=lambda i: values[i])
            out[label] = (layer, values[layer])
        return out


def reformulate(guard_env: Any, policy: Any, items: Sequence[PromptItem]) -> list[Any]:
    """The policy's reformulator applied to prompt items (images decoded as the guard would)."""
    from guardrail.images import decode_image
    from guardrail.types import Request, RequestContext

    policy = policy.with_default_stages(guard_env.plugins.default_stage)
    reformulator = guard_env.plugins.create("reformulators", policy.reformulator.use, policy.reformulator.params)
    contexts = []
    for item in items:
        images = (item.image.read_bytes(),) if item.image is not None else ()
        ctx = RequestContext(request=Request(text=item.prompt, images=images), tenant="diagnose", policy=policy)
        ctx.images = [decode_image(src, policy.limits.max_image_pixels, policy.limits.max_image_bytes, i)
                      for i, src in enumerate(images)]
        contexts.append(ctx)
    return reformulator.reformulate(contexts, guard_env)


def plain_rows(engine: Any, items: Sequence[PromptItem]) -> list[Any]:
    """The request as the model itself takes it: text, plus the image only if it can see pixels."""
    from guardrail.images import decode_image
    from guardrail.types import ChatRow

    rows = []
    for item in items:
        images = ()
        if item.image is not None and engine.supports_images:
            images = (decode_image(item.image, 10**9, 10**9).image,)
        rows.append(ChatRow(item.prompt, images))
    return rows


def diagnose(engine: Any, policy: Any, safe: Sequence[PromptItem], unsafe: Sequence[PromptItem],
             plugins: Any = None, progress: bool = True) -> Diagnosis:
    from tqdm.auto import tqdm

    from guardrail.pipeline.caption_cache import CaptionCache
    from guardrail.plugin.manager import PluginManager
    from guardrail.plugin.protocols import StageEnv

    env = StageEnv(engine=engine, captions=CaptionCache(4096), plugins=(plugins or PluginManager()).load())
    layers = list(range(engine.adapter.num_layers))
    items = list(safe) + list(unsafe)
    n_safe = len(safe)
    results = {}
    with tqdm(total=2, desc="diagnose", disable=not progress, leave=False) as bar:
        for label, rows in (("without", plain_rows(engine, items)),
                            ("with", [r.risk_prompt for r in reformulate(env, policy, items)])):
            states = engine.risk_pass(rows, 0, layers).states
            results[label] = [fisher_ratio(states[l][:n_safe], states[l][n_safe:]) for l in layers]
            bar.update(1)
    return Diagnosis(without=results["without"], with_reformulation=results["with"])
