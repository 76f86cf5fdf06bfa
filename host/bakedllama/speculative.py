"""Speculative decoding: the baked model drafts, a larger model (the target) verifies.

Each round the draft continues the accepted text by K tokens; the target scores the new context
positions plus the K drafts in one pass (K + 1 predictions); the longest prefix of drafts that
the target agrees with is accepted, plus the target's own next token. Both sides then rewind
their KV caches to the accepted text (a position set back: the cache entries past it are simply
overwritten by the next tokens). Greedy output is therefore exactly the target's own greedy
output, for every K.

With a temperature the loop is speculative sampling (Leviathan et al. 2023; Chen et al. 2023),
exact in integers: every distribution is the integer sampler's own (numerics.sample_counts: counts
of the 2^32 generator values, so p(x) = P[x] / 2^32 exactly). Draft x ~ q is accepted with
probability min(1, p(x) / q(x)) (a host draw u in [0, Q[x]) accepted if u < P[x]); at the first
rejection the token comes from the residual max(0, P - Q); after K acceptances the bonus token
from P. The output is then distributed exactly as the target sampling alone. The chip reports
Q[x] of each draft with it (DRAFT_SAMPLED) and a whole distribution only where a rejection needs
it (one pass rerun, then LOGITS).

Drafts and targets are small classes, so the device (board or simulation), the golden model and
the target's integer runner plug into the same loop:
    draft.draft(context, k, inv_t=0) -> k token ids (greedy, or sampled at 1/T = inv_t in Q8;
        then draft.draws holds each draft's count Q[x] and draft.counts(j) the whole Q of draft j)
    target.score(context, drafts) -> len(drafts) + 1 greedy predictions
    target.logits(context, drafts) -> the len(drafts) + 1 rows of Q8 logits behind them
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from bakedllama import numerics as nx


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Rewinding:
    """The tokens a model's KV cache holds (positions 0 .. len - 1) and the rewind to a context."""

    def __init__(self):
        self.fed: list[int] = []
        self.passes = 0  # forward passes run (one per token fed)
        self.positions: list[int] = []  # the position of every pass run

    def _resume(self, context: list[int]) -> int:
        """Rewind to the longest cached prefix of `context` that leaves its last token to feed
        (its logits are not kept); returns the position to feed from."""
        n = min(common_prefix(self.fed, context), len(context) - 1)
        self._set_pos(n)
        del self.fed[n:]
        return n

    def _set_pos(self, pos: int) -> None:
        raise NotImplementedError


class GoldenDraft(_Rewinding):
    """The baked model on the golden path (bit-exact with the chip) as the draft."""

    name = "golden"

    def __init__(self, model):
        from bakedllama.golden import Golden

        super().__init__()
        self.g = Golden(model)
        self.cfg = model.cfg
        self.s = self.g.new_state(1)
        self.rng = nx.XorShift32(0)  # the device's generator after RESET
        self.draws: list[int] = []
        self.sampled: list = []  # per pass: the token its sampler drew, None for greedy
        self.reruns = 0  # passes a rejected draft's distribution costs (counted as on the chip)

    def _set_pos(self, pos: int) -> None:
        self.s.pos = pos

    def reseed(self, seed: int) -> None:
        """The chip's sampler generator, seeded as RESET with `seed` seeds the device's (and, like
        RESET, back to position 0)."""
        self.rng = nx.XorShift32(seed)
        self.fed.clear()

    def _feed(self, t: int):
        self.positions.append(len(self.fed))
        self.sampled.append(None)
        self.fed.append(int(t))
        self.passes += 1
        return self.g.forward(self.s, [int(t)])

    def draft(self, context: list[int], k: int, inv_t: int = 0) -> list[int]:
        n = self._resume(context)
        logits = None
        for t in context[n:]:
            logits = self._feed(t)
        out, self.draws, self._q = [], [], []
        for i in range(k):
            if inv_t:
                q8 = logits.q8()[0]
                out.append(nx.sample(q8, inv_t, self.rng))
                self.sampled[-1] = out[-1]  # the pass drew it (the board's sampler cycles)
                self._q.append(nx.sample_counts(q8, inv_t))
                self.draws.append(int(self._q[-1][out[-1]]))
            else:
                out.append(int(nx.argmax(logits.acc)[0]))
            if i + 1 < k:
                logits = self._feed(out[-1])
        self._first, self._seq = len(context) - 1, list(context) + out
        return out

    def counts(self, j: int) -> np.ndarray:
        """The whole sampler distribution (counts) behind draft j of the last sampled draft. The
        golden path kept its logits; the chip runs that pass again, so the pass is counted here
        too (at its position, greedy) and both drafts show the same passes."""
        n = self._first + j
        del self.fed[n:]
        self.fed.append(self._seq[n])
        self.positions.append(n)
        self.sampled.append(None)
        self.passes += 1
        self.reruns += 1
        self.s.pos = n + 1
        return self._q[j]


