"""The engine: one worker thread owns the model (its hybrid runtime is not thread-safe) and runs
requests one at a time from a bounded queue. Each request gets its own KV cache, so concurrent clients
never share state. A request talks back through its ``Job.events`` queue:

    ("start", prompt_tokens)              prompt accepted, generation begins
    ("reject", RequestError)              prompt refused (too long for the model): HTTP 400
    ("delta", text)                       new text
    ("done", finish_reason, prompt_ids, token_ids)   token ids of the prompt and of the completion
    ("error", message)                    the generation raised: HTTP 500

The HTTP side sets ``Job.cancel`` when its client goes away; the worker checks it before every forward.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from hybrimoe_kt.server.generate import Sampler, TextAssembler, token_loop
from hybrimoe_kt.server.metrics import Metrics
from hybrimoe_kt.server.protocol import GenRequest, RequestError

log = logging.getLogger(__name__)


@dataclass
class Job:
    req: GenRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    events: "queue.Queue[tuple[Any, ...]]" = field(default_factory=queue.Queue)


class Engine:
    def __init__(self, hybrid: Any, queue_size: int = 16) -> None:
        if queue_size < 1:
            raise ValueError(f"queue size must be >= 1, got {queue_size}")
        self.hybrid = hybrid
        self.model = hybrid.model
        self.tokenizer = hybrid.tokenizer
        self.queue_size = queue_size
        self.metrics = Metrics()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._go = threading.Event()      # cleared by pause(): the worker takes no new job
        self._go.set()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    # lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hybrimoe-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._go.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:  # answer whatever is still queued
            try:
                self._queue.get_nowait().events.put(("error", "server is shutting down"))
            except queue.Empty:
                break

    def pause(self) -> None:
        """Finish the current request, then take no new one until ``resume`` (queued jobs wait)."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    # requests --------------------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> Job:
        """Queue a request; RequestError 429 when the queue is full."""
        job = Job(req)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.add("rejected")
            raise RequestError(f"server busy: the request queue is full ({self.queue_size} waiting); retry later",
                               status=429, code="queue_full", type_="server_busy") from None
        return job

    def queue_length(self) -> int:
        return self._queue.qsize()

    def snapshot(self) -> dict[str, Any]:
        out = self.metrics.snapshot()
        rt = self.hybrid.runtime
        if rt is not None:
            c = rt.cache.counters
            out["cache"] = {"hit_rate": round(c.hit_rate, 4), "hits": c.hits, "late_hits": c.late_hits,
                            "misses": c.misses}
            out["transfers"] = {"copies": rt.pool.copies, "gb": round(rt.pool.bytes_copied / 1e9, 6)}
        else:
            out["cache"] = None
            out["transfers"] = None
        out["queue"] = {"length": self.queue_length(), "capacity": self.queue_size}
        out["gpu_tier"] = self.hybrid.tier_label
        return out

    # worker ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._go.wait()
            if self._stopping.is_set():
                break
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._run(job)

    def _encode(self, req: GenRequest) -> list[int]:
        if req.kind == "chat":
            enc = self.tokenizer.apply_chat_template(list(req.messages or ()), add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)
            return list(enc["input_ids"])
        return list(self.tokenizer(req.prompt).input_ids)

    def _run(self, job: Job) -> None:
        req, put = job.req, job.events.put
        if job.cancel.is_set():
            self.metrics.finished("cancelled", 0, 0, 0.0)
            return
        try:
            prompt = self._encode(req)
        except Exception as e:  # a template or tokenizer error is the request's content
            put(("reject", RequestError(f"cannot tokenize the request: {e}")))
            self.metrics.add("invalid")
            return
        param = "messages" if req.kind == "chat" else "prompt"
        if self.max_positions and len(prompt) + req.max_tokens > self.max_positions:
            put(("reject", RequestError(
                f"this model's maximum context length is {self.max_positions} tokens; the {param} has "
                f"{len(prompt)} tokens and max_tokens is {req.max_tokens}", param=param,
                code="context_length_exceeded")))
            self.metrics.add("invalid")
            return
        put(("start", len(prompt)))
        tokens: list[int] = []
        finish, t_first, hit_stop = "length", 0.0, False
        try:  # anything that fails here fails this request alone; the worker goes on
            sampler = Sampler(req.temperature, req.top_p, req.seed)
            text = TextAssembler(self.tokenizer, req.stop)
            for token in token_loop(self.model, prompt, sampler, req.max_tokens):
                tokens.append(token)
                if len(tokens) == 1:
                    t_first = time.perf_counter()
                if token in self.eos_ids and not req.ignore_eos:
                    finish = "stop"
                    break
                delta, stopped = text.add(token)
                if delta:
                    put(("delta", delta))
                if stopped:
                    finish, hit_stop = "stop", True
                    break
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
        except Exception as e:
            log.exception("generation failed")
            self.metrics.finished("failed", len(prompt), len(tokens), 0.0)
            put(("error", f"generation failed: {type(e).__name__}: {e}"))
            return
        if finish != "cancelled" and not hit_stop:
            rest = text.flush()
            if rest:
                put(("delta", rest))
        n = len(tokens)
        decode_s = time.perf_counter() - t_first if n > 1 else 0.0
        if finish == "cancelled":
            log.info("client went away: generation cancelled after %d tokens", n)
            self.metrics.finished("cancelled", len(prompt), n, decode_s)
            return
        self.metrics.finished("served", len(prompt), n, decode_s)
        put(("done", finish, tuple(prompt), tuple(tokens)))
