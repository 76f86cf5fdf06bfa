"""Many clients, one device: a bounded fair queue in front of one device thread.

- Fair: each client (the request's `user`, else its API key, else its address) has its own FIFO;
  the device takes one request from each waiting client in turn (round robin), so a client with
  ten requests queued does not hold up a client with one.
- Bounded: at most `max_queue` requests wait; the next one is refused at once (503), never held.
- Cancel: a client that disconnects leaves the queue, or, when it is on the device, its generation
  is aborted there (ABORT on a board or simulation) and the next request starts.
- Device failure: the request on the device and those waiting fail with the device's error; new
  requests are refused (503) while a reconnect is tried every `retry_s`; an idle device is probed
  every `probe_s`, so /health notices a dead one without a request.

The device is only ever touched from the one thread of `executor`; the asyncio side talks to a job
through its `events` queue (filled from that thread with call_soon_threadsafe)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bakedllama.device import DeviceError
from bakedllama.serve.text import TextAssembler


class QueueFull(Exception):
    pass


class DeviceDown(Exception):
    pass


@dataclass(eq=False)
class Job:
    ids: list
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    top_k: int = 0
    stops: tuple = ()
    client: str = "anonymous"
    id: str = field(default_factory=lambda: "cmpl-" + os.urandom(12).hex())
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    generation: object = None  # the device's Generation while it runs
    state: str = "new"  # queued, running, done
    run_index: int | None = None  # order in which the device took the requests
    t_submit: float = 0.0
    t_start: float | None = None
    t_first: float | None = None
    t_end: float | None = None
    tokens: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # the backend's figures of this generation

    def cancel(self, reason: str) -> None:
        """Thread-safe: stop as soon as possible (see the module docstring)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancelled.set()
        g = self.generation
        if g is not None:
            g.cancel()


class FairQueue:
    """Per-client FIFOs served round robin."""

    def __init__(self):
        self.clients: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def push(self, job: Job) -> None:
        self.clients.setdefault(job.client, collections.deque()).append(job)
        self.n += 1

    def pop(self) -> Job | None:
        if not self.clients:
            return None
        client, q = next(iter(self.clients.items()))
        job = q.popleft()
        del self.clients[client]
        if q:
            self.clients[client] = q  # to the back of the round
        self.n -= 1
        return job

    def remove(self, job: Job) -> bool:
        q = self.clients.get(job.client)
        if q is None or job not in q:
            return False
        q.remove(job)
        if not q:
            del self.clients[job.client]
        self.n -= 1
        return True

    def drain(self) -> list[Job]:
        jobs = [j for q in self.clients.values() for j in q]
        self.clients.clear()
        self.n = 0
        return jobs