class DeviceDraft(_Rewinding):
    """The chip (a board or the Verilator SoC) as the draft, through the DRAFT request: one
    request per round rewinds it, feeds the new context tokens and drafts k tokens."""

    name = "device"

    def __init__(self, dev, cfg):
        super().__init__()
        self.dev, self.cfg = dev, cfg
        self.cycles = 0  # hardware counter over every draft pass
        self.wall_cycles = 0  # firmware timer over every DRAFT request
        self.requests = 0
        self.reruns = 0  # passes run again for a rejected draft's distribution (LOGITS)
        dev.reset()  # position 0: nothing cached

    def reseed(self, seed: int) -> None:
        self.dev.reset(seed)  # position 0 too: nothing cached
        self.fed.clear()

    def _set_pos(self, pos: int) -> None:
        pass  # the DRAFT request carries the position

    def _request(self, n: int, feed: list[int], k: int, inv_t: int):
        r = self.dev.draft(n, feed, k, self.cfg.vocab_size, inv_t or None)
        self.positions += list(range(n, n + len(feed) + k - 1))
        self.fed += feed + r.tokens[:-1]
        self.passes += len(feed) + k - 1
        self.cycles += r.cycles
        self.wall_cycles += r.wall_cycles
        self.requests += 1
        return r

    def draft(self, context: list[int], k: int, inv_t: int = 0) -> list[int]:
        n = self._resume(context)
        feed = [int(t) for t in context[n:]]
        r = self._request(n, feed, k, inv_t)
        self._inv_t, self._base = inv_t, (list(context), r.tokens)
        self.draws = [nx.draw_count(*d) for d in r.draws]
        return r.tokens

    def counts(self, j: int) -> np.ndarray:
        """Draft j's whole distribution: the chip runs that pass again (a one-token DRAFT from
        its position), then its logits come back (LOGITS); checked against the draw it reported."""
        from bakedllama.device.transport import DeviceError

        context, drafts = self._base
        seq = context + drafts[:j]
        n = len(seq) - 1
        self._set_pos(n)
        del self.fed[n:]
        self._request(n, [seq[-1]], 1, 0)
        self.reruns += 1
        q = nx.sample_counts(np.asarray(self.dev.logits(self.cfg.vocab_size), dtype=np.int64),
                             self._inv_t)
        if q[drafts[j]] != self.draws[j]:
            raise DeviceError(f"{self.dev.url}: the logits of draft {j} give it {q[drafts[j]]} of "
                              f"2^32 draws, the device reported {self.draws[j]}")
        return q


