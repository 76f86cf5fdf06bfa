"""Link torture: malformed frames and noise against a device, with the figures the issue asks for.

Each round sends one kind of damage (random bytes, truncated frames, bit flips, wrong CRC,
oversized frames and prompts, out-of-range tokens, unknown types, wrong versions and lengths),
checks the ERROR reply where the protocol promises one, then checks that a valid ECHO with a random
nonce is still answered. Every few rounds a generation is compared with a reference. Deterministic
for a given seed."""

from __future__ import annotations

import random
import struct
import time
from dataclasses import asdict, dataclass, field

from bakedllama.device import protocol as P
from bakedllama.device.transport import Device, DeviceError, _Timeout

KINDS = ("noise", "truncated", "bitflip", "bad_crc", "too_long", "long_prompt", "bad_token",
         "unknown_type", "bad_version", "bad_length", "bad_generate")


@dataclass
class FuzzReport:
    frames_sent: int = 0  # every frame-like thing put on the link, valid or not
    malformed: int = 0  # damaged / invalid frames and noise bursts
    errors_expected: int = 0  # malformed frames for which the protocol promises an ERROR
    errors_answered: int = 0  # ... and that ERROR arrived (right code, right seq)
    valid_requests: int = 0
    valid_answered: int = 0
    hangs: int = 0  # valid requests not answered (after retries)
    generations: int = 0
    tokens_checked: int = 0
    wrong_tokens: int = 0
    by_kind: dict = field(default_factory=dict)
    wall_s: float = 0.0
    device_stats: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _wait_error(dev: Device, seq: int, code: int | tuple, deadline: float) -> bool:
    """Wait for an ERROR with this seq (0 for seq-less errors) and one of these codes."""
    codes = code if isinstance(code, tuple) else (code,)
    try:
        while True:
            f = dev._wait(seq, deadline, "ERROR")
            if f.type == P.ERROR and P.ErrorReply.parse(f.payload).code in codes:
                return True
    except _Timeout:
        return False


def _sync(dev: Device, rng: random.Random, rep: FuzzReport) -> bool:
    """A valid ECHO with a nonce must come back (stale frames before it are skipped)."""
    nonce = bytes(rng.getrandbits(8) for _ in range(8))
    rep.valid_requests += 1
    rep.frames_sent += 1
    try:
        ok = dev.echo(nonce) == nonce
    except DeviceError:
        ok = False
    if ok:
        rep.valid_answered += 1
    else:
        rep.hangs += 1
    return ok


def _frame_raw(type_: int, seq: int, payload: bytes, version: int = P.VERSION,
               crc_xor: int = 0) -> bytes:
    body = bytes((version, type_, seq)) + payload
    return body + struct.pack("<I", P.crc32(body) ^ crc_xor)


