"""`bakedllama generate PROMPT --target DIR [--draft-tokens K]`: speculative decoding with the
baked model as the draft (on the device, the Verilator SoC or golden) and the target model on the
host's integer runner. Prints the text as it is accepted; --json gives the figures."""

from __future__ import annotations

import time

DEFAULT_DRAFT_TOKENS = 4


def board_engine() -> dict:
    """The ULX3S engine the draft's cycles are priced at when the draft runs on golden."""
    from soc.common import LANES, SYS_CLK_FREQ, VLANES

    return dict(lanes=LANES, vlanes=VLANES, sys_clk_freq=SYS_CLK_FREQ)


def golden_draft_cycles(cfg, positions, sampled=None) -> int:
    """The hardware counter the board's engine would show for these passes (the cycle model,
    which the Verilator tests tie to the counter); sampled: per pass the token its sampler drew
    (None: greedy)."""
    from gateware import cycle_model as cm

    e = board_engine()
    per = {}
    sampled = sampled or [None] * len(positions)
    for key in zip(positions, sampled):
        if key not in per:
            per[key] = cm.expected_cycles(cfg, e["lanes"], key[0], vlanes=e["vlanes"], sampled=key[1])
    return sum(per[key] for key in zip(positions, sampled))


def run(args, model, tok, ids, stream, log) -> dict:
    """The speculative generation; raises ValueError / ModelFileError / DeviceError for the CLI."""
    from bakedllama import speculative as S

    k = DEFAULT_DRAFT_TOKENS if args.draft_tokens is None else args.draft_tokens
    if k < 0:
        raise ValueError("--draft-tokens must be >= 0")
    target, ck = S.open_target(args.target, log=log)
    S.check_shared_vocab(model, ck, tok)
    device = args.device or "sim"
    import contextlib

    with contextlib.ExitStack() as stack:
        info = None
        if k == 0:
            draft = None
        elif device == "golden":
            draft = S.GoldenDraft(model)
        else:
            from bakedllama.device import connect_checked

            st, dev, info = connect_checked(None if device == "sim" else device, model, log)
            stack.enter_context(st)
            device = dev.url
            draft = S.DeviceDraft(dev, model.cfg)
        t0 = time.perf_counter()
        sampling = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        res = S.speculate(draft, target, ids, args.max_tokens, k, on_token=stream.push, **sampling)
        wall = time.perf_counter() - t0
        # the target alone, for the projection, under the same conditions (a running simulation
        # takes a core from the host's runner)
        if draft is not None:
            alone = S.RunnerTarget(target.r)
            ref = S.speculate(None, alone, ids, args.max_tokens, 0, **sampling)
    out = dict(res.as_dict(), draft_tokens=k, device=device, draft_passes=draft.passes if draft else 0,
               temperature=args.temperature, top_k=args.top_k, seed=args.seed,
               draft_reruns=draft.reruns if draft else 0,
               tokens_per_s=round(len(res.tokens) / wall, 2) if wall > 0 else None,
               target_seconds=round(target.seconds, 4), target_tokens_fed=target.passes)
    # the projection: the draft at the board's rate (its own hardware counter on a device, the
    # cycle model of the board's engine on golden), the target at its measured host rate
    if draft is not None:
        if isinstance(draft, S.DeviceDraft):
            cycles, clock = draft.cycles, info.sys_clk_freq
        else:
            cycles, clock = (golden_draft_cycles(model.cfg, draft.positions, draft.sampled),
                             board_engine()["sys_clk_freq"])
        if not args.temperature and ref.tokens != res.tokens:  # greedy: cannot happen, the loop
            raise RuntimeError("speculative output differs from the target alone")  # accepts agreement
        spec_s = cycles / clock + target.seconds
        out.update(draft_cycles=cycles, draft_clock_hz=clock,
                   draft_seconds_at_board=round(cycles / clock, 6),
                   target_alone_seconds=round(alone.seconds, 4),
                   projected_speedup=round(alone.seconds / spec_s, 3) if spec_s > 0 else None,
                   projected_tokens_per_s=round(len(res.tokens) / spec_s, 1) if spec_s > 0 else None)
    return out