class RunnerTarget(_Rewinding):
    """The target model on the integer runner (llama8b.runner): each score() is one pass over the
    weights for all its positions (Runner.forward_many)."""

    name = "runner"

    def __init__(self, runner):
        super().__init__()
        self.r = runner
        self.cfg = runner.cfg
        self.s = runner.new_state()
        self.seconds = 0.0  # time spent scoring
        self.pass_tokens: list[int] = []  # tokens fed per scoring pass

    def _set_pos(self, pos: int) -> None:
        self.s.pos = pos

    def _pass(self, context: list[int], drafts: list[int]):
        """One scoring pass; the Logits rows after the last context token and after every draft."""
        t0 = time.perf_counter()
        n = self._resume(context)
        feed = [int(t) for t in context[n:]] + [int(t) for t in drafts]
        logits = self.r.forward_many(self.s, feed)
        self.fed += feed
        self.passes += len(feed)
        self.pass_tokens.append(len(feed))
        self.seconds += time.perf_counter() - t0
        keep = len(feed) - len(drafts) - 1
        return type(logits)(logits.acc[keep:], logits.frac[keep:])

    def score(self, context: list[int], drafts: list[int]) -> list[int]:
        return [int(t) for t in nx.argmax(self._pass(context, drafts).acc)]

    def logits(self, context: list[int], drafts: list[int]) -> np.ndarray:
        return self._pass(context, drafts).q8()


@dataclass
class SpecResult:
    tokens: list = field(default_factory=list)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of them, accepted
    rounds: int = 0  # target passes (one per round)
    per_round: list = field(default_factory=list)  # accepted drafts per round
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        n = len(self.tokens)
        return dict(tokens=self.tokens, drafted=self.drafted, accepted=self.accepted,
                    acceptance_rate=round(self.accepted / self.drafted, 4) if self.drafted else None,
                    target_passes=self.rounds,
                    mean_accepted=round(self.accepted / self.rounds, 4) if self.rounds else None,
                    tokens_per_target_pass=round(n / self.rounds, 4) if self.rounds else None,
                    wall_s=round(self.wall_s, 4))


def _pick(counts, rng) -> int:
    """A token drawn from integer counts (exactly proportional to them) with the host's generator."""
    c = np.cumsum(np.asarray(counts, dtype=np.int64))
    return int(np.searchsorted(c, int(rng.integers(0, int(c[-1]))), side="right"))


def verify_sampled(draft, drafts: list[int], p_rows: np.ndarray, inv_t: int, top_k: int,
                   rng) -> tuple[int, int]:
    """Speculative sampling's verification of one round, exact in integers.

    drafts: the K drafted tokens (draft.draws their counts Q[x], draft.counts(j) the whole Q);
    p_rows: the target's K + 1 rows of Q8 logits; returns (accepted drafts m, the next token)."""
    for j, x in enumerate(drafts):
        p = nx.sample_counts(p_rows[j], inv_t, top_k)
        q_x = draft.draws[j]
        if int(rng.integers(0, q_x)) < p[x]:  # accepted with probability min(1, P[x] / Q[x])
            continue
        q = draft.counts(j)
        residual = [max(0, int(a) - int(b)) for a, b in zip(p, q)]
        return j, _pick(residual, rng)  # sum > 0: P[x] < Q[x] here, so P != Q
    return len(drafts), _pick(nx.sample_counts(p_rows[len(drafts)], inv_t, top_k), rng)


