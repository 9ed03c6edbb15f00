"""How the transformers backend applies typed interventions: removable hooks and a logits processor.

Each context manager applies one kind of intervention (`guardrail.engine.interventions`) to the
rows that carry it and leaves every other row bit-for-bit untouched (those rows are never even
indexed). Hooks are removed on exit, also when generation raises; the interpolation hooks also
remove themselves after the last steered step, so the rest of a generation costs nothing per token.

Response step n (1-based) is predicted by the n-th forward pass of a generation: the prefill's last
position for n = 1, then one decode step each. We count forward passes, which holds for HF
`generate` (one forward per new token).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from transformers import LogitsProcessor

from guardrail.engine.interventions import ForcedPrefix, RowGroups, add_direction, force_token, interpolate


def _output_tensor(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # 4.x layers return tuples


def _replace_output(output: object, tensor: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (tensor,) + tuple(output[1:])
    return tensor


def _stacked_targets(targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct target tensors stacked to [G, K, ·] (shorter ones padded with their last step,
    which is never read) and each row's group index: rows usually share one tensor, so G is 1."""
    index: dict[int, int] = {}
    distinct: list[torch.Tensor] = []
    group = []
    for t in targets:
        if id(t) not in index:
            index[id(t)] = len(distinct)
            distinct.append(t)
        group.append(index[id(t)])
    k = max(t.shape[0] for t in distinct)
    padded = [torch.cat([t, t[-1:].expand(k - t.shape[0], -1)]) if t.shape[0] < k else t for t in distinct]
    return torch.stack([p.float() for p in padded]), torch.tensor(group, dtype=torch.long)


@contextlib.contextmanager
def _last_position_interpolation(module: nn.Module, batch: int, groups: RowGroups, targets: list[torch.Tensor]) -> Iterator[None]:
    """(1 − s)·x + s·target_n at the last position of `module`'s output at steps 1..k, per row."""
    s_all = torch.zeros(batch)
    k_all = torch.zeros(batch, dtype=torch.long)
    for row, iv in zip(groups.rows, groups.items):
        s_all[row], k_all[row] = iv.strength, iv.tokens
    stacked, group_of = _stacked_targets(targets)
    row_group = torch.zeros(batch, dtype=torch.long)
    row_group[torch.tensor(groups.rows, dtype=torch.long)] = group_of
    last = int(k_all.max().item()) if groups.rows else 0
    calls = [0]
    handle = None

    def hook(mod: nn.Module, args: object, output: object) -> object:
        step = calls[0]
        calls[0] += 1
        if step + 1 >= last and handle is not None:
            handle.remove()  # nothing is steered after this forward
        rows = ((s_all > 0) & (k_all > step)).nonzero().squeeze(1)
        if rows.numel() == 0:
            return output
        x = _output_tensor(output).clone()
        dev = x.device
        s = s_all[rows].to(dev).unsqueeze(1)
        target = stacked[row_group[rows], step].to(dev)
        r = rows.to(dev)
        x[r, -1, :] = interpolate(x[r, -1, :].float(), target, s).to(x.dtype)
        return _replace_output(output, x)

    if last > 0:
        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def logit_interpolation(head: nn.Module, batch: int, groups: RowGroups) -> contextlib.AbstractContextManager:
    """LogitInterpolation on the lm_head output (exact RAS on an affine head)."""
    return _last_position_interpolation(head, batch, groups, [iv.targets for iv in groups.items])


def state_interpolation(norm: nn.Module, batch: int, groups: RowGroups) -> contextlib.AbstractContextManager:
    """LogitInterpolation in its state form, on the final norm's output: for heads that are not
    affine (soft-capped), where interpolating logits would not be the same edit."""
    return _last_position_interpolation(norm, batch, groups, [iv.states for iv in groups.items])


@contextlib.contextmanager
def additive_steering(layers: nn.ModuleList, batch: int, groups: RowGroups) -> Iterator[None]:
    """AdditiveDirection: h + c·v on each named layer's output, at every position of its rows.
    Layers no row names get no hook."""
    per_layer: dict[int, list[tuple[int, torch.Tensor, float]]] = {}
    for row, iv in zip(groups.rows, groups.items):
        for i, layer in enumerate(iv.layers):
            per_layer.setdefault(layer, []).append((row, iv.vectors[i], iv.coefficient))
    handles = []

    def make_hook(rows: torch.Tensor, vectors: torch.Tensor, coeff: torch.Tensor):
        def hook(module: nn.Module, args: object, output: object) -> object:
            h = _output_tensor(output).clone()
            r = rows.to(h.device)
            v = vectors.to(device=h.device, dtype=h.dtype).unsqueeze(1)  # [r, 1, d]
            c = coeff.to(device=h.device, dtype=h.dtype).view(-1, 1, 1)
            h[r] = add_direction(h[r], v, c)
            return _replace_output(output, h)

        return hook

    try:
        for layer, entries in per_layer.items():
            if not 0 <= layer < len(layers):
                raise ValueError(f"AdditiveDirection names layer {layer}; the model has {len(layers)} decoder layers")
            kept = [(r, v, c) for r, v, c in entries if c != 0.0]
            if kept:
                rows = torch.tensor([r for r, _, _ in kept], dtype=torch.long)
                vectors = torch.stack([v.float() for _, v, _ in kept])
                coeff = torch.tensor([c for _, _, c in kept], dtype=torch.float32)
                handles.append(layers[layer].register_forward_hook(make_hook(rows, vectors, coeff)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class ForcedPrefixProcessor(LogitsProcessor):
    """ForcedPrefix: the rows that carry one get exactly its ids as their first response tokens;
    other rows' scores are returned as they came."""

    def __init__(self, prompt_len: int, groups: RowGroups):
        self.prompt_len = prompt_len
        self.forced: dict[int, tuple[int, ...]] = {r: iv.ids for r, iv in zip(groups.rows, groups.items) if isinstance(iv, ForcedPrefix)}
        self.last = max((len(ids) for ids in self.forced.values()), default=0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        if step >= self.last:
            return scores
        out = scores.clone()
        for row, ids in self.forced.items():
            if step < len(ids):
                out[row] = force_token(scores[row], ids[step])
        return out


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


class PooledCapture:
    """Records, for chosen modules, the output of the first forward averaged over the positions
    a mask keeps ([B, T], 1 = averaged: e.g. the request's own tokens, never padding)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.detach()
        self.states: dict[object, torch.Tensor] = {}

    def hook_for(self, key: object):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if key in self.states:
                return  # decode steps see one new position each; the prompt was the prefill
            x = _output_tensor(output).detach().float()
            mask = self.mask.to(x.device, torch.float32)[:, -x.shape[1]:].unsqueeze(-1)
            self.states[key] = ((x * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu()

        return hook


@contextlib.contextmanager
def _hooked(modules: dict[object, nn.Module], capture: Any) -> Iterator[Any]:
    """`capture.hook_for(key)` on each module for the duration of the block, removed on exit."""
    handles = [module.register_forward_hook(capture.hook_for(key)) for key, module in modules.items()]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def capture_pooled(modules: dict[object, nn.Module], mask: torch.Tensor) -> contextlib.AbstractContextManager[PooledCapture]:
    """Capture `modules`' prefill outputs mean-pooled over the prompt tokens `mask` keeps."""
    return _hooked(modules, PooledCapture(mask))


def capture_states(modules: dict[object, nn.Module], calls: int = 1) -> contextlib.AbstractContextManager[StateCapture]:
    """Capture last-position outputs of `modules` (key -> module) during the first `calls` forwards."""
    return _hooked(modules, StateCapture(calls))
