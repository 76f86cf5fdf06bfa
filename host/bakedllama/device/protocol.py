"""The serial protocol, version 1 (firmware/PROTOCOL.md): COBS framing, CRC-32, payloads.

The firmware implements the same document in C (firmware/proto.c, firmware/app.c); the tests check
that both produce the same bytes. Pure functions and data classes only: no I/O here."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

VERSION = 2  # v2: generation in a hardware loop, tokens in TOKENS batches (v1: STEP frames)
HEADER = 3  # version, type, seq
CRC_SIZE = 4
MAX_PAYLOAD = 1024
MIN_FRAME = HEADER + CRC_SIZE
MAX_FRAME = HEADER + MAX_PAYLOAD + CRC_SIZE
MAX_ENCODED = MAX_FRAME + (MAX_FRAME + 253) // 254  # COBS overhead, without the delimiter
CRC_RESIDUE = 0x2144DF1C

# The ULX3S's FT231X runs up to 3 Mbaud (its 3 MHz base clock, divisor 1: exact). Generated tokens
# travel in TOKENS batches of up to TOKENS_BATCH (2 bytes each + 17 bytes of frame), 2.53 bytes per
# token when batches are full: 3 Mbaud carries ~118,000 tokens/s (protocol v1's one 21-byte STEP
# frame per pass carried 14,285). 2 Mbaud is the fallback if a board's link is marginal: build
# with --uart-baudrate 2e6, open with baudrate=.
DEFAULT_BAUDRATE = 3_000_000
BITS_PER_BYTE = 10  # 8N1

# Request types (host -> device); the reply is type | REPLY.
INFO, RESET, PROMPT, GENERATE, STATS, ABORT, ECHO, DRAFT = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08
DRAFT_SAMPLED, LOGITS = 0x09, 0x0A
REPLY = 0x80
TOKENS = 0x45  # v2: a batch of generated tokens (replaces v1's STEP frame per pass)
ERROR = 0xFF
REQUEST_NAMES = {INFO: "INFO", RESET: "RESET", PROMPT: "PROMPT", GENERATE: "GENERATE",
                 STATS: "STATS", ABORT: "ABORT", ECHO: "ECHO", DRAFT: "DRAFT",
                 DRAFT_SAMPLED: "DRAFT_SAMPLED", LOGITS: "LOGITS"}

# Error codes.
E_BAD_CRC, E_BAD_FRAME, E_TOO_LONG, E_BAD_VERSION, E_UNKNOWN_TYPE = 1, 2, 3, 4, 5
E_BAD_LENGTH, E_OUT_OF_RANGE, E_BAD_STATE, E_BUSY, E_HW_TIMEOUT = 6, 7, 8, 9, 10
ERROR_NAMES = {E_BAD_CRC: "BAD_CRC", E_BAD_FRAME: "BAD_FRAME", E_TOO_LONG: "TOO_LONG",
               E_BAD_VERSION: "BAD_VERSION", E_UNKNOWN_TYPE: "UNKNOWN_TYPE",
               E_BAD_LENGTH: "BAD_LENGTH", E_OUT_OF_RANGE: "OUT_OF_RANGE",
               E_BAD_STATE: "BAD_STATE", E_BUSY: "BUSY", E_HW_TIMEOUT: "HW_TIMEOUT"}
RETRANSMIT_ERRORS = (E_BAD_CRC, E_BAD_FRAME, E_TOO_LONG)  # the request did not arrive intact

DONE_COMPLETE, DONE_ABORTED, DONE_HW_TIMEOUT = 0, 1, 2
TOKENS_BATCH = 32  # tokens per TOKENS frame at most (firmware/proto.h)

BOARDS = {0: "native test build", 1: "Verilator simulation", 2: "ULX3S"}

INFO_FMT = struct.Struct("<BBBBI8IIHBB")  # 48 bytes
STATS_FMT = struct.Struct("<6IHHIII3Q")  # 64 bytes
DONE_FMT = struct.Struct("<HHBB3Q")  # 30 bytes
TOKENS_HEAD_FMT = struct.Struct("<HBBI")  # TOKENS: first token's index, n, 0, cycles of the batch
ERROR_FMT = struct.Struct("<BBH")
GENERATE_FMT = struct.Struct("<HHI")
DRAFT_HEAD_FMT = struct.Struct("<HHII")  # DRAFT reply: pos after, drafts, cycles, wall cycles
DRAFT_ITEM_FMT = struct.Struct("<HIII")  # DRAFT_SAMPLED reply, per draft: token, base, weight, total
LOGITS_HEAD_FMT = struct.Struct("<HH")  # LOGITS request and reply: start, count
LOGITS_MAX = (MAX_PAYLOAD - LOGITS_HEAD_FMT.size) // 4  # i32 logits per LOGITS reply


class ProtocolError(ValueError):
    """A frame or payload that does not follow the protocol."""


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def cobs_encode(data: bytes) -> bytes:
    """COBS without the delimiter; byte for byte what firmware/proto.c's cobs_write sends."""
    out = bytearray()
    i, n = 0, len(data)
    while True:
        j = i
        while j < n and data[j] != 0 and j - i < 254:
            j += 1
        code = j - i + 1
        out.append(code)
        out += data[i:j]
        if j == n:
            return bytes(out)
        i = j if code == 0xFF else j + 1