def speculate(draft, target, prompt_ids: list[int], max_tokens: int, k: int,
              on_token=None, stop_ids=(), temperature: float = 0.0, top_k: int = 0,
              seed: int = 0, draft_temperature: float | None = None) -> SpecResult:
    """Speculative generation of max_tokens tokens after prompt_ids; k = 0 runs the target alone
    (one prediction per pass). temperature 0: greedy, the target's own greedy output. Else
    speculative sampling: the output is distributed as the target's integer sampler at
    `temperature` / `top_k` alone; the draft samples at `draft_temperature` (default the same;
    any value stays exact, only the acceptance changes), its generator seeded with `seed`, the
    host's acceptance draws from numpy's generator seeded with (seed, 1)."""
    seq_len = min(draft.cfg.seq_len if draft is not None else 1 << 30, target.cfg.seq_len)
    if not prompt_ids:
        raise ValueError("empty prompt")
    if k < 0:
        raise ValueError("the number of draft tokens must be >= 0")
    if len(prompt_ids) + max_tokens > seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + {max_tokens} new tokens exceeds the "
                         f"context of {seq_len}")
    inv_t = nx.temperature_q8(temperature) if temperature > 0 else 0
    d_inv_t = inv_t if draft_temperature is None else (
        nx.temperature_q8(draft_temperature) if draft_temperature > 0 else 0)
    if inv_t and not d_inv_t:
        raise ValueError("a greedy draft cannot be verified by sampling: give the draft a temperature")
    rng = np.random.default_rng([seed, 1])
    if inv_t and draft is not None:
        draft.reseed(seed)
    res = SpecResult()
    ctx = list(prompt_ids)
    t0 = time.perf_counter()
    while len(res.tokens) < max_tokens:
        # drafts beyond the last needed token are wasted; the target needs room for them too
        kk = min(k, max_tokens - len(res.tokens) - 1, seq_len - len(ctx))
        if inv_t:
            d = draft.draft(ctx, kk, d_inv_t) if kk > 0 else []
            m, nxt = verify_sampled(draft, d, target.logits(ctx, d), inv_t, top_k, rng)
        else:
            d = draft.draft(ctx, kk) if kk > 0 else []
            preds = target.score(ctx, d)
            m = common_prefix(d, preds)
            nxt = preds[m]
        new = d[:m] + [nxt]
        res.rounds += 1
        res.drafted += len(d)
        res.accepted += m
        res.per_round.append(m)
        for t in new:
            res.tokens.append(t)
            ctx.append(t)
            if on_token is not None:
                on_token(t)
            if t in stop_ids:
                res.wall_s = time.perf_counter() - t0
                return res
    res.wall_s = time.perf_counter() - t0
    return res


def open_target(path, bits: str = "8", cache_dir=None, log=None):
    """A Hugging Face Llama directory (e.g. weights/target) -> RunnerTarget (unpartitioned,
    resident: the target is the 'big model on general hardware')."""
    from bakedllama.llama8b import quant
    from bakedllama.llama8b.checkpoint import CACHE_DIR, open_checkpoint
    from bakedllama.llama8b.partition import plan
    from bakedllama.llama8b.runner import Runner

    ck = open_checkpoint(str(path), show_progress=False)
    qm = quant.quantized(ck, bits, "fast", cache_dir or CACHE_DIR, show_progress=False, log=log)
    r = Runner(qm, plan(qm.cfg, qm.fmt, None), streaming=False)
    s = r.new_state()  # warm up (kernel compilation, unpacked weights) before anything is timed
    r.forward(s, 0)
    r.forward_many(s, [0, 0])
    return RunnerTarget(r), ck


def check_shared_vocab(model, ck, tok) -> None:
    """The draft must share the target's vocabulary and tokenizer (token ids mean the same)."""
    if ck.cfg.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"the target's vocabulary has {ck.cfg.vocab_size} tokens, the draft's "
                         f"{model.cfg.vocab_size}")
    ttk = ck.tokenizer()
    probe = "It is a truth universally acknowledged, that a single man in possession"
    if ttk.encode(probe, add_special_tokens=False).ids != tok.encode(probe, bos=False):
        raise ValueError("the target's tokenizer differs from the draft's (same vocabulary size, "
                         "other merges)")
    if ck.special.bos != tok.bos_id:
        raise ValueError(f"the target's BOS is {ck.special.bos}, the draft's {tok.bos_id}")


def greedy_reference(target_runner, prompt_ids, max_tokens) -> list[int]:
    """The target alone, through llama8b.runner.generate (independent of the loop above)."""
    from bakedllama.llama8b.runner import generate

    return generate(target_runner, list(prompt_ids), max_tokens)["tokens"]