def run_fuzz(dev: Device, info: P.Info, reference, prompts, rounds: int = 200, seed: int = 1,
             gen_every: int = 25, max_tokens: int = 16, log=None) -> FuzzReport:
    """reference(prompt, max_tokens, inv_temperature_q8, seed) -> expected tokens."""
    rng = random.Random(seed)
    rep = FuzzReport()
    t0 = time.monotonic()
    vocab, seq_len = info.vocab_size, info.seq_len

    def generation(i: int) -> None:
        prompt = prompts[i % len(prompts)]
        inv_t = 0 if i % 2 == 0 else 200
        gseed = rng.getrandbits(32)
        want = reference(prompt, max_tokens, inv_t, gseed)
        rep.generations += 1
        rep.frames_sent += 1 + (len(prompt) + P.PROMPT_CHUNK - 1) // P.PROMPT_CHUNK
        try:
            got = list(dev.generate(prompt, max_tokens, seed=gseed, inv_temperature_q8=inv_t))
        except DeviceError as e:
            if log:
                log(f"generation failed: {e}")
            rep.hangs += 1
            got = []
        rep.tokens_checked += len(want)
        rep.wrong_tokens += sum(1 for k in range(len(want))
                                if k >= len(got) or got[k] != want[k])

    generation(0)
    for r in range(rounds):
        kind = KINDS[r % len(KINDS)]
        rep.by_kind[kind] = rep.by_kind.get(kind, 0) + 1
        seq = dev._next_seq()
        deadline = time.monotonic() + dev.timeout
        expect = None  # (seq, codes) of the promised ERROR
        if kind == "noise":
            n = rng.randint(1, 300)
            raw = bytes(rng.getrandbits(8) for _ in range(n))
            dev.send_raw(raw)
        elif kind == "truncated":
            enc = P.cobs_encode(_frame_raw(P.ECHO, seq, bytes(rng.getrandbits(8)
                                                            for _ in range(rng.randint(0, 40)))))
            cut = rng.randint(1, len(enc) - 1)
            dev.send_raw(b"\x00" + enc[:cut] + b"\x00")
            # Truncated COBS (BAD_FRAME) or a cut at a block end (BAD_CRC / BAD_FRAME if short);
            # the seq survives when the code byte and 3 header bytes got through.
            expect = (seq if cut >= 4 else 0, (P.E_BAD_FRAME, P.E_BAD_CRC))
        elif kind == "bitflip":
            enc = bytearray(P.cobs_encode(_frame_raw(P.ECHO, seq, b"fuzz" * rng.randint(0, 8))))
            for _ in range(rng.randint(1, 3)):
                k = rng.randrange(len(enc))
                enc[k] ^= 1 << rng.randrange(8)
            dev.send_raw(b"\x00" + bytes(enc) + b"\x00")
        elif kind == "bad_crc":
            f = _frame_raw(P.INFO, seq, b"", crc_xor=rng.getrandbits(32) | 1)
            dev.send_raw(b"\x00" + P.cobs_encode(f) + b"\x00")
            expect = (seq, P.E_BAD_CRC)
        elif kind == "too_long":
            f = _frame_raw(P.ECHO, seq, bytes(rng.getrandbits(8)
                                              for _ in range(P.MAX_PAYLOAD + rng.randint(1, 600))))
            dev.send_raw(b"\x00" + P.cobs_encode(f) + b"\x00")
            expect = (0, P.E_TOO_LONG)
        elif kind == "long_prompt":
            n = min(seq_len + rng.randint(1, 8), P.PROMPT_CHUNK)
            f = _frame_raw(P.PROMPT, seq, P.prompt_payload(0, [1] * n))
            dev.send_raw(b"\x00" + P.cobs_encode(f) + b"\x00")
            expect = (seq, P.E_OUT_OF_RANGE if n > seq_len else ())
        elif kind == "bad_token":
            toks = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
            toks[rng.randrange(len(toks))] = rng.randint(vocab, 0xFFFF)
            f = _frame_raw(P.PROMPT, seq, P.prompt_payload(0, toks))
            dev.send_raw(b"\x00" + P.cobs_encode(f) + b"\x00")
            expect = (seq, P.E_OUT_OF_RANGE)
        elif kind == "unknown_type":
            t = rng.choice([0x00, 0x0B, 0x44, 0x81, 0x84, 0xFE, 0xFF, rng.randint(0x0B, 0x7F)])
            f = _frame_raw(t, seq, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 10))))
            dev.send_raw(b"\x00" + P.cobs_encode(f) + b"\x00")
            expect = (seq, P.E_UNKNOWN_TYPE)
        elif kind == "bad_version":
            f = _frame_raw(P.INFO, seq, b"", version=rng.choice([0, 3, 0x7F, 0xFF]))
            dev.send_raw(b"\x00" + P.cobs_encode(f) + b"\x00")
            expect = (seq, P.E_BAD_VERSION)
        elif kind == "bad_length":
            t, n = rng.choice([(P.INFO, 1), (P.STATS, 3), (P.RESET, 2), (P.ABORT, 1),
                               (P.GENERATE, 7), (P.GENERATE, 9), (P.PROMPT, 1), (P.PROMPT, 5),
                               (P.RESET, 5), (P.LOGITS, 3), (P.DRAFT_SAMPLED, 5)])
            f = _frame_raw(t, seq, bytes(rng.getrandbits(8) for _ in range(n)))
            dev.send_raw(b"\x00" + P.cobs_encode(f) + b"\x00")
            expect = (seq, P.E_BAD_LENGTH)
        elif kind == "bad_generate":
            # Without a prompt (after a RESET) or asking for too many tokens.
            if rng.random() < 0.5:
                dev.reset()
                rep.frames_sent += 1
                f = _frame_raw(P.GENERATE, seq, P.generate_payload(4, 0, 0))
                code = P.E_BAD_STATE
            else:
                dev.set_prompt([1, 2, 3])
                rep.frames_sent += 1
                f = _frame_raw(P.GENERATE, seq, P.generate_payload(
                    rng.choice([0, seq_len - 2, 0xFFFF]), 0, 0))
                code = P.E_OUT_OF_RANGE
            dev.send_raw(b"\x00" + P.cobs_encode(f) + b"\x00")
            expect = (seq, code)
        rep.frames_sent += 1
        rep.malformed += 1
        if expect is not None and expect[1] != ():
            rep.errors_expected += 1
            if _wait_error(dev, expect[0], expect[1], deadline):
                rep.errors_answered += 1
        _sync(dev, rng, rep)
        if (r + 1) % gen_every == 0:
            generation(r + 1)
    generation(rounds + 1)
    try:
        rep.device_stats = asdict(dev.stats())
    except DeviceError:
        rep.hangs += 1
    rep.wall_s = round(time.monotonic() - t0, 2)
    return rep
