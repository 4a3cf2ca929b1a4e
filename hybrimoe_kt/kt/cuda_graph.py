"""Decode steps captured in a CUDA graph and replayed (one graph for batch size 1).

``GraphedDecoder(hm, max_cache_len)`` gives the model a transformers ``StaticCache`` (fixed addresses),
runs the prompt eagerly (``prefill``), and runs each decode step (``decode``) as one function on static
buffers: the token id and cache position are written in place, the model runs with the runtime's
graph-safe decode layers (``HybridMoE.graph_step``: no host sync; the CPU experts go through kt-kernel's
stream submit), and the logits come out in a static tensor. On CUDA that function is captured once,
after warm-up runs on a side stream, and replayed; the runtime's upkeep runs before every step
(``begin_forward``), outside the graph, and writes only buffers the graph reads (the device slot table
and the CPU masks). On the CPU stand-in the same function runs without capture (``capture=False``), so
its structure and numerics are tested in CI.

If the capture itself fails (a model whose forward syncs with the host), the decoder says why once and
runs the same function eagerly.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch

from hybrimoe_kt.decoding.batch import cache_argument

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager runs on a side stream before the capture (allocator and kernel warm-up)


def graph_support(hm: Any) -> Optional[str]:
    """Why decode steps of ``hm`` cannot be captured on this machine (None: they can)."""
    device = next(hm.model.parameters()).device
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the model runs on {device}, not on a CUDA device"
    return None if hm.runtime is None else hm.runtime.graph_unsupported()


class GraphedDecoder:
    def __init__(self, hm: Any, max_cache_len: int, capture: Optional[bool] = None) -> None:
        from transformers import StaticCache

        self.hm, self.model, self.runtime = hm, hm.model, hm.runtime
        self.device = next(self.model.parameters()).device
        why = graph_support(hm)
        self.capture = why is None if capture is None else capture
        if self.capture and why is not None:
            raise ValueError(f"cannot capture decode steps in a CUDA graph: {why}; turn --cuda-graph off")
        if self.runtime is not None:
            self.runtime.enable_graph_decode(max_rows=1)
        self.max_cache_len = max_cache_len
        self._cache_kw = cache_argument(self.model)  # "cache" in recent transformers
        self.cache = StaticCache(config=self.model.config, max_cache_len=max_cache_len)
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)   # [1, 1] the step's token
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)        # [1] its cache position
        self.next_pos = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None  # [V] the captured step's output
        self.replays = 0
        self.capture_error: Optional[str] = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids [1, T]`` eagerly into the static cache; the last position's logits."""
        t = ids.shape[1]
        if t >= self.max_cache_len:
            raise ValueError(f"the prompt has {t} tokens; the static KV cache holds {self.max_cache_len}")
        out = self.model(input_ids=ids, use_cache=True, cache_position=torch.arange(t, device=self.device),
                         **{self._cache_kw: self.cache})
        self.next_pos = t
        return out.logits[0, -1]

    def _step(self) -> torch.Tensor:
        ctx = self.runtime.graph_step() if self.runtime is not None else contextlib.nullcontext()
        with ctx:
            out = self.model(input_ids=self.ids, cache_position=self.pos, use_cache=True,
                             **{self._cache_kw: self.cache})
        return out.logits[0, -1]

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._step()
        except Exception as e:  # the model's forward is not capturable: run it eagerly instead
            self.capture_error = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed, decoding eagerly: %s", self.capture_error)
            self.capture = False
            return
        self.graph = graph

    def decode(self, token: int) -> torch.Tensor:
        """One decode step for ``token``; its logits ``[V]`` (a static tensor when replaying)."""
        if self.next_pos >= self.max_cache_len:
            raise ValueError(f"the static KV cache of {self.max_cache_len} positions is full")
        self.ids.fill_(token)
        self.pos.fill_(self.next_pos)
        if self.runtime is not None:
            self.runtime.begin_forward(is_prefill=False)  # the upkeep, outside the graph
        if self.capture and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            if self.runtime is not None:
                self.runtime.graph_replayed(1)  # the next upkeep reads this step from the graph's buffers
            self.replays += 1
            logits = self.logits
        else:
            logits = self._step()
        self.next_pos += 1
        return logits

    def close(self) -> None:
        """The generation is over: the runtime counts the last step now."""
        if self.runtime is not None:
            self.runtime.end_graph_steps()
