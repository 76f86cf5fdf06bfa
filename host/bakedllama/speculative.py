"""Speculative decoding: the baked model drafts, a larger model (the target) verifies.

Each round the draft continues the accepted text by K tokens; the target scores the new context
positions plus the K drafts in one pass (K + 1 predictions); the longest prefix of drafts that
the target agrees with is accepted, plus the target's own next token. Both sides then rewind
their KV caches to the accepted text (a position set back: the cache entries past it are simply
overwritten by the next tokens). Greedy output is therefore exactly the target's own greedy
output, for every K.

Drafts and targets are small classes with one method each, so the device (board or simulation),
the golden model and the target's integer runner plug into the same loop:
    draft.draft(context, k) -> k token ids (greedy continuation of `context`)
    target.score(context, drafts) -> len(drafts) + 1 greedy predictions
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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

    def _set_pos(self, pos: int) -> None:
        self.s.pos = pos

    def _feed(self, t: int):
        self.positions.append(len(self.fed))
        self.fed.append(int(t))
        self.passes += 1
        return self.g.forward(self.s, [int(t)])

    def draft(self, context: list[int], k: int) -> list[int]:
        n = self._resume(context)
        logits = None
        for t in context[n:]:
            logits = self._feed(t)
        out = []
        for i in range(k):
            out.append(int(nx.argmax(logits.acc)[0]))
            if i + 1 < k:
                logits = self._feed(out[-1])
        return out


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
        dev.reset()  # position 0: nothing cached

    def _set_pos(self, pos: int) -> None:
        pass  # the DRAFT request carries the position

    def draft(self, context: list[int], k: int) -> list[int]:
        n = self._resume(context)
        feed = [int(t) for t in context[n:]]
        r = self.dev.draft(n, feed, k, self.cfg.vocab_size)
        self.positions += list(range(n, n + len(feed) + k - 1))
        self.fed += feed + r.tokens[:-1]
        self.passes += len(feed) + k - 1
        self.cycles += r.cycles
        self.wall_cycles += r.wall_cycles
        self.requests += 1
        return r.tokens


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

    def score(self, context: list[int], drafts: list[int]) -> list[int]:
        t0 = time.perf_counter()
        n = self._resume(context)
        feed = [int(t) for t in context[n:]] + [int(t) for t in drafts]
        logits = self.r.forward_many(self.s, feed)
        self.fed += feed
        # the predictions after the last context token and after every draft
        preds = [int(t) for t in nx.argmax(logits.acc[len(feed) - len(drafts) - 1:])]
        self.passes += len(feed)
        self.pass_tokens.append(len(feed))
        self.seconds += time.perf_counter() - t0
        return preds


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


def speculate(draft, target, prompt_ids: list[int], max_tokens: int, k: int,
              on_token=None, stop_ids=()) -> SpecResult:
    """Greedy speculative generation of max_tokens tokens after prompt_ids; k = 0 runs the
    target alone (one prediction per pass)."""
    seq_len = min(draft.cfg.seq_len if draft is not None else 1 << 30, target.cfg.seq_len)
    if not prompt_ids:
        raise ValueError("empty prompt")
    if k < 0:
        raise ValueError("the number of draft tokens must be >= 0")
    if len(prompt_ids) + max_tokens > seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + {max_tokens} new tokens exceeds the "
                         f"context of {seq_len}")
    res = SpecResult()
    ctx = list(prompt_ids)
    t0 = time.perf_counter()
    while len(res.tokens) < max_tokens:
        # drafts beyond the last needed token are wasted; the target needs room for them too
        kk = min(k, max_tokens - len(res.tokens) - 1, seq_len - len(ctx))
        d = draft.draft(ctx, kk) if kk > 0 else []
        preds = target.score(ctx, d)
        m = common_prefix(d, preds)
        new = d[:m] + [preds[m]]
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
