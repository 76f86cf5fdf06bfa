"""A device (board or simulation) behind a pyserial URL: requests, replies, timeouts, retries.

Every wait has a deadline, so a silent, babbling or vanished device ends in one DeviceError line,
never in a hang. Requests are idempotent (PROTOCOL.md), so each is retried a few times with a fresh
sequence number; replies with another sequence number (late, or from an earlier session) are
ignored."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field

from bakedllama.device import protocol as P

READ_SLICE = 0.05  # s, one read call; deadlines are checked between calls


class DeviceError(Exception):
    """The device cannot be used: one line for the user."""


class _Timeout(DeviceError):
    pass


@dataclass
class Generation:
    """One GENERATE: iterate for token ids as they arrive; `done` (cycle counts) at the end."""

    prompt_tokens: int
    max_tokens: int
    tokens: list = field(default_factory=list)
    batches: list = field(default_factory=list)  # Tokens frames of the last attempt
    token_cycles: list = field(default_factory=list)  # per token: its batch's mean pass cycles
    done: P.Done | None = None
    retries: int = 0
    t_start: float = 0.0
    t_first: float | None = None
    t_end: float | None = None
    aborted: bool | None = None  # after an early stop: the ABORT reply said a generation was running
    vocab_size: int | None = None  # tokens at or above it are refused
    _it: object = None
    _cancel: bool = False

    def __iter__(self):
        return self._it

    def __next__(self):
        return next(self._it)

    def close(self) -> None:
        """Stop early: the device aborts the generation."""
        if self._it is not None:
            self._it.close()

    def cancel(self) -> None:
        """Stop early from any thread: the iteration ends within one read slice (READ_SLICE), in
        the prompt passes too, and the device aborts the generation."""
        self._cancel = True

    @property
    def wall_s(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t_start

    @property
    def tokens_per_s(self) -> float | None:
        """End to end: tokens delivered / time from the request to the last token."""
        w = self.wall_s
        return len(self.tokens) / w if w else None

    @property
    def cycles_per_token(self) -> float | None:
        return self.done.cycles_per_token if self.done else None


class Device:
    def __init__(self, port, url: str, *, timeout: float = 2.0, step_timeout: float = 3.0,
                 retries: int = 3):
        self.port, self.url = port, url
        self.timeout, self.step_timeout, self.retries = timeout, step_timeout, retries
        self.decoder = P.Decoder()
        self.pending: list = []
        self._seq = int.from_bytes(os.urandom(1), "little") % 255 + 1
        self.vocab_size: int | None = None  # from the last INFO reply
        # What arrived that was not for us (for the error messages and the fuzz figures).
        self.noise = dict(bytes=0, bad_frames=0, stray_frames=0)

    # Link -----------------------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.port.close()
        except Exception:  # closing a dead link must not hide the first error
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _next_seq(self) -> int:
        self._seq = self._seq % 255 + 1
        return self._seq

    def _io_error(self, e: Exception) -> DeviceError:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return DeviceError(f"{self.url}: device disconnected or unusable ({msg})")

    def send_raw(self, data: bytes) -> None:
        try:
            self.port.write(data)
        except Exception as e:  # pyserial raises SerialException, sockets OSError
            raise self._io_error(e) from None

    def _send(self, type_: int, seq: int, payload: bytes = b"") -> None:
        # The leading delimiter ends whatever partial frame the device may hold.
        self.send_raw(b"\x00" + P.encode(type_, seq, payload))

    def _read(self, deadline: float) -> None:
        try:
            self.port.timeout = max(0.0, min(READ_SLICE, deadline - time.monotonic()))
            data = self.port.read(max(1, min(self.port.in_waiting, 65536)))
        except Exception as e:
            raise self._io_error(e) from None
        if data:
            self.noise["bytes"] += len(data)
            self.pending.extend(self.decoder.feed(data))

    def _wait(self, seq: int, deadline: float, what: str, cancelled=None) -> P.Frame | None:
        """The next frame carrying `seq`, before the deadline; None as soon as cancelled()."""
        got_bytes, got_frames = self.noise["bytes"], 0
        while True:
            if cancelled is not None and cancelled():
                return None
            while self.pending:
                f = self.pending.pop(0)
                if isinstance(f, P.BadFrame):
                    self.noise["bad_frames"] += 1
                    if f.version is not None:
                        raise DeviceError(
                            f"{self.url}: the device speaks protocol {f.version}, this host "
                            f"{P.VERSION}: " + ("load the bitstream (firmware) of this version"
                                                if f.version < P.VERSION else "upgrade the host"))
                elif f.seq == seq:
                    return f
                else:
                    got_frames += 1
                    self.noise["stray_frames"] += 1
            if time.monotonic() >= deadline:
                n = self.noise["bytes"] - got_bytes
                if n == 0:
                    why = "no answer (silent device)"
                elif got_frames == 0:
                    why = f"{n} bytes but no valid frame (babbling device or wrong baud rate?)"
                else:
                    why = f"{got_frames} frames, none answering it"
                raise _Timeout(f"{self.url}: {what}: {why}")
            self._read(deadline)

    # Requests -------------------------------------------------------------------------------------
    def _parse(self, parse, payload: bytes, *args):
        """A reply's parser; a payload that breaks the protocol is a DeviceError (one line)."""
        try:
            return parse(payload, *args)
        except P.ProtocolError as e:
            raise DeviceError(f"{self.url}: {e}") from None

    def request(self, type_: int, payload: bytes = b"", timeout: float | None = None) -> P.Frame:
        """Send a request until its reply arrives (retrying); ERROR replies raise DeviceError, and
        so does a reply of another type carrying this request's sequence number."""
        name = P.REQUEST_NAMES.get(type_, f"type 0x{type_:02x}")
        timeout = self.timeout if timeout is None else timeout
        last = None
        for _ in range(self.retries + 1):
            seq = self._next_seq()
            self._send(type_, seq, payload)
            deadline = time.monotonic() + timeout
            try:
                while True:
                    f = self._wait(seq, deadline, f"{name} within {timeout:g} s")
                    if f.type == type_ | P.REPLY:
                        return f
                    if f.type == P.ERROR:
                        e = self._parse(P.ErrorReply.parse, f.payload)
                        if e.code in P.RETRANSMIT_ERRORS:
                            last = DeviceError(f"{self.url}: {name} arrived damaged ({e.name})")
                            break
                        if e.code == P.E_BUSY:
                            last = DeviceError(f"{self.url}: device busy")
                            self.abort()
                            break
                        raise DeviceError(f"{self.url}: device refused {name}: {e}")
                    if f.type != P.TOKENS:  # late TOKENS of an aborted generation may still come
                        got = P.REQUEST_NAMES.get(f.type & ~P.REPLY, f"type 0x{f.type:02x}")
                        raise DeviceError(f"{self.url}: answered {name} with a {got} "
                                          f"{'reply' if f.type & P.REPLY else 'frame'}")
            except _Timeout as t:
                last = t
        raise DeviceError(f"{last} (after {self.retries + 1} tries)")

    def info(self) -> P.Info:
        info = self._parse(P.Info.parse, self.request(P.INFO).payload)
        if info.protocol != P.VERSION:
            raise DeviceError(f"{self.url}: device speaks protocol {info.protocol}, "
                              f"this host speaks {P.VERSION}")
        self.vocab_size = info.vocab_size
        return info

    def reset(self, seed: int | None = None) -> None:
        """Position 0, prompt emptied; `seed` (u32) seeds the sampler's generator (else 0)."""
        self.request(P.RESET, b"" if seed is None else struct.pack("<I", seed & 0xFFFFFFFF))

    def stats(self) -> P.Stats:
        return self._parse(P.Stats.parse, self.request(P.STATS).payload)

    def echo(self, data: bytes) -> bytes:
        return self.request(P.ECHO, data).payload

    def abort(self) -> bool:
        """Stop a running generation; True if one was running. Best effort, never raises on
        silence (used while recovering)."""
        seq = self._next_seq()
        self._send(P.ABORT, seq)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                f = self._wait(seq, deadline, "ABORT")
                if f.type == P.ABORT | P.REPLY:
                    return bool(f.payload[:1] == b"\x01")
                if f.type == P.ERROR:
                    return False
        except _Timeout:
            return False

    def draft(self, pos: int, tokens, k: int, vocab_size: int,
              inv_t: int | None = None) -> P.DraftReply:
        """Speculative decoding's draft (PROTOCOL.md, DRAFT): rewind the accelerator to `pos`,
        feed `tokens`, draft k greedy tokens; with inv_t (1/T in Q8) k sampled tokens and their
        draws (DRAFT_SAMPLED). Idempotent (a retry rewinds to `pos` again; a sampled retry draws
        anew, which speculative sampling allows)."""
        tokens = [int(t) for t in tokens]
        payload = P.draft_payload(pos, k, tokens, inv_t)
        passes = len(tokens) + k - 1
        f = self.request(P.DRAFT if inv_t is None else P.DRAFT_SAMPLED, payload,
                         timeout=self.timeout + passes * self.step_timeout)
        r = self._parse(P.DraftReply.parse, f.payload, k, vocab_size, inv_t is not None)
        if len(r.tokens) != k or r.pos != pos + passes:
            raise DeviceError(f"{self.url}: DRAFT reply has {len(r.tokens)} of {k} tokens at "
                              f"position {r.pos}, expected {pos + passes}")
        return r

    def logits(self, vocab_size: int) -> list[int]:
        """The last forward pass's Q8 logits (PROTOCOL.md, LOGITS), in LOGITS_MAX chunks."""
        out: list[int] = []
        while len(out) < vocab_size:
            start, count = len(out), min(P.LOGITS_MAX, vocab_size - len(out))
            f = self.request(P.LOGITS, P.LOGITS_HEAD_FMT.pack(start, count))
            out += self._parse(P.parse_logits, f.payload, start, count)
        return out

    def set_prompt(self, ids) -> None:
        ids = [int(t) for t in ids]
        offset = 0
        while True:
            chunk = ids[offset:offset + P.PROMPT_CHUNK]
            f = self.request(P.PROMPT, P.prompt_payload(offset, chunk))
            n = int.from_bytes(f.payload[:2], "little")
            if len(f.payload) != 2 or n != offset + len(chunk):
                raise DeviceError(f"{self.url}: PROMPT reply says {n} tokens, "
                                  f"expected {offset + len(chunk)}")
            offset += len(chunk)
            if offset >= len(ids):
                return

    def generate(self, prompt_ids, max_tokens: int, temperature: float = 0.0, seed: int = 0,
                 inv_temperature_q8: int | None = None, vocab_size: int | None = None) -> Generation:
        """Send the prompt and start a generation; iterate the result for tokens. Nothing the
        device sends is trusted: more passes or tokens than asked, a token >= vocab_size (the
        INFO reply's when not given), a pass out of order end in a DeviceError."""
        from bakedllama.numerics import temperature_q8

        if inv_temperature_q8 is None:
            inv_temperature_q8 = temperature_q8(temperature) if temperature > 0 else 0
        self.set_prompt(prompt_ids)
        g = Generation(len(prompt_ids), max_tokens)
        g.vocab_size = vocab_size or self.vocab_size
        g._it = self._generate(g, P.generate_payload(max_tokens, inv_temperature_q8, seed))
        return g

    def _generate(self, g: Generation, payload: bytes):
        finished = False
        last = None
        silent = 0  # a device silent for a whole step_timeout gets one more chance, not more
        g.t_start = time.monotonic()
        try:
            for attempt in range(self.retries + 1):
                if g._cancel:
                    return
                g.retries = attempt
                seq = self._next_seq()
                self._send(P.GENERATE, seq, payload)
                g.batches = []
                n_here = 0  # generated tokens seen in this attempt
                # the prompt passes come first, then a batch at least every TOKENS_BATCH passes
                wait = self.step_timeout * max(1, g.prompt_tokens)
                try:
                    while True:
                        f = self._wait(seq, time.monotonic() + wait,
                                       f"GENERATE: nothing within {wait:g} s "
                                       f"({len(g.tokens)} of {g.max_tokens} tokens arrived)",
                                       cancelled=lambda: g._cancel)
                        wait = self.step_timeout * max(1, min(P.TOKENS_BATCH,
                                                              g.max_tokens - len(g.tokens)))
                        if f is None or g._cancel:
                            return
                        if f.type == P.TOKENS:
                            b = self._parse(P.Tokens.parse, f.payload)
                            if b.first != n_here:  # a TOKENS frame was lost on the way
                                last = DeviceError(f"{self.url}: lost the tokens from {n_here}")
                                self.abort()
                                break
                            if n_here + len(b.tokens) > g.max_tokens:
                                raise DeviceError(f"{self.url}: sent more tokens than the "
                                                  f"{g.max_tokens} asked ({len(g.tokens)} tokens "
                                                  f"arrived)")
                            bad = [t for t in b.tokens if g.vocab_size is not None and t >= g.vocab_size]
                            if bad:
                                raise DeviceError(f"{self.url}: sent token {bad[0]}, outside "
                                                  f"the vocabulary of {g.vocab_size}")
                            g.batches.append(b)
                            for t in b.tokens:
                                if n_here < len(g.tokens):  # a retry replays what we have
                                    if g.tokens[n_here] != t:
                                        raise DeviceError(
                                            f"{self.url}: the retried generation differs at token "
                                            f"{n_here} ({t} != {g.tokens[n_here]})")
                                else:
                                    g.tokens.append(t)
                                    g.token_cycles.append(b.cycles / len(b.tokens))
                                    if g.t_first is None:
                                        g.t_first = time.monotonic()
                                    yield t
                                n_here += 1
                        elif f.type == P.GENERATE | P.REPLY:
                            d = self._parse(P.Done.parse, f.payload)
                            if d.reason == P.DONE_HW_TIMEOUT:
                                raise DeviceError(f"{self.url}: the accelerator stopped answering "
                                                  f"after {n_here} tokens")
                            if d.reason != P.DONE_COMPLETE:
                                raise DeviceError(f"{self.url}: generation ended early "
                                                  f"({d.generated} of {g.max_tokens} tokens)")
                            if d.generated != n_here or d.prompt_tokens != g.prompt_tokens:
                                last = DeviceError(f"{self.url}: DONE says {d.generated} tokens, "
                                                   f"{n_here} arrived")
                                break
                            g.done = d
                            g.t_end = time.monotonic()
                            finished = True
                            return
                        elif f.type == P.ERROR:
                            e = self._parse(P.ErrorReply.parse, f.payload)
                            if e.code in P.RETRANSMIT_ERRORS:
                                last = DeviceError(f"{self.url}: GENERATE arrived damaged")
                                break
                            if e.code == P.E_BUSY:
                                last = DeviceError(f"{self.url}: device busy")
                                self.abort()
                                break
                            if e.code == P.E_HW_TIMEOUT:
                                raise DeviceError(f"{self.url}: the accelerator stopped answering "
                                                  f"at position {e.detail}")
                            raise DeviceError(f"{self.url}: device refused GENERATE: {e}")
                        else:
                            got = P.REQUEST_NAMES.get(f.type & ~P.REPLY, f"type 0x{f.type:02x}")
                            raise DeviceError(f"{self.url}: answered GENERATE with a {got} frame")
                except _Timeout as t:
                    last = t
                    silent += 1
                    if silent >= 2:
                        raise DeviceError(f"{t} (twice)") from None
                    self.abort()
            raise DeviceError(f"{last} (after {self.retries + 1} tries)")
        except DeviceError as e:
            raise arrived(e, g) from None
        finally:
            if not finished:
                try:
                    g.aborted = self.abort()
                except DeviceError:
                    pass  # the first error (or the consumer's exit) is what the user sees


