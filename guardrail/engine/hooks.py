"""Steering mechanics: logit interpolation, hidden-state interpolation and additive hooks.

Everything here acts per row of a batch and leaves rows with strength 0 bit-for-bit untouched (they
are never even indexed). Hooks are installed by context managers that remove them on exit, also when
generation raises; the interpolation hooks also remove themselves after the last steered step, so
the rest of a generation costs nothing per token.

Response step n (1-based) is predicted by the n-th forward pass of a generation: the prefill's last
position for n = 1, then one decode step each. We count forward passes, which holds for HF
`generate` (one forward per new token).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import LogitsProcessor

from guardrail.types import SteeringPlan


def interpolate(z: torch.Tensor, target: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(1 − s)·z + s·target, per row. At s = 1 this is exactly `target`."""
    return (1.0 - s) * z + s * target


@contextlib.contextmanager
def logit_interpolation(head: nn.Module, strengths: Sequence[float], tokens: Sequence[int], proto_logits: torch.Tensor) -> Iterator[None]:
    """(1 − s)·z + s·P_n on the lm_head output at response steps 1..k, per row; rows with s = 0 are
    never indexed. Exact equivalent of moving the final post-norm state to
    (1 − s)·h + s·μ_n whenever the head is affine (affine maps keep convex combinations). The
    hook removes itself after the last steered step, so the remaining decode steps run no guard
    code at all (a logits processor is called, and its signature inspected by transformers, on
    every step of the generation)."""
    s_all = torch.tensor(list(strengths), dtype=torch.float32)
    k_all = torch.tensor(list(tokens), dtype=torch.long)
    last = int(k_all[s_all > 0].max().item()) if (s_all > 0).any() else 0
    calls = [0]
    handle = None

    def hook(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        step = calls[0]
        calls[0] += 1
        if step + 1 >= last and handle is not None:
            handle.remove()  # nothing is steered after this forward
        rows = ((s_all > 0) & (k_all > step)).nonzero().squeeze(1)
        if rows.numel() == 0:
            return output
        rows = rows.to(output.device)
        s = s_all.to(output.device)[rows].unsqueeze(1)
        target = proto_logits[step].to(device=output.device, dtype=torch.float32).unsqueeze(0)
        z = output.clone()
        z[rows, -1, :] = interpolate(z[rows, -1, :].float(), target, s).to(z.dtype)
        return z

    if last > 0:
        handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _output_tensor(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # 4.x layers return tuples


def _replace_output(output: object, tensor: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (tensor,) + tuple(output[1:])
    return tensor


@contextlib.contextmanager
def hidden_interpolation(norm: nn.Module, strengths: Sequence[float], tokens: Sequence[int], prototypes: torch.Tensor) -> Iterator[None]:
    """Move the final post-norm state at the last position to (1 − s)·h + s·μ_n for steps 1..k.

    For models whose logits are not affine in h (soft-capped heads), where logit interpolation
    would not be exact."""
    s_all = torch.tensor(list(strengths), dtype=torch.float32)
    k_all = torch.tensor(list(tokens), dtype=torch.long)
    last = int(k_all[s_all > 0].max().item()) if (s_all > 0).any() else 0
    calls = [0]
    handle = None

    def hook(module: nn.Module, args: object, output: object) -> object:
        step = calls[0]
        calls[0] += 1
        if step + 1 >= last and handle is not None:
            handle.remove()  # removes itself after the last steered step, like logit_interpolation
        rows = ((s_all > 0) & (k_all > step)).nonzero().squeeze(1)
        if rows.numel() == 0:
            return output
        h = _output_tensor(output).clone()
        rows = rows.to(h.device)
        s = s_all.to(h.device)[rows].view(-1, 1).to(h.dtype)
        target = prototypes[step].to(device=h.device, dtype=h.dtype).unsqueeze(0)
        h[rows, -1, :] = interpolate(h[rows, -1, :], target, s)
        return _replace_output(output, h)

    handle = norm.register_forward_hook(hook) if last > 0 else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def additive_steering(
    layers: nn.ModuleList, directions: dict[int, torch.Tensor], coefficients: dict[int, Sequence[float]]
) -> Iterator[None]:
    """Add coefficient[l][b] · v_l to the output of decoder layer l, at every position of row b.

    `directions` maps a layer index to a [d] vector; `coefficients` maps it to one number per row.
    Rows whose coefficient is 0 are not touched; layers with no non-zero coefficient get no hook."""
    handles = []

    def make_hook(vector: torch.Tensor, coeff: torch.Tensor, rows: torch.Tensor):
        def hook(module: nn.Module, args: object, output: object) -> object:
            h = _output_tensor(output)
            r = rows.to(h.device)
            delta = coeff.to(h.device)[r].view(-1, 1, 1).to(h.dtype) * vector.to(device=h.device, dtype=h.dtype)
            h = h.clone()
            h[r] = h[r] + delta
            return _replace_output(output, h)

        return hook

    try:
        for index, per_row in coefficients.items():
            coeff = torch.tensor(list(per_row), dtype=torch.float32)
            rows = (coeff != 0).nonzero().squeeze(1)
            if rows.numel():
                handles.append(layers[index].register_forward_hook(make_hook(directions[index], coeff, rows)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class StateCapture:
    """Records, for chosen modules, the output at the last position of the first `calls` forwards."""

    def __init__(self, calls: int = 1):
        self.calls = calls
        self.states: dict[object, list[torch.Tensor]] = {}

    def hook_for(self, key: object):
        seen = self.states.setdefault(key, [])

        def hook(module: nn.Module, args: object, output: object) -> None:
            if len(seen) < self.calls:
                seen.append(_output_tensor(output)[:, -1, :].detach().float().cpu())

        return hook


@contextlib.contextmanager
def capture_states(modules: dict[object, nn.Module], calls: int = 1) -> Iterator[StateCapture]:
    """Capture last-position outputs of `modules` (key -> module) during the first `calls` forwards."""
    capture = StateCapture(calls)
    handles = [module.register_forward_hook(capture.hook_for(key)) for key, module in modules.items()]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def interpolation_rows(plans: Sequence[SteeringPlan]) -> tuple[list[float], list[int]]:
    """Per-row (strength, steered tokens) for prototype interpolation; zeros for other rows."""
    strengths, tokens = [], []
    for plan in plans:
        on = plan.active and plan.mode == "prototype_interpolation"
        strengths.append(plan.strength if on else 0.0)
        tokens.append(plan.tokens if on else 0)
    return strengths, tokens


def additive_rows(plans: Sequence[SteeringPlan]) -> dict[int, list[float]]:
    """Per-layer, per-row coefficients for additive steering: strength × the plan's coefficient on
    the layers the plan names, 0 elsewhere."""
    out: dict[int, list[float]] = {}
    for b, plan in enumerate(plans):
        if not (plan.active and plan.mode == "refusal_direction"):
            continue
        for layer in plan.params.get("layers", ()):
            out.setdefault(int(layer), [0.0] * len(plans))[b] = plan.strength * float(plan.params.get("coefficient", 1.0))
    return out


class ForcedTokensProcessor(LogitsProcessor):
    """Forces the given token ids as the first response tokens (teacher forcing inside generate)."""

    def __init__(self, prompt_len: int, forced: Sequence[int]):
        self.prompt_len = prompt_len
        self.forced = list(forced)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        if step >= len(self.forced):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.forced[step]] = 0.0
        return forced
