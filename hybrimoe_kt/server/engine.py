"""The engine: one worker thread owns the model (the hybrid runtime is not thread-safe) and runs
requests with continuous batching.

Every step the worker admits waiting requests while the batch has room (``max_batch``): each is
prefilled alone into its own KV cache and its first token sampled. Then one decode forward runs for
every running request together (``decoding.batch.DecodeBatch``): the MoE layers get one row per request.
A request that finishes (EOS, a stop string, ``max_tokens``) or is cancelled leaves the batch before the
next step; requests that arrived meanwhile join it. Each request keeps its own sampler and detokenizer.

A request talks back through its ``sink`` (called from the worker thread):

    ("delta", text)                                  new text (streaming requests only)
    ("done", finish_reason, prompt_ids, token_ids, text)   the end (finish_reason stop | length); the whole
                                                     text for a request that does not stream, else ""
    ("error", message, status)                        this request failed (500) or was refused (503)

The HTTP side sets ``Job.cancel`` when its client goes away; the worker drops the request before its
next forward. A forward that raises fails the requests in it and no others; a fault in the worker's own
code stops the worker, which ``health()`` then reports (``dead``).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from hybrimoe_kt.decoding.batch import DecodeBatch, prefill
from hybrimoe_kt.decoding.detokenizer import Detokenizer
from hybrimoe_kt.decoding.sampler import Sampler
from hybrimoe_kt.decoding.stopping import eos_ids
from hybrimoe_kt.server.metrics import ServerMetrics
from hybrimoe_kt.server.protocol import GenRequest, RequestError

log = logging.getLogger(__name__)

Sink = Callable[[tuple], None]


@dataclass(eq=False)
class Job:
    req: GenRequest
    prompt: list[int]
    max_tokens: int
    sink: Sink
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    sampler: Optional[Sampler] = None
    detok: Optional[Detokenizer] = None
    tokens: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)   # the answer's text, when it does not stream
    next_input: int = -1
    first_token_at: float = 0.0


class Engine:
    def __init__(self, hybrid: Any, queue_size: int = 64, max_batch: int = 8) -> None:
        if queue_size < 1 or max_batch < 1:
            raise ValueError(f"queue size and max batch must be >= 1, got {queue_size} and {max_batch}")
        self.hybrid = hybrid
        self.model = hybrid.model
        self.tokenizer = hybrid.tokenizer
        # a fast tokenizer is not safe to use from several threads at once ("Already borrowed"): the
        # HTTP side encodes one prompt at a time under a lock, the worker decodes with its own copy
        self._encode_lock = threading.Lock()
        self._worker_tokenizer = copy.deepcopy(hybrid.tokenizer)
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.metrics = ServerMetrics(self)
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._batch = DecodeBatch(self.model)
        self._cv = threading.Condition()
        self._go = threading.Event()          # cleared by pause(): the worker takes no new request
        self._go.set()
        self._stopping = threading.Event()
        self._drain_deadline: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        self.dead: Optional[str] = None       # why the worker stopped, when it did
        self.last_step = time.monotonic()

    # lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hybrimoe-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._go.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in self._take_all():
            job.sink(("error", "server is shutting down", 503))

    def drain(self, grace_s: float) -> None:
        """Take no new request; finish the accepted ones within ``grace_s`` seconds, then end the rest
        with finish_reason ``length`` (their streams get a final chunk)."""
        with self._cv:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + max(0.0, grace_s)
            self._cv.notify_all()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def idle(self) -> bool:
        with self._cv:
            return not self._waiting and not self._running

    def pause(self) -> None:
        """Finish the running step, then admit nothing and decode nothing until ``resume``."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    # requests --------------------------------------------------------------------------------------
    def encode(self, req: GenRequest) -> list[int]:
        """The prompt's token ids (run off the worker, on the HTTP side's thread pool)."""
        with self._encode_lock:
            return self._encode(req)

    def _encode(self, req: GenRequest) -> list[int]:
        if req.kind == "chat":
            enc = self.tokenizer.apply_chat_template(list(req.messages or ()), add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)
            return [int(i) for i in enc["input_ids"]]
        return [int(i) for i in self.tokenizer(req.prompt).input_ids]

    def submit(self, job: Job) -> None:
        """Queue a job; RequestError 429 when the queue is full, 503 when shutting down or dead."""
        with self._cv:
            if self.dead is not None or self.draining or self._stopping.is_set():
                self.metrics.outcome("rejected")
                raise RequestError("server is shutting down" if self.dead is None else
                                   f"server engine stopped: {self.dead}", status=503, code="unavailable",
                                   type_="server_error")
            if len(self._waiting) >= self.queue_size:
                self.metrics.outcome("rejected")
                raise RequestError(f"server busy: the request queue is full ({self.queue_size} waiting); retry "
                                   f"later", status=429, code="queue_full", type_="server_busy")
            self._waiting.append(job)
            self._cv.notify_all()

    def queue_length(self) -> int:
        with self._cv:
            return len(self._waiting)

    def running(self) -> int:
        with self._cv:
            return len(self._running)

    def health(self) -> dict[str, Any]:
        alive = self.alive()
        status = "ok" if alive and not self.draining else ("draining" if alive else "dead")
        out: dict[str, Any] = {"status": status, "worker_alive": alive, "queue_depth": self.queue_length(),
                               "running": self.running(), "max_batch": self.max_batch,
                               "last_step_age_s": round(time.monotonic() - self.last_step, 3)}
        if self.dead is not None:
            out["error"] = self.dead
        return out

    # worker ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._step()
        except BaseException as e:  # a fault in the engine itself: stop, say why, answer everyone
            log.exception("the engine worker stopped")
            self.dead = f"{type(e).__name__}: {e}"
            for job in self._take_all():
                job.sink(("error", f"server engine stopped: {self.dead}", 500))

    def _take_all(self) -> list[Job]:
        with self._cv:
            jobs = list(self._waiting) + self._running
            self._waiting.clear()
            self._running = []
        self._batch = DecodeBatch(self.model)
        return jobs

    def _step(self) -> None:
        self._go.wait()
        with self._cv:
            if not self._waiting and not self._running:
                self._cv.wait(0.05)
                self.last_step = time.monotonic()
                return
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self._end_all_for_shutdown()
            return
        with torch.inference_mode():  # ~12% faster per token than no_grad on the tiny models' CPU path
            self._admit()
            self._decode()
        self.last_step = time.monotonic()

    def _admit(self) -> None:
        while len(self._running) < self.max_batch and not self._stopping.is_set():
            with self._cv:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if job.cancel.is_set():
                self._finish(job, "cancelled")
                continue
            try:  # a failure here fails this request alone
                job.sampler = Sampler(job.req.temperature, job.req.top_p, job.req.seed)
                job.detok = Detokenizer(self._worker_tokenizer, job.req.stop)
                logits, cache = prefill(self.model, job.prompt)
                token = job.sampler(logits)
            except Exception as e:
                log.exception("prefill failed")
                self._fail([job], e)
                continue
            job.first_token_at = time.perf_counter()
            self.metrics.first_token(job.first_token_at - job.submitted)
            if self._take(job, token) is None:
                self._batch.add(cache, len(job.prompt))
                with self._cv:
                    self._running.append(job)

    def _decode(self) -> None:
        if not self._running:
            return
        t0 = time.perf_counter()
        try:
            logits = self._batch.step([job.next_input for job in self._running])
            tokens = [job.sampler(logits[i]) for i, job in enumerate(self._running)]  # type: ignore[misc]
        except Exception as e:
            log.exception("decode step failed")
            with self._cv:
                failed, self._running = self._running, []
            self._batch = DecodeBatch(self.model)
            self._fail(failed, e)
            return
        self.metrics.decode_step(len(tokens), time.perf_counter() - t0)
        done = [i for i, (job, tok) in enumerate(zip(self._running, tokens)) if self._take(job, tok) is not None]
        if done:
            self._batch.remove(done)
            with self._cv:
                self._running = [j for i, j in enumerate(self._running) if i not in set(done)]

    def _take(self, job: Job, token: int) -> Optional[str]:
        """Account one sampled token; the finish reason when the request ends with it, else None."""
        job.tokens.append(token)
        finish: Optional[str] = None
        if token in self.eos_ids and not job.req.ignore_eos:
            finish = "stop"
        else:
            assert job.detok is not None
            delta, stopped = job.detok.add(token)
            if delta:
                self._emit(job, delta)
            if stopped:
                finish = "stop"
            elif len(job.tokens) >= job.max_tokens:
                finish = "length"
        if finish is None and job.cancel.is_set():
            finish = "cancelled"
        if finish is not None:
            self._finish(job, finish)
        else:
            job.next_input = token
        return finish

    def _finish(self, job: Job, finish: str) -> None:
        n = len(job.tokens)
        decode_s = time.perf_counter() - job.first_token_at if n > 1 else 0.0
        if finish == "cancelled":
            log.info("client went away: generation cancelled after %d tokens", n)
            self.metrics.finished("cancelled", len(job.prompt), n, decode_s, time.perf_counter() - job.submitted)
            return
        if job.detok is not None and not job.detok.stopped:
            rest = job.detok.flush()
            if rest:
                self._emit(job, rest)
        self.metrics.finished("served", len(job.prompt), n, decode_s, time.perf_counter() - job.submitted)
        job.sink(("done", finish, tuple(job.prompt), tuple(job.tokens), "".join(job.parts)))

    @staticmethod
    def _emit(job: Job, text: str) -> None:
        """Stream ``text`` now, or keep it for the answer (one event per request, not per token)."""
        if job.req.stream:
            job.sink(("delta", text))
        else:
            job.parts.append(text)

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        for job in jobs:
            self.metrics.finished("failed", len(job.prompt), len(job.tokens), 0.0,
                                  time.perf_counter() - job.submitted)
            job.sink(("error", f"generation failed: {type(e).__name__}: {e}", 500))

    def _end_all_for_shutdown(self) -> None:
        """The drain's grace period is over: running requests end now (finish_reason ``length``),
        waiting ones are refused."""
        with self._cv:
            running, self._running = self._running, []
            waiting = list(self._waiting)
            self._waiting.clear()
        self._batch = DecodeBatch(self.model)
        for job in running:
            log.info("shutdown: ending a generation after %d tokens", len(job.tokens))
            self._finish(job, "length")
        for job in waiting:
            self.metrics.outcome("rejected")
            job.sink(("error", "server is shutting down", 503))
