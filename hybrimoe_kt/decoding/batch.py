"""Decode steps over several requests at once: one forward with one new token per running request.

Each request is prefilled alone into its own ``DynamicCache`` (``prefill``). ``DecodeBatch`` holds the
running requests' caches as one cache, left-padded to a common length, with a 2-D attention mask that
hides the padding and explicit position ids (each row's own length), so each row attends to exactly its
own keys at its own positions. A request joins between steps (its cache is padded and concatenated:
a copy of the batch's cache, paid once per join) and leaves between steps (its row is dropped and the
columns nobody needs any more are trimmed).

The MoE layers then see one row per request in a decode step, which is where the token-aware CPU/GPU
split applies. A row's numbers can differ in the last bits from the same request decoded alone: the CPU
expert kernel and the GPU tier round a row differently depending on how many rows share an expert.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch


def cache_argument(model: Any) -> str:
    """The forward keyword for the KV cache: ``cache`` in some transformers releases, ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def model_device(model: Any) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device


def new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def prefill(model: Any, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, Any]:
    """Run the prompt through ``model`` into a new cache: (the last position's logits [V], the cache)."""
    cache = new_cache(model)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model_device(model))  # [1, T]
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    return out.logits[0, -1], cache


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError("batched decoding needs a transformers cache with per-layer key/value tensors")
    for layer in layers:
        if type(layer).__name__ != "DynamicLayer":
            raise TypeError(f"batched decoding supports full-attention cache layers only, got {type(layer).__name__}")
    return list(layers)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` [B, H, T, D] with ``n`` zero positions in front."""
    return t if n == 0 else torch.nn.functional.pad(t, (0, 0, n, 0))


class DecodeBatch:
    """The running requests' KV caches as one; rows are in join order."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = model_device(model)
        self.key = cache_argument(model)
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)   # [B, L]: 1 = a real key
        self.lengths: list[int] = []                                          # real keys per row

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Key positions held per row (the longest row's length, padding included)."""
        return int(self.mask.shape[1])

    def add(self, cache: Any, length: int) -> None:
        """Append a request whose own cache holds ``length`` positions (from ``prefill``)."""
        new_layers = _layers(cache)
        width = max(self.width, length)
        row_mask = torch.zeros(1, width, dtype=torch.long, device=self.device)
        row_mask[0, width - length:] = 1
        if self.cache is None:
            merged = new_cache(self.model)
            for i, layer in enumerate(new_layers):
                merged.update(_pad_left(layer.keys, width - length), _pad_left(layer.values, width - length), i)
            self.cache, self.mask = merged, row_mask
        else:
            grow = width - self.width
            merged = new_cache(self.model)
            for i, (old, new) in enumerate(zip(_layers(self.cache), new_layers)):
                keys = torch.cat([_pad_left(old.keys, grow), _pad_left(new.keys, width - length)])
                values = torch.cat([_pad_left(old.values, grow), _pad_left(new.values, width - length)])
                merged.update(keys, values, i)
            self.cache = merged
            self.mask = torch.cat([torch.nn.functional.pad(self.mask, (grow, 0)), row_mask])
        self.lengths.append(int(length))

    def remove(self, rows: Sequence[int]) -> None:
        """Drop the given rows (indices into the current order)."""
        gone = set(rows)
        if not gone:
            return
        keep = [r for r in range(len(self.lengths)) if r not in gone]
        if not keep:
            self.cache, self.lengths = None, []
            self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        # rows are right-aligned: the columns before the longest kept row's keys are padding in every row
        start = self.width - max(self.lengths[r] for r in keep)
        trimmed = new_cache(self.model)
        for i, layer in enumerate(_layers(self.cache)):
            trimmed.update(layer.keys.index_select(0, index)[:, :, start:],
                           layer.values.index_select(0, index)[:, :, start:], i)
        self.cache, self.mask = trimmed, mask[:, start:]
        self.lengths = [self.lengths[r] for r in keep]

    @torch.no_grad()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """One forward: ``tokens[i]`` is row i's next input. Returns the logits [B, V]."""
        if len(tokens) != len(self.lengths) or not self.lengths:
            raise ValueError(f"{len(tokens)} tokens for a batch of {len(self.lengths)} rows")
        b = len(self.lengths)
        padded = min(self.lengths) < self.width
        self.mask = torch.cat([self.mask, torch.ones(b, 1, dtype=torch.long, device=self.device)], dim=1)
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device).view(b, 1)
        pos = torch.tensor(self.lengths, dtype=torch.long, device=self.device).view(b, 1)
        # rows of one length need no mask (the model's causal default: the same numbers, less work)
        out = self.model(input_ids=ids, attention_mask=self.mask if padded else None, position_ids=pos,
                         use_cache=True, logits_to_keep=1, **{self.key: self.cache})
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]