def arrived(e: DeviceError, g: Generation) -> DeviceError:
    """e, naming how many of the asked tokens had arrived when it happened (once)."""
    if "tokens arrived" in str(e) or not g.tokens:
        return e
    return DeviceError(f"{e} ({len(g.tokens)} of {g.max_tokens} tokens arrived)")


def _one_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def open_device(url: str, *, baudrate: int = P.DEFAULT_BAUDRATE, timeout: float = 2.0,
                step_timeout: float = 3.0, retries: int = 3) -> Device:
    """Open a pyserial URL: socket://127.0.0.1:PORT (simulation), /dev/ttyUSB0 (board), ..."""
    import serial

    if url.startswith("socket://"):  # pyserial's own errors for these are not readable
        from urllib.parse import urlsplit

        try:
            port = urlsplit(url).port
        except ValueError:
            port = -1
        if port is None or not 0 < port < 65536 or not urlsplit(url).hostname:
            raise DeviceError(f"cannot open {url}: a socket URL needs a host and a port 1-65535 "
                              f"(socket://127.0.0.1:PORT)")
    kwargs = dict(baudrate=baudrate, timeout=READ_SLICE, write_timeout=max(timeout, 1.0))
    if "://" not in url:
        kwargs["exclusive"] = True  # a second program on the same tty would steal bytes
    try:
        port = serial.serial_for_url(url, **kwargs)
    except Exception as e:  # SerialException, ValueError (bad URL), OSError
        raise DeviceError(f"cannot open {url}: {_one_line(e)}") from None
    sock = getattr(port, "_socket", None)  # socket:// URLs: small frames must not wait (Nagle)
    if sock is not None:
        import socket

        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    return Device(port, url, timeout=timeout, step_timeout=step_timeout, retries=retries)


def check_model(info: P.Info, model, url: str = "device") -> None:
    """Refuse a device that runs another model than the host's baked model (and tokenizer)."""
    if info.testing_core:
        raise DeviceError(f"{url} carries the test stand-in core (soc/testing_core.py), not a model")
    if info.model_id != model.identity():
        raise DeviceError(f"{url} runs model {info.model_id:08x}, but the host's model is "
                          f"{model.identity():08x}: rebuild/load the matching bitstream or pass "
                          f"the matching --model")
    c = model.cfg
    want = (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, c.seq_len)
    have = (info.dim, info.n_layers, info.n_heads, info.n_kv_heads, info.hidden_dim,
            info.vocab_size, info.seq_len)
    if want != have:
        raise DeviceError(f"{url} reports model config {have}, the host's model has {want}")