class Scheduler:
    def __init__(self, backend, tok, metrics, *, max_queue: int = 16, probe_s: float = 5.0,
                 retry_s: float = 1.0, log=None):
        self.backend, self.tok, self.metrics = backend, tok, metrics
        self.max_queue, self.probe_s, self.retry_s = max_queue, probe_s, retry_s
        self.log = log or (lambda m: None)
        self.queue = FairQueue()
        self.running: Job | None = None
        self.down_error: str | None = None  # None: the device is up
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bakedllama-device")
        self._runs = itertools.count()
        self._task = None
        self._wake = None
        self.loop = None

    # asyncio side --------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="bakedllama-scheduler")

    async def stop(self) -> None:
        for j in self.queue.drain():
            self._end(j, "error", 503, "the server is shutting down", "server_shutdown")
        if self.running is not None:
            self.running.cancel("the server is shutting down")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.loop.run_in_executor(self.executor, getattr(self.backend, "stop", self.backend.close))
        self.executor.shutdown(wait=True)

    @property
    def up(self) -> bool:
        return self.down_error is None

    def submit(self, job: Job) -> None:
        """Queue a job or raise DeviceDown / QueueFull at once."""
        if self.down_error is not None:
            self.metrics.count("refused_device_down")
            raise DeviceDown(self.down_error)
        if len(self.queue) >= self.max_queue:
            self.metrics.count("refused_queue_full")
            raise QueueFull(f"the device queue is full ({self.max_queue} requests waiting, 1 running): "
                            f"retry later")
        job.state, job.t_submit = "queued", time.monotonic()
        self.queue.push(job)
        self._wake.set()

    def cancel(self, job: Job, reason: str) -> None:
        """The client went away (or the server stops): leave the queue, or abort on the device."""
        if job.state == "queued" and self.queue.remove(job):
            job.cancel(reason)
            self._end(job, "aborted", reason)
        elif job.state == "running":
            job.cancel(reason)

    def _end(self, job: Job, kind: str, *info) -> None:
        if job.state == "done":
            return
        job.state, job.t_end = "done", time.monotonic()
        self.metrics.count({"end": "completed", "aborted": "aborted", "error": "failed"}[kind])
        job.events.put_nowait((kind, *info))

    async def _run(self) -> None:
        while True:
            if self.down_error is not None:
                await self._recover()
                continue
            job = self.queue.pop()
            if job is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.probe_s)
                except asyncio.TimeoutError:
                    await self._probe()
                continue
            await self._execute(job)

    async def _execute(self, job: Job) -> None:
        job.state, job.t_start, job.run_index = "running", time.monotonic(), next(self._runs)
        self.running = job
        try:
            reason, tail = await self.loop.run_in_executor(self.executor, self._work, job)
        except DeviceError as e:
            self._go_down(str(e))
            self._end(job, "error", 503, f"the device failed: {e}", "device_error")
        except Exception as e:  # a bug: the client gets one line, the server log the traceback
            self.log("".join(traceback.format_exception(e)).rstrip())
            self._end(job, "error", 500, f"internal error ({type(e).__name__})", "internal_error")
        else:
            s = job.stats
            m = self.metrics
            m.last = {k: s.get(k) for k in ("cycles_per_token", "chip_tokens_per_s", "device_tokens_per_s")}
            if s.get("aborted_on_device"):
                m.device_aborts += 1
                m.aborted_generated += s.get("device_generated") or 0
            if reason == "aborted":
                self._end(job, "aborted", job.cancel_reason)
            else:
                if job.t_first is not None:
                    m.duration.observe(time.monotonic() - job.t_submit)
                self._end(job, "end", reason, tail)
        finally:
            self.running = None

    def _token(self, job: Job, t: int, delta: str, cycles) -> None:  # on the loop's thread
        if job.t_first is None:
            job.t_first = time.monotonic()
            self.metrics.ttft.observe(job.t_first - job.t_submit)
        self.metrics.token()
        job.events.put_nowait(("token", t, delta, cycles))

    def _work(self, job: Job):
        """On the device thread: run one generation; returns (finish_reason, the text's tail)."""
        asm = TextAssembler(self.tok, job.stops, self.tok.eos_id)
        self.metrics.prompt_tokens += len(job.ids)
        gen = self.backend.generate(job)
        try:
            for t, cycles in gen:
                delta = asm.push(t)
                job.tokens.append(t)
                self.loop.call_soon_threadsafe(self._token, job, t, delta, cycles)
                if asm.finished or job.cancelled.is_set():
                    break
        finally:
            gen.close()
        if asm.finished:
            return "stop", ""
        if job.cancelled.is_set():
            return "aborted", ""
        return "length", asm.finish()

    def _go_down(self, error: str) -> None:
        self.down_error = error
        self.log(f"device down: {error}")
        for j in self.queue.drain():
            self._end(j, "error", 503, f"the device failed: {error}", "device_error")

    async def _probe(self) -> None:
        try:
            await self.loop.run_in_executor(self.executor, self.backend.probe)
        except DeviceError as e:
            self._go_down(str(e))

    async def _recover(self) -> None:
        try:
            info = await self.loop.run_in_executor(self.executor, self.backend.connect)
        except DeviceError as e:
            self.down_error = str(e)
            await asyncio.sleep(self.retry_s)
            return
        self.down_error = None
        self.metrics.device_recoveries += 1
        self.log(f"device back: {info.get('device')} ({info.get('board')})")
