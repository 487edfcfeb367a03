"""The continuous-batching decode loop: one thread, one running batch; requests join at the next step and
leave when they finish.

Each step: newcomers (up to the free rows) are prefilled together, as ``model.generate`` prefills a batch
(left-padded, their images encoded in one call), and join the running rows (memvp_ds.serve.batch); every
row's next token is chosen from its last hidden state (greedy, or sampled with its own seeded generator);
finished rows leave; the rest decode one token together, the strategy given their per-row decoding tensors
(MemVP's memory, APT's visual rows, DVP's residual prompt; visual prefixes and DVP's token are in the KV
cache). Greedy rows therefore get the tokens ``model.generate`` gives them alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Iterator, List, Optional

import torch

from memvp_ds.serve import batch as rows_batch
from memvp_ds.serve.batch import Rows
from memvp_ds.serve.images import ImageEncoder
from memvp_ds.serve.limits import ServeLimits


class QueueFull(RuntimeError):
    """Every row is busy and the queue is full: the client should retry later."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)


@dataclass
class Request:
    """One chat completion in the engine. ``emit(kind, payload)`` is called from the engine thread:
    ("delta", text), then ("done", {"finish_reason", "token_ids", "text"}) or ("error", message)."""

    prompt_ids: List[int]
    """Negative ids are its images' positions in the text (a model that takes several images per sample)."""
    pixels: List[torch.Tensor]
    """Each of its images' (3, S, S) pixels, in order (none: a text-only request)."""
    sampling: Sampling
    emit: Callable[[str, object], None]
    deadline: float
    tokens: List[int] = field(default_factory=list)
    sent: str = ""
    cancelled: bool = False
    generator: Optional[torch.Generator] = None
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class EngineStats:
    """What the metrics read after each step (called from the engine thread)."""

    on_step: Callable[[int, int, int], None] = lambda rows, queued, new_tokens: None
    """(rows decoded this step, requests waiting, tokens produced)."""
    on_first_token: Callable[[float], None] = lambda seconds: None
    on_finish: Callable[[str, float], None] = lambda reason, seconds: None


