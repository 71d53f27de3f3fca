"""Between HTTP and the compiled sampler: a queue, batching, length buckets and warm-up.

A `Job` is one answer to generate (one choice of one request). `Engine.submit` puts it in the
queue and returns a `concurrent.futures.Future` of its generated ids; ONE worker thread runs the
sampler, so the event loop never blocks (handlers await the future). The worker takes the
oldest job and every queued job that can share its program (same sampler settings and prompt
width) up to `max_batch`. When fewer are queued
than the largest of the last few batches held, it waits up to `batch_window` (counted from when
it became free) for more: clients answered together come back together, while a lone client's
request, after lone requests, runs at once.

Shapes are bounded so that a few programs, compiled at start-up (`warm_up`), serve every
request inside the buckets:
  * prompts are left-padded to the smallest `prompt_buckets` width that holds them (longer
    prompts: a multiple of the largest bucket, compiled when first seen);
  * `max_tokens` becomes the gen length of the smallest `gen_buckets` entry that holds it and is
    a multiple of the block length (the answer is cut at `max_tokens`);
  * batches are filled to the smallest `batch_sizes` entry that holds them by repeating the
    last prompt.
Left padding does not change a row's answer (positions come from the key mask), so a row of a
batch equals the request alone. Sampling with randomness (temperature > 0 or random remasking)
gives each row its own key from its request's seed (`generate_ids(seed=[...])`), so a sampled
row also gets the numbers it gets alone, and sampled requests batch like greedy ones.

Every batch is one call of the generation API (`Generator.generate_ids`) with the sampler's
streaming on (`stream=_dispatch`): finished blocks reach `_dispatch` on the host, which hands each
row's block to its job's `on_block`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llada_jax.diffusion.sampler import SamplerConfig
from llada_jax.generation import Generator, batch_rows
from llada_jax.serving.metrics import Metrics

# Batch sizes remembered to guess how many requests the next batch should wait for.
_RECENT_BATCHES = 4

# on_block(block index, block ids [block_length]), called from the sampler's callback thread.
BlockListener = Callable[[int, np.ndarray], None]


class QueueFull(Exception):
    """Every slot is taken (HTTP 429)."""


class EngineClosed(Exception):
    """The server is shutting down (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 8
    batch_window: float = 0.01          # seconds to wait for a batch to fill
    max_queue: int = 64                 # waiting + running jobs
    prompt_buckets: tuple[int, ...] = (64, 256, 1024)
    gen_buckets: tuple[int, ...] = (32,)
    batch_sizes: tuple[int, ...] = ()   # default: powers of two times the mesh's batch rows

    def __post_init__(self):
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: expected a positive integer, found "
                                 f"{getattr(self, name)}")
        if self.batch_window < 0:
            raise ValueError(f"--batch_window_ms: expected >= 0, found {self.batch_window * 1e3}")
        for name in ("prompt_buckets", "gen_buckets", "batch_sizes"):
            values = getattr(self, name)
            if any(v < 1 for v in values) or list(values) != sorted(set(values)):
                raise ValueError(f"--{name}: expected increasing positive integers, found "
                                 f"{','.join(map(str, values))}")
        if not self.prompt_buckets or not self.gen_buckets:
            raise ValueError("--prompt_buckets and --gen_buckets: expected at least one length")


@dataclasses.dataclass(eq=False)
class Job:
    """One answer to generate: prompt ids, settings, and where its result goes."""

    prompt: list[int]
    sampler: SamplerConfig
    width: int                          # padded prompt width
    seed: int = 0
    images: Any = None                  # LLaDA-V: a multimodal_data.EncodedConversation
    on_block: BlockListener | None = None
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def random(self) -> bool:
        return self.sampler.temperature > 0 or self.sampler.remasking == "random"

    @property
    def group(self) -> tuple:
        """Jobs with equal groups run in one batch (sampled ones too: each row has its own key,
        so its answer is the one it gets alone)."""
        return (self.sampler, self.width, self.images is not None)