def cobs_decode(enc: bytes) -> bytes:
    """Inverse of cobs_encode; raises ProtocolError on a zero byte or a truncated block."""
    out = bytearray()
    i, n, zero_due = 0, len(enc), False
    while i < n:
        code = enc[i]
        if code == 0:
            raise ProtocolError("zero byte inside a COBS frame")
        if i + code > n:
            raise ProtocolError("truncated COBS block")
        if zero_due:
            out.append(0)
        out += enc[i + 1:i + code]
        if 0 in enc[i + 1:i + code]:
            raise ProtocolError("zero byte inside a COBS frame")
        zero_due = code != 0xFF
        i += code
    return bytes(out)


def frame_bytes(type_: int, seq: int, payload: bytes = b"") -> bytes:
    """The decoded frame: header, payload, CRC-32."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = bytes((VERSION, type_ & 0xFF, seq & 0xFF)) + bytes(payload)
    return body + struct.pack("<I", crc32(body))


def encode(type_: int, seq: int, payload: bytes = b"") -> bytes:
    """A frame on the wire: COBS(frame) + 0x00."""
    return cobs_encode(frame_bytes(type_, seq, payload)) + b"\x00"


@dataclass(frozen=True)
class Frame:
    type: int
    seq: int
    payload: bytes


@dataclass(frozen=True)
class BadFrame:
    """Bytes between two delimiters that are not a valid frame (noise, a text line, corruption)."""

    reason: str  # "cobs", "short", "crc", "too_long", "version"
    raw: bytes  # the encoded bytes (at most MAX_ENCODED kept)
    version: int | None = None  # a valid frame of another protocol version: that version


def decode_frame(enc: bytes) -> Frame | BadFrame:
    """One encoded frame (between delimiters, without them)."""
    if len(enc) > MAX_ENCODED:
        return BadFrame("too_long", enc[:MAX_ENCODED])
    try:
        f = cobs_decode(enc)
    except ProtocolError:
        return BadFrame("cobs", enc)
    if len(f) < MIN_FRAME:
        return BadFrame("short", enc)
    if len(f) > MAX_FRAME:
        return BadFrame("too_long", enc)
    if crc32(f[:-4]) != struct.unpack("<I", f[-4:])[0]:
        return BadFrame("crc", enc)
    if f[0] != VERSION:
        return BadFrame("version", enc, f[0])
    return Frame(f[1], f[2], f[3:-4])


class Decoder:
    """Splits a byte stream at 0x00 delimiters into Frame / BadFrame; memory stays bounded."""

    def __init__(self):
        self.buf = bytearray()
        self.overflow = False

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        out = []
        parts = bytes(data).split(b"\x00")
        for i, part in enumerate(parts):
            if not self.overflow:
                self.buf += part
                if len(self.buf) > MAX_ENCODED:
                    self.overflow = True
                    del self.buf[MAX_ENCODED:]
            if i == len(parts) - 1:
                break  # no delimiter after the last part (yet)
            if self.overflow:
                out.append(BadFrame("too_long", bytes(self.buf)))
            elif self.buf:
                out.append(decode_frame(bytes(self.buf)))
            self.buf.clear()
            self.overflow = False
        return out


# Payloads ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Info:
    protocol: int
    firmware: str
    testing_core: bool
    model_id: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    seq_len: int
    lanes: int
    sys_clk_freq: int
    max_payload: int
    board: int

    @classmethod
    def parse(cls, p: bytes) -> "Info":
        if len(p) != INFO_FMT.size:
            raise ProtocolError(f"INFO reply of {len(p)} bytes, expected {INFO_FMT.size}")
        v = INFO_FMT.unpack(p)
        return cls(v[0], f"{v[1]}.{v[2]}", bool(v[3] & 1), v[4], *v[5:13], v[13], v[14], v[15])

    @property
    def board_name(self) -> str:
        return BOARDS.get(self.board, f"board {self.board}")

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["model_id"] = f"{self.model_id:08x}"
        d["board"] = self.board_name
        return d


@dataclass(frozen=True)
class Tokens:
    first: int  # index of the batch's first generated token
    tokens: tuple
    cycles: int  # the hardware counter over the passes that made them

    @classmethod
    def parse(cls, p: bytes) -> "Tokens":
        if len(p) < TOKENS_HEAD_FMT.size:
            raise ProtocolError(f"TOKENS of {len(p)} bytes, expected at least {TOKENS_HEAD_FMT.size}")
        first, n, _, cycles = TOKENS_HEAD_FMT.unpack_from(p)
        if not 1 <= n <= TOKENS_BATCH or len(p) != TOKENS_HEAD_FMT.size + 2 * n:
            raise ProtocolError(f"TOKENS of {len(p)} bytes says {n} tokens")
        return cls(first, struct.unpack_from(f"<{n}H", p, TOKENS_HEAD_FMT.size), cycles)


def wire_bytes_per_token(batch: int = TOKENS_BATCH) -> float:
    """Bytes on the wire per generated token with full batches: header, TOKENS head, tokens and
    CRC, COBS's code bytes (one per 254) and the delimiter."""
    frame = HEADER + TOKENS_HEAD_FMT.size + 2 * batch + CRC_SIZE
    return (frame + -(-frame // 254) + 1) / batch


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    generated: int
    reason: int
    prefill_cycles: int
    decode_cycles: int
    wall_cycles: int

    @classmethod
    def parse(cls, p: bytes) -> "Done":
        if len(p) != DONE_FMT.size:
            raise ProtocolError(f"DONE of {len(p)} bytes, expected {DONE_FMT.size}")
        n_p, n_g, reason, _, pre, dec, wall = DONE_FMT.unpack(p)
        return cls(n_p, n_g, reason, pre, dec, wall)

    @property
    def passes(self) -> int:
        return self.prompt_tokens + max(self.generated - 1, 0)

    @property
    def cycles_per_token(self) -> float | None:
        """Mean hardware cycles of a forward pass over the whole generation (prompt included)."""
        return (self.prefill_cycles + self.decode_cycles) / self.passes if self.passes else None

    @property
    def wall_cycles_per_token(self) -> float | None:
        """The firmware timer from GENERATE to DONE per forward pass: cycles_per_token plus the
        firmware's and the link's share."""
        return self.wall_cycles / self.passes if self.passes else None


@dataclass(frozen=True)
class Stats:
    frames_ok: int
    frames_bad: int
    frames_too_long: int
    errors_sent: int
    generations: int
    hw_timeouts: int
    prompt_tokens: int
    generated: int
    min_cycles: int
    max_cycles: int
    prefill_cycles: int
    decode_cycles: int
    wall_cycles: int

    @classmethod
    def parse(cls, p: bytes) -> "Stats":
        if len(p) != STATS_FMT.size:
            raise ProtocolError(f"STATS reply of {len(p)} bytes, expected {STATS_FMT.size}")
        v = STATS_FMT.unpack(p)
        return cls(*v[:10], *v[11:])


@dataclass(frozen=True)
class ErrorReply:
    code: int
    request: int
    detail: int

    @classmethod
    def parse(cls, p: bytes) -> "ErrorReply":
        if len(p) != ERROR_FMT.size:
            raise ProtocolError(f"ERROR of {len(p)} bytes, expected {ERROR_FMT.size}")
        return cls(*ERROR_FMT.unpack(p))

    @property
    def name(self) -> str:
        return ERROR_NAMES.get(self.code, f"error {self.code}")

    def __str__(self) -> str:
        req = REQUEST_NAMES.get(self.request, f"type 0x{self.request:02x}")
        return f"{self.name} for {req} (detail {self.detail})"


@dataclass
class DraftReply:
    pos: int  # the accelerator's position after the draft (pos + context tokens + k - 1)
    tokens: list  # the drafted tokens (fewer than asked only if aborted)
    cycles: int  # hardware counter, summed over the passes
    wall_cycles: int  # firmware timer from the request to the reply

    draws: list = field(default_factory=list)  # DRAFT_SAMPLED: (base, weight, total) per token

    @classmethod
    def parse(cls, p: bytes, asked: int, vocab_size: int, sampled: bool = False) -> "DraftReply":
        name, item = ("DRAFT_SAMPLED", DRAFT_ITEM_FMT.size) if sampled else ("DRAFT", 2)
        if len(p) < DRAFT_HEAD_FMT.size:
            raise ProtocolError(f"{name} reply of {len(p)} bytes, expected at least {DRAFT_HEAD_FMT.size}")
        pos, k, cycles, wall = DRAFT_HEAD_FMT.unpack_from(p)
        if k > asked or len(p) != DRAFT_HEAD_FMT.size + item * k:
            raise ProtocolError(f"{name} reply of {len(p)} bytes says {k} tokens ({asked} asked)")
        if sampled:
            items = [DRAFT_ITEM_FMT.unpack_from(p, DRAFT_HEAD_FMT.size + item * i) for i in range(k)]
            toks = [it[0] for it in items]
            draws = [tuple(it[1:]) for it in items]
            for base, weight, total in draws:
                if total == 0 or weight == 0 or base + weight > total:
                    raise ProtocolError(f"{name} reply has an impossible draw (base {base}, "
                                        f"weight {weight}, total {total})")
        else:
            toks, draws = list(struct.unpack_from(f"<{k}H", p, DRAFT_HEAD_FMT.size)), []
        if any(t >= vocab_size for t in toks):
            raise ProtocolError(f"{name} reply has token {max(toks)} outside the vocabulary of "
                                f"{vocab_size}")
        return cls(pos, toks, cycles, wall, draws)


def draft_payload(pos: int, k: int, tokens, inv_t: int | None = None) -> bytes:
    """DRAFT (inv_t None) or DRAFT_SAMPLED (1/T in Q8, > 0) request payload."""
    tokens = list(tokens)
    name = "DRAFT" if inv_t is None else "DRAFT_SAMPLED"
    if not tokens:
        raise ProtocolError(f"{name} needs at least one context token")
    head = [pos, k] if inv_t is None else [pos, k, inv_t]
    if (not (0 <= pos <= 0xFFFF and 1 <= k <= 0xFFFF) or any(not 0 <= t <= 0xFFFF for t in tokens)
            or (inv_t is not None and not 1 <= inv_t <= 0xFFFF)):
        raise ProtocolError(f"{name} position, count, temperature and tokens must fit in 16 bits")
    if 2 * (len(head) + len(tokens)) > MAX_PAYLOAD:
        raise ProtocolError(f"{name} of {len(tokens)} context tokens does not fit one frame")
    return struct.pack(f"<{len(head) + len(tokens)}H", *head, *tokens)


def parse_logits(p: bytes, start: int, count: int) -> list[int]:
    """LOGITS reply: the asked range of the last pass's Q8 logits, checked against the request."""
    if len(p) != LOGITS_HEAD_FMT.size + 4 * count:
        raise ProtocolError(f"LOGITS reply of {len(p)} bytes, expected {LOGITS_HEAD_FMT.size + 4 * count}")
    s, n = LOGITS_HEAD_FMT.unpack_from(p)
    if (s, n) != (start, count):
        raise ProtocolError(f"LOGITS reply for {n} logits from {s}, asked {count} from {start}")
    return list(struct.unpack_from(f"<{count}i", p, LOGITS_HEAD_FMT.size))


def prompt_payload(offset: int, tokens) -> bytes:
    tokens = list(tokens)
    if not 0 <= offset <= 0xFFFF or any(not 0 <= t <= 0xFFFF for t in tokens):
        raise ProtocolError("prompt offset and tokens must fit in 16 bits")
    return struct.pack(f"<H{len(tokens)}H", offset, *tokens)


def generate_payload(max_tokens: int, inv_temperature_q8: int, seed: int) -> bytes:
    if not (0 <= max_tokens <= 0xFFFF and 0 <= inv_temperature_q8 <= 0xFFFF):
        raise ProtocolError("max_tokens and inv_temperature_q8 must fit in 16 bits")
    return GENERATE_FMT.pack(max_tokens, inv_temperature_q8, seed & 0xFFFFFFFF)


PROMPT_CHUNK = (MAX_PAYLOAD - 2) // 2  # tokens per PROMPT frame