class Engine:
    def __init__(self, model, tokenizer, encoder: ImageEncoder, limits: ServeLimits,
                 stats: Optional[EngineStats] = None):
        self.model, self.tokenizer, self.encoder, self.limits = model.eval(), tokenizer, encoder, limits
        self.stats = stats or EngineStats()
        self.device = next(model.parameters()).device
        rows_batch.check_cache(model.new_cache())
        self._lm_head = model.llm.get_output_embeddings()
        self._waiting: Deque[Request] = deque()
        self._active: List[Request] = []
        self._admitting: List[Request] = []
        self._rows: Optional[Rows] = None
        self._lead = 0
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # -- called from the server ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="memvp-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish the requests in flight (at most ``timeout`` seconds), then end the loop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFull(f"{len(self._active)} requests decoding and {len(self._waiting)} waiting")
            self._waiting.append(request)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Pause the loop between two steps (requests still queue, none is admitted): an operator's or a
        test's way to see the queue fill deterministically."""
        with self._step_lock:
            yield

    # -- the engine thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._active or self._stopping):
                    self._wake.wait()
                if self._stopping and not (self._waiting or self._active):
                    return
            with self._step_lock, torch.inference_mode():
                try:
                    self._step()
                except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the server
                    self._fail(err)

    def _fail(self, err: Exception) -> None:
        """The requests of the running batch get an error (the server answers 500) and the batch is reset."""
        logging.getLogger(__name__).exception("memvp-serve: a decode step failed")
        for request in self._active + self._admitting:
            request.emit("error", f"{type(err).__name__}: {err}")
            self.stats.on_finish("error", time.monotonic() - request.submitted)
        self._active, self._admitting, self._rows = [], [], None

    def _admit(self) -> None:
        with self._wake:
            free = self.limits.max_rows - len(self._active)
            newcomers = []
            while self._waiting and len(newcomers) < free:
                request = self._waiting.popleft()
                if not request.cancelled:
                    newcomers.append(request)
        if not newcomers:
            return
        self._admitting = newcomers
        pad = self.tokenizer.pad_token_id
        longest = max(len(r.prompt_ids) for r in newcomers)
        ids = torch.tensor([[pad] * (longest - len(r.prompt_ids)) + r.prompt_ids for r in newcomers])
        mask = torch.tensor([[0] * (longest - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in newcomers])
        visual = self.encoder.encode([r.pixels for r in newcomers])
        hidden, cache, cache_mask = self.model.prefill(ids.to(self.device), mask.to(self.device),
                                                       **{k: v.to(self.device) for k, v in visual.items()})
        self._lead = self.model.strategy.leading_cache_columns()
        newcomer_rows = Rows(hidden, cache_mask, cache, tuple(self.model.strategy.decoding_rows()))
        self._rows = newcomer_rows if self._rows is None else rows_batch.join(self._rows, newcomer_rows, self._lead)
        self._active += newcomers
        self._admitting = []

    def _step(self) -> None:
        self._admit()
        if not self._active:
            return
        logits = self._lm_head(self._rows.hidden)
        tokens = logits.argmax(-1)
        now = time.monotonic()
        keep, finished = [], []
        for row, request in enumerate(self._active):
            if request.sampling.temperature > 0:
                tokens[row] = self._sample(logits[row], request)
            token = int(tokens[row])
            if not request.tokens:
                self.stats.on_first_token(now - request.submitted)
            reason = self._advance(request, token, now)
            (finished if reason else keep).append((row, request, reason))
        self.stats.on_step(len(self._active), len(self._waiting), len(self._active))
        for _, request, reason in finished:
            request.emit("done", {"finish_reason": reason, "token_ids": list(request.tokens), "text": request.sent})
            self.stats.on_finish(reason, now - request.submitted)
        self._active = [request for _, request, _ in keep]
        if not keep:
            self._rows = None
            return
        if finished:
            self._rows = rows_batch.keep(self._rows, [row for row, _, _ in keep], self._lead)
            tokens = tokens[[row for row, _, _ in keep]]
        self.model.strategy.set_decoding_rows(self._rows.state)
        self._rows.hidden, self._rows.mask = self.model.decode_step(tokens, self._rows.mask, self._rows.cache)

    def _sample(self, logits: torch.Tensor, request: Request) -> torch.Tensor:
        if request.generator is None:
            request.generator = torch.Generator(device=logits.device)
            if request.sampling.seed is not None:
                request.generator.manual_seed(request.sampling.seed)
            else:
                request.generator.seed()
        probs = torch.softmax(logits.float() / request.sampling.temperature, -1)
        if request.sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= request.sampling.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
        return torch.multinomial(probs, 1, generator=request.generator)[0]

    def _advance(self, request: Request, token: int, now: float) -> Optional[str]:
        """Add ``token`` to the request, send the text that is final, and return why it ends (or None)."""
        eos = token == self.tokenizer.eos_token_id
        if not eos:
            request.tokens.append(token)
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        reason = None
        for stop in request.sampling.stop:
            at = text.find(stop)
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None:
            if eos or request.cancelled:
                reason = "stop"
            elif len(request.tokens) >= request.sampling.max_tokens or now > request.deadline:
                reason = "length"
        # Unfinished: hold back what may be the start of a stop string or of a multi-byte character.
        hold = 0 if reason else max([len(s) - 1 for s in request.sampling.stop] + [0])
        final = text[:len(text) - hold] if hold else text
        if not reason and final.endswith("\ufffd"):
            final = final.rstrip("\ufffd")
        if len(final) > len(request.sent) and final.startswith(request.sent):
            request.emit("delta", final[len(request.sent):])
            request.sent = final
        elif reason and final != request.sent and not final.startswith(request.sent):
            request.sent = final  # decoding changed earlier text (rare): the final text still counts
        return reason
