"""Token generation on a hybrid model: greedy or sampled, streamed through a callback, timed, with the
runtime's counters for that one generation.

``generate(hm, input_ids, max_new_tokens)`` runs one prefill forward over the prompt, then one decode
forward per new token with the model's KV cache. The prefill time is the time to the first token;
decode tok/s counts the tokens after the first. The runtime counters (cache hits, CPU/GPU expert split,
bytes copied to the GPU tier) are read before and after, so the result holds this generation's deltas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from hybrimoe_kt.decoding.batch import cache_argument
from hybrimoe_kt.decoding.detokenizer import Detokenizer
from hybrimoe_kt.decoding.sampler import Sampler
from hybrimoe_kt.decoding.stopping import eos_ids

log = logging.getLogger(__name__)

TokenCallback = Callable[[str], None]


@dataclass(frozen=True)
class RuntimeCounters:
    """A snapshot (or a difference of two) of the hybrid runtime's counters."""

    forwards: int = 0
    gpu_experts: int = 0
    cpu_experts: int = 0
    streamed: int = 0
    hits: int = 0
    late_hits: int = 0
    misses: int = 0
    copies: int = 0
    bytes_copied: int = 0

    @classmethod
    def read(cls, runtime: Any) -> "RuntimeCounters":
        if runtime is None:
            return cls()
        st, c, pool = runtime.stats, runtime.cache.counters, runtime.pool
        return cls(st.forwards, st.gpu_experts, st.cpu_experts, st.streamed, c.hits, c.late_hits,
                   c.misses, pool.copies, pool.bytes_copied)

    def __sub__(self, other: "RuntimeCounters") -> "RuntimeCounters":
        return RuntimeCounters(**{k: v - getattr(other, k) for k, v in asdict(self).items()})

    def __add__(self, other: "RuntimeCounters") -> "RuntimeCounters":
        return RuntimeCounters(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    @property
    def hit_rate(self) -> float:
        """Activated experts that were resident on the GPU tier (late hits included)."""
        n = self.hits + self.late_hits + self.misses
        return (self.hits + self.late_hits) / n if n else 0.0

    @property
    def gpu_share(self) -> float:
        """Fraction of expert executions that ran on the GPU tier."""
        n = self.gpu_experts + self.cpu_experts
        return self.gpu_experts / n if n else 0.0

    @property
    def gb_copied(self) -> float:
        return self.bytes_copied / 1e9

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": round(self.hit_rate, 6), "gpu_share": round(self.gpu_share, 6),
                "gb_copied": round(self.gb_copied, 9)}


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    prefill_s: float          # prompt forward + first token
    decode_s: float           # the forwards after the first token
    decode_forwards: int = 0
    counters: RuntimeCounters = field(default_factory=RuntimeCounters)
    stopped_on_eos: bool = False
    cuda_graph: str = "off"   # off | eager (the graphed step without capture) | replayed | capture failed: ...

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.decode_forwards
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_s": round(self.prefill_s, 6), "decode_s": round(self.decode_s, 6),
                "prefill_tok_s": round(self.prefill_tok_s, 3), "decode_tok_s": round(self.decode_tok_s, 3),
                "stopped_on_eos": self.stopped_on_eos, "cuda_graph": self.cuda_graph, **self.counters.summary()}


def encode_prompt(tokenizer: Any, history: list[dict[str, str]], text: str, use_template: bool) -> list[int]:
    """Prompt token ids: the conversation so far plus ``text`` through the chat template, or raw text."""
    if use_template and getattr(tokenizer, "chat_template", None):
        msgs = history + [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return list(tokenizer(text).input_ids)


def _graph_mode(graphed: Any) -> str:
    if graphed is None:
        return "off"
    if graphed.graph is not None:
        return "replayed"
    return "eager" if graphed.capture_error is None else f"capture failed: {graphed.capture_error}"


def _graphed_decoder(hm: Any, cuda_graph: Any, max_len: int) -> Any:
    """The ``GraphedDecoder`` ``generate`` uses for ``cuda_graph`` (see there), or None."""
    from hybrimoe_kt.kt.cuda_graph import GraphedDecoder, graph_support

    if cuda_graph is False:
        return None
    if cuda_graph == "eager":
        return GraphedDecoder(hm, max_len, capture=False)
    if cuda_graph not in (None, True):
        raise ValueError(f"cuda_graph must be None, True, False or 'eager', got {cuda_graph!r}")
    why = graph_support(hm)
    if why is not None:
        if cuda_graph is True:
            raise ValueError(f"--cuda-graph on: decode steps cannot be captured here: {why}")
        return None
    return GraphedDecoder(hm, max_len, capture=True)


@torch.no_grad()
def generate(hm: Any, input_ids: torch.Tensor | list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: Optional[int] = None, on_text: Optional[TokenCallback] = None,
             stop_on_eos: bool = True, cuda_graph: Optional[bool] = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (``[T]`` or ``[1, T]``) with the
    hybrid model ``hm`` (a ``HybridModel``); ``on_text`` receives the decoded text piece by piece.

    ``cuda_graph``: decode steps through ``kt.cuda_graph.GraphedDecoder`` (a static KV cache, the
    runtime's graph-safe decode layers, captured and replayed on CUDA). None (default) turns it on
    where it is supported (the model on CUDA, a decode-lookup strategy, kt-kernel, triton), True
    requires it there (a clear error elsewhere), False keeps the eager loop; ``"eager"`` runs the
    graphed path without capture (the CPU stand-in's test of it)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampler = Sampler(temperature, top_p, seed)  # ValueError on a bad temperature, top_p or seed
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)  # [1, T]
    if ids.shape[1] == 0:
        raise ValueError("the prompt encodes to no tokens")
    model = hm.model
    device = next(model.parameters()).device
    ids = ids.to(device)
    stops = eos_ids(model, hm.tokenizer) if stop_on_eos else frozenset()
    detok = Detokenizer(hm.tokenizer)
    before = RuntimeCounters.read(hm.runtime)
    tokens: list[int] = []
    eos = False
    n_decode = 0
    graphed = _graphed_decoder(hm, cuda_graph, ids.shape[1] + max_new_tokens)
    t0 = time.perf_counter()
    if graphed is not None:
        last = graphed.prefill(ids)
    else:
        out = model(input_ids=ids, use_cache=True)
        last = out.logits[0, -1]
        cache_kw = cache_argument(model)
        past = getattr(out, cache_kw)
    tok = sampler(last)
    t1 = time.perf_counter()
    while True:
        if tok in stops:
            eos = True
            break
        tokens.append(tok)
        piece, _ = detok.add(tok)
        if piece and on_text is not None:
            on_text(piece)
        if len(tokens) >= max_new_tokens:
            break
        if graphed is not None:
            last = graphed.decode(tok)
        else:
            out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **{cache_kw: past})
            past = getattr(out, cache_kw)
            last = out.logits[0, -1]
        n_decode += 1
        tok = sampler(last)
    if graphed is not None:
        graphed.close()
    t2 = time.perf_counter()
    rest = detok.flush()
    if rest and on_text is not None:
        on_text(rest)
    counters = RuntimeCounters.read(hm.runtime) - before
    log.debug("generated %d tokens after %d prompt tokens", len(tokens), ids.shape[1])
    return GenerationResult(tokens, detok.text, int(ids.shape[1]), t1 - t0, t2 - t1, n_decode, counters, eos,
                            _graph_mode(graphed))