# Stream tag -> listener of the running batch; `_dispatch` is the one host function every
# compiled program calls (a fixed object, so it never causes a recompile).
_listeners: dict[int, Callable[[int, np.ndarray], None]] = {}
_tags = itertools.count()


def _dispatch(tag: np.ndarray, block: np.ndarray, block_tokens: np.ndarray) -> None:
    listener = _listeners.get(int(tag))
    if listener is not None:
        listener(int(block), np.asarray(block_tokens))


class Engine:
    """The queue and the worker thread around one `Generator`."""

    def __init__(self, generator: Generator, default_sampler: SamplerConfig,
                 settings: EngineSettings, metrics: Metrics | None = None) -> None:
        self.generator, self.default_sampler = generator, default_sampler
        self.metrics = metrics or Metrics()
        rows = batch_rows(generator.mesh)
        sizes = settings.batch_sizes or tuple(
            rows * 2 ** i for i in range(64) if rows * 2 ** i < settings.max_batch)
        sizes = tuple(sorted({*sizes, -(-settings.max_batch // rows) * rows}))
        bad = [s for s in sizes if s % rows]
        if bad:
            raise ValueError(f"--batch_sizes: {bad} are not multiples of the mesh's batch axes "
                             f"({rows} rows)")
        if sizes[-1] < settings.max_batch:
            raise ValueError(f"--batch_sizes: the largest ({sizes[-1]}) is below --max_batch="
                             f"{settings.max_batch}")
        self.settings = dataclasses.replace(settings, batch_sizes=sizes)
        self.max_length = generator.config.model.max_sequence_length
        self._pending: list[Job] = []
        self._running = 0
        self._cond = threading.Condition()
        self._closing = False
        self._recent_sizes = [1] * _RECENT_BATCHES
        self._idle_since = 0.0
        self._worker = threading.Thread(target=self._work, name="sampler", daemon=True)

    # --- shapes ---------------------------------------------------------------------------------
    def gen_length(self, max_tokens: int, block_length: int) -> int:
        """The gen length a request of `max_tokens` runs with (see the module docstring)."""
        for g in self.settings.gen_buckets:
            if g >= max_tokens and g % block_length == 0:
                return g
        return -(-max_tokens // block_length) * block_length

    def prompt_width(self, length: int, gen_length: int) -> int:
        limit = self.max_length - gen_length
        for w in self.settings.prompt_buckets:
            if w >= length:
                return max(length, min(w, limit))
        largest = self.settings.prompt_buckets[-1]
        return max(length, min(limit, -(-length // largest) * largest))

    def batch_size(self, count: int) -> int:
        return next(s for s in self.settings.batch_sizes if s >= count)

    def programs(self) -> list[tuple[int, int, int]]:
        """(gen length, prompt width, batch size) of every program warm-up compiles (default
        sampler settings)."""
        out = []
        for g in self.settings.gen_buckets:
            if g % self.default_sampler.block_length:
                continue
            for w in self.settings.prompt_buckets:
                if w + g <= self.max_length:
                    out += [(g, w, b) for b in self.settings.batch_sizes]
        return out

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker.start()

    def warm_up(self) -> int:
        """Compiles every listed program by running it once; returns how many programs."""
        before = self.metrics.compilations
        programs = self.programs()
        bos = self.generator.tokenizer.bos_id
        for g, w, b in programs:
            steps = self.default_steps(g, self.default_sampler.block_length)
            sampler = dataclasses.replace(self.default_sampler, gen_length=g, steps=steps)
            jobs = [Job([bos], sampler, w) for _ in range(b)]
            self._run(jobs)
        self.metrics.set("warmup_compilations", self.metrics.compilations - before)
        self.metrics.reset_batches()   # the metrics describe requests, not warm-up
        return len(programs)

    def default_steps(self, gen_length: int, block_length: int) -> int:
        """Steps for a request that does not set them: the default sampler's steps per token,
        at least one step per block, a multiple of the number of blocks."""
        blocks = max(1, gen_length // block_length)
        per_token = self.default_sampler.steps / self.default_sampler.gen_length
        steps = max(1, round(gen_length * per_token / blocks)) * blocks
        return min(steps, gen_length)

    def close(self) -> None:
        """Stops taking jobs, finishes every queued one, and joins the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join()

    # --- queue ----------------------------------------------------------------------------------
    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queues `job`; QueueFull when every slot is taken."""
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._pending) + self._running >= self.settings.max_queue:
                raise QueueFull(f"the queue is full ({self.settings.max_queue} requests waiting "
                                f"or running); retry later")
            job.arrival = time.monotonic()
            self._pending.append(job)
            self._update_gauges()
            self._cond.notify_all()
        return job.future

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits; a running one is ignored when done."""
        with self._cond:
            if job.cancelled or job.future.done():
                return
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                job.future.cancel()
                self._update_gauges()
        self.metrics.add("cancelled")

    def slots_in_use(self) -> int:
        with self._cond:
            return len(self._pending) + self._running

    def _update_gauges(self) -> None:   # with self._cond held
        self.metrics.set("queue_length", len(self._pending))
        self.metrics.set("slots_in_use", len(self._pending) + self._running)

    def _next_batch(self) -> list[Job] | None:
        """Blocks until a batch is due; None when closing with nothing left."""
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None
            first = self._pending[0]
            limit = self.settings.max_batch
            # Wait for as many as recent batches held (clients answered together come back
            # together), counting the window from when the worker became free; a lone client
            # (recent batches of one) never waits.
            expected = min(limit, max(self._recent_sizes))
            deadline = max(first.arrival, self._idle_since) + self.settings.batch_window
            while not self._closing:
                mates = sum(1 for j in self._pending if j.group == first.group)
                left = deadline - time.monotonic()
                if mates >= expected or left <= 0 or first not in self._pending:
                    break
                self._cond.wait(left)
            if first not in self._pending:   # cancelled while waiting
                return []
            batch = [j for j in self._pending if j.group == first.group][:limit]
            for j in batch:
                self._pending.remove(j)
            self._recent_sizes = [*self._recent_sizes[1:], len(batch)]
            self._running = len(batch)
            self._update_gauges()
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as error:   # a bad batch fails its requests, not the server
                for job in batch:
                    with contextlib.suppress(concurrent.futures.InvalidStateError):
                        job.future.set_exception(error)
            finally:
                with self._cond:
                    self._running = 0
                    self._idle_since = time.monotonic()
                    self._update_gauges()

    # --- one batch ------------------------------------------------------------------------------
    def _run(self, jobs: Sequence[Job]) -> None:
        """Runs one batch through the streaming sampler and resolves the jobs' futures."""
        first = jobs[0]
        rows = self.batch_size(len(jobs))
        tag = next(_tags) % 2 ** 31

        def listener(block: int, block_tokens: np.ndarray) -> None:
            for i, job in enumerate(jobs):
                if job.on_block is not None and not job.cancelled:
                    job.on_block(block, block_tokens[i])

        _listeners[tag] = listener
        start = time.perf_counter()
        try:
            # Every job's prompt fits its bucket `width`, so the width as the bucket is exact.
            out = self.generator.generate_ids(
                [j.prompt for j in jobs], first.sampler,
                seed=[j.seed for j in jobs] if first.random else first.seed,
                images=None if first.images is None else [j.images for j in jobs],
                prompt_bucket=first.width, batch_size=rows, stream=_dispatch, stream_tag=tag)
        finally:
            _listeners.pop(tag, None)
        self.metrics.batch_done(rows, len(jobs), out.forward_passes, time.perf_counter() - start)
        with self._cond:   # the slots are free before any client hears back
            self._running = 0
            self._update_gauges()
        for job, generated in zip(jobs, out.tokens, strict=True):
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled just now
                job.future.set_result(generated)
