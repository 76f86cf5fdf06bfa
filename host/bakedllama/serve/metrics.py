"""The server's counters and their Prometheus text exposition (format 0.0.4), without a client
library: a handful of counters, gauges and two histograms."""

from __future__ import annotations

import collections
import math
import time

OUTCOMES = ("completed", "aborted", "refused_queue_full", "refused_device_down", "failed", "invalid")
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_WINDOW = 10.0  # s, the tokens/s gauge averages over this


class Histogram:
    def __init__(self, buckets=BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1


class Metrics:
    def __init__(self):
        self.t0 = time.monotonic()
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.device_aborts = 0  # generations the device stopped early (ABORT answered "was running")
        self.device_recoveries = 0
        self.aborted_generated = 0  # tokens the device says it generated for aborted generations
        self.ttft = Histogram()
        self.duration = Histogram()
        self.recent = collections.deque()  # (t, tokens) of finished and running work, for the rate
        self.last = {}  # the last generation's device figures

    def count(self, outcome: str) -> None:
        self.requests[outcome] += 1

    def token(self, n: int = 1) -> None:
        self.generated_tokens += n
        self.recent.append((time.monotonic(), n))

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - RATE_WINDOW:
            self.recent.popleft()
        window = min(RATE_WINDOW, max(now - self.t0, 1e-3))
        return sum(n for _, n in self.recent) / window

    def render(self, *, queue_depth: int, queue_capacity: int, running: int, device_up: bool) -> str:
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, v in samples:
                lab = "{" + ",".join(f'{k}="{x}"' for k, x in labels.items()) + "}" if labels else ""
                out.append(f"{name}{lab} {_num(v)}")

        metric("bakedllama_requests_total", "counter", "completion requests by outcome",
               [({"outcome": k}, v) for k, v in self.requests.items()])
        metric("bakedllama_prompt_tokens_total", "counter", "prompt tokens sent to the device",
               [({}, self.prompt_tokens)])
        metric("bakedllama_generated_tokens_total", "counter", "tokens the device generated",
               [({}, self.generated_tokens)])
        metric("bakedllama_queue_depth", "gauge", "requests waiting for the device", [({}, queue_depth)])
        metric("bakedllama_queue_capacity", "gauge", "most requests that may wait (then 503)",
               [({}, queue_capacity)])
        metric("bakedllama_requests_running", "gauge", "requests on the device now", [({}, running)])
        metric("bakedllama_tokens_per_second", "gauge",
               f"generated tokens per second over the last {RATE_WINDOW:g} s", [({}, self.tokens_per_s())])
        metric("bakedllama_device_up", "gauge", "1 if the device answers", [({}, int(device_up))])
        metric("bakedllama_device_cycles_per_token", "gauge",
               "hardware cycle counter per forward pass, mean of the last generation (NaN: no counter)",
               [({}, self.last.get("cycles_per_token"))])
        metric("bakedllama_device_chip_tokens_per_second", "gauge",
               "generated tokens per second of chip time at the SoC clock, last generation",
               [({}, self.last.get("chip_tokens_per_s"))])
        metric("bakedllama_device_tokens_per_second", "gauge",
               "the device's decode rate seen by the host in the last generation (first to last token)",
               [({}, self.last.get("device_tokens_per_s"))])
        metric("bakedllama_device_aborts_total", "counter", "generations stopped early on the device",
               [({}, self.device_aborts)])
        metric("bakedllama_device_aborted_generated_tokens_total", "counter",
               "tokens the device itself reports for the generations it stopped early",
               [({}, self.aborted_generated)])
        metric("bakedllama_device_recoveries_total", "counter", "reconnections after a device failure",
               [({}, self.device_recoveries)])
        for name, h, help_ in (("bakedllama_time_to_first_token_seconds", self.ttft,
                                "request arrival to its first token"),
                               ("bakedllama_request_duration_seconds", self.duration,
                                "request arrival to its last token (completed requests)")):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} histogram")
            for b, c in zip(h.buckets, h.counts):
                out.append(f'{name}_bucket{{le="{b:g}"}} {c}')
            out.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
            out.append(f"{name}_sum {_num(h.sum)}")
            out.append(f"{name}_count {h.count}")
        return "\n".join(out) + "\n"


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(int(v))
