"""A bounded load test of `bakedllama serve` with the official `openai` client (a test dependency):
N concurrent streaming clients on 127.0.0.1, some of which disconnect midway; every completed text
is checked against a reference (the golden model) for its prompt and seed.

    rep = run_load(url, model_id, reference, clients=32)
    rep.summary()   # requests, completed, refused, aborted, wrong, p50/p99 latencies, tokens/s

Each client sends one request at the same moment (a barrier), so the queue really fills."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

PROMPTS = ("It was", "Elizabeth", "Mr. Darcy said that", "She had never")


@dataclass
class ClientResult:
    i: int
    prompt: str
    temperature: float
    seed: int
    max_tokens: int
    disconnect_after: int | None  # tokens, then the client closes the stream
    outcome: str = "?"  # completed, refused, aborted, error
    tokens: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    t_send: float = 0.0
    t_first: float | None = None
    t_end: float | None = None
    wrong: bool = False


@dataclass
class LoadReport:
    clients: list
    wall_s: float
    alone: tuple = ()  # the device alone, tokens/s, measured just before and just after the load

    def by(self, outcome):
        return [c for c in self.clients if c.outcome == outcome]

    def summary(self) -> dict:
        done = self.by("completed")
        ttft = sorted(c.t_first - c.t_send for c in done if c.t_first is not None)
        total = sorted(c.t_end - c.t_send for c in done)
        delivered = sum(len(c.tokens) for c in self.clients)
        d = dict(requests=len(self.clients), completed=len(done), refused=len(self.by("refused")),
                 aborted=len(self.by("aborted")), errors=len(self.by("error")),
                 wrong_texts=sum(c.wrong for c in self.clients),
                 ttft_p50_s=_pct(ttft, 50), ttft_p99_s=_pct(ttft, 99),
                 request_p50_s=_pct(total, 50), request_p99_s=_pct(total, 99),
                 tokens_delivered=delivered, wall_s=round(self.wall_s, 3),
                 aggregate_tokens_per_s=round(delivered / self.wall_s, 2) if self.wall_s else None)
        if self.alone:
            dev = sum(self.alone) / len(self.alone)
            d["device_alone_tokens_per_s"] = [round(x, 2) for x in self.alone]
            d["aggregate_vs_device"] = round(d["aggregate_tokens_per_s"] / dev, 3)
        return d

    def format(self) -> str:
        s = self.summary()
        out = (f"{s['requests']} requests: {s['completed']} completed, {s['refused']} refused (503), "
               f"{s['aborted']} aborted by their clients, {s['errors']} errors, "
               f"{s['wrong_texts']} wrong texts; "
               f"time to first token p50 {s['ttft_p50_s']} s / p99 {s['ttft_p99_s']} s, per request p50 "
               f"{s['request_p50_s']} s / p99 {s['request_p99_s']} s; {s['tokens_delivered']} tokens in "
               f"{s['wall_s']} s: {s['aggregate_tokens_per_s']} tokens/s aggregate")
        if self.alone:
            out += (f" vs {' / '.join(map(str, s['device_alone_tokens_per_s']))} tokens/s of the "
                    f"device alone (before / after): {s['aggregate_vs_device']}x")
        return out


def _pct(xs, p):
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return round(xs[k], 4)


def plan(clients: int, max_tokens: int, disconnect_every: int = 4, disconnect_after: int = 3,
         disconnect_max_tokens: int | None = None) -> list[ClientResult]:
    """Who sends what: prompts in turn, greedy and sampled (seeded) alternately, every
    `disconnect_every`-th client closing its stream after `disconnect_after` tokens (it asks for
    more tokens, so that it is surely still generating when it leaves)."""
    out = []
    for i in range(clients):
        leaves = disconnect_every and i % disconnect_every == disconnect_every - 1
        out.append(ClientResult(i, PROMPTS[i % len(PROMPTS)], 0.0 if i % 2 == 0 else 0.8, 1000 + i,
                                (disconnect_max_tokens or 4 * max_tokens) if leaves else max_tokens,
                                disconnect_after if leaves else None))
    return out


def alone_rate(generate_fn, clients: int, max_tokens: int, n: int = 8) -> float:
    """The device's own rate for this workload: the first n requests of the plan that run to the
    end, one after the other without the server; generate_fn(prompt, temperature, seed, max_tokens)
    -> token ids. Returns generated tokens per second (prompt passes included, as under load)."""
    todo = [r for r in plan(clients, max_tokens) if r.disconnect_after is None][:n]
    t = time.monotonic()
    tokens = sum(len(generate_fn(r.prompt, r.temperature, r.seed, r.max_tokens)) for r in todo)
    return tokens / (time.monotonic() - t)


def run_load(base_url: str, model_id: str, reference, clients: int = 32, max_tokens: int = 16,
             disconnect_every: int = 4, disconnect_after: int = 3, timeout: float = 300.0,
             alone=None, decode=None) -> LoadReport:
    """reference(prompt, temperature, seed, n) -> the first n token ids (called after the run);
    decode(ids) -> text, to check the completed texts too; alone() -> the device's tokens/s without
    the server (called just before and just after the load: the machine's other work moves it).
    Every client thread ends within `timeout` (the HTTP timeout)."""
    import openai

    before = alone() if alone else None

    todo = plan(clients, max_tokens, disconnect_every, disconnect_after)
    barrier = threading.Barrier(len(todo))

    def client(r: ClientResult):
        c = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="load-test", max_retries=0,
                          timeout=timeout)
        try:
            barrier.wait(timeout)
            r.t_send = time.monotonic()
            stream = c.completions.create(model=model_id, prompt=r.prompt, max_tokens=r.max_tokens,
                                          temperature=r.temperature, seed=r.seed, stream=True)
            with stream:
                for chunk in stream:
                    ch = chunk.choices[0] if chunk.choices else None
                    if ch is None:
                        continue
                    ids = (ch.model_extra or {}).get("token_ids") or []
                    if ids and r.t_first is None:
                        r.t_first = time.monotonic()
                    r.tokens += ids
                    r.text += ch.text or ""
                    if ch.finish_reason:
                        r.finish_reason = ch.finish_reason
                    if r.disconnect_after is not None and len(r.tokens) >= r.disconnect_after:
                        r.outcome = "aborted"
                        break  # leaving the `with` closes the connection mid-stream
            if r.outcome != "aborted":
                r.outcome = "completed" if r.finish_reason else "error"
                if r.outcome == "error":
                    r.error = "the stream ended without a finish_reason"
        except openai.APIStatusError as e:
            code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
            if e.status_code == 503 and code == "queue_full":
                r.outcome = "refused"
            else:
                r.outcome, r.error = "error", f"{e.status_code}: {e.message}"
        except Exception as e:  # a load test reports, it does not die: the error is counted
            r.outcome, r.error = "error", f"{type(e).__name__}: {e}"
        finally:
            r.t_end = time.monotonic()
            c.close()

    threads = [threading.Thread(target=client, args=(r,), daemon=True) for r in todo]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    wall = max((r.t_end or t0) for r in todo) - min((r.t_send or t0) for r in todo)
    rates = (before, alone()) if alone else ()
    refs = {}
    for r in todo:
        if r.outcome not in ("completed", "aborted"):
            continue
        n = r.max_tokens if r.outcome == "completed" else len(r.tokens)  # an aborted client: a prefix
        key = (r.prompt, r.temperature, r.seed if r.temperature else 0, n)
        if key not in refs:
            refs[key] = list(reference(r.prompt, r.temperature, r.seed, n))
        r.wrong = r.tokens != refs[key]
        if r.outcome == "completed" and decode is not None:
            r.wrong = r.wrong or r.text != decode(r.tokens)
    return LoadReport(todo, wall, rates)
