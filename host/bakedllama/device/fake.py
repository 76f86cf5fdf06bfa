"""Scripted devices on 127.0.0.1 for the host's hardening tests: a correct device (the golden
model behind protocol v1, like the firmware) and ways for it to misbehave, as an adversary or a
broken board would.

    with FakeDevice(model, mode="endless") as fake:
        open_device(fake.url) ...

Modes (None = behave):
  endless      GENERATE streams TOKENS frames without end
  double       twice the asked tokens, then a DONE that says so
  bad_token    the first generated token is 60000
  short_step   TOKENS frames 2 bytes short
  short_info   an INFO reply of 40 bytes
  wrong_type   INFO answered with a STATS reply
  stale_seq    every reply carries the previous request's sequence number
  vanish       after 3 generated tokens the connection closes
  stall        after 3 generated tokens the device says nothing more
  babble       GENERATE answered with random bytes, forever
  old_protocol INFO says protocol version 0 (frames still v1)
"""

from __future__ import annotations

import os
import socket
import struct
import threading

from bakedllama.device import protocol as P

MODES = ("endless", "double", "bad_token", "short_step", "short_info", "wrong_type", "stale_seq",
         "vanish", "stall", "babble", "old_protocol")


class FakeDevice:
    def __init__(self, model, mode: str | None = None, sys_clk: int = 45_000_000):
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        from bakedllama.golden import Golden

        self.model, self.mode, self.sys_clk = model, mode, sys_clk
        self.g = Golden(model)
        self.prompt: list[int] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.url = f"socket://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        self._thread.join(timeout=5)

    # the connection ------------------------------------------------------------------------------
    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(0.2)
            try:
                self._session(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def _session(self, conn) -> None:
        dec = P.Decoder()
        self._last_seq = 0
        while not self._stop.is_set():
            try:
                data = conn.recv(4096)
            except TimeoutError:
                continue
            if not data:
                return
            for f in dec.feed(data):
                if isinstance(f, P.Frame) and not self._handle(conn, f):
                    return

    def _send(self, conn, type_: int, seq: int, payload: bytes = b"") -> None:
        if self.mode == "stale_seq":
            seq = self._last_seq
        conn.sendall(P.encode(type_, seq, payload))

    def _handle(self, conn, f: P.Frame) -> bool:
        """Answer one request; False ends the connection."""
        try:
            return self._answer(conn, f)
        finally:
            self._last_seq = f.seq

    def _answer(self, conn, f: P.Frame) -> bool:
        c, m = self.model.cfg, self.mode
        if f.type == P.INFO:
            if m == "wrong_type":
                self._send(conn, P.STATS | P.REPLY, f.seq, bytes(P.STATS_FMT.size))
                return True
            info = P.INFO_FMT.pack(0 if m == "old_protocol" else P.VERSION, 1, 0, 0,
                                   self.model.identity(), c.dim, c.n_layers, c.n_heads,
                                   c.n_kv_heads, c.hidden_dim, c.vocab_size, c.seq_len, 64,
                                   self.sys_clk, P.MAX_PAYLOAD, 0, 0)
            self._send(conn, P.INFO | P.REPLY, f.seq, info[:40] if m == "short_info" else info)
        elif f.type == P.RESET:
            self.prompt = []
            self._send(conn, P.RESET | P.REPLY, f.seq)
        elif f.type == P.PROMPT:
            off = struct.unpack_from("<H", f.payload)[0]
            toks = list(struct.unpack_from(f"<{(len(f.payload) - 2) // 2}H", f.payload, 2))
            self.prompt = self.prompt[:off] + toks
            self._send(conn, P.PROMPT | P.REPLY, f.seq, struct.pack("<H", len(self.prompt)))
        elif f.type == P.ABORT:
            self._send(conn, P.ABORT | P.REPLY, f.seq, b"\x00")
        elif f.type == P.GENERATE:
            return self._generate(conn, f)
        else:
            self._send(conn, P.ERROR, f.seq, P.ERROR_FMT.pack(P.E_UNKNOWN_TYPE, f.type, 0))
        return True

    def _generate(self, conn, f: P.Frame) -> bool:
        from bakedllama.golden import generate

        max_tokens, inv_t, seed = P.GENERATE_FMT.unpack(f.payload)
        m, n = self.mode, len(self.prompt)
        if m == "babble":
            while not self._stop.is_set():
                conn.sendall(os.urandom(256).replace(b"\x00", b"\x01"))
                self._stop.wait(0.01)
            return False
        asked = max_tokens * (2 if m == "double" else 1)
        toks = list(generate(self.g, self.prompt, min(asked, self.model.cfg.seq_len - n)))
        toks += [toks[-1]] * (asked - len(toks))
        if m == "bad_token":
            toks[0] = 60000
        made, batch = 0, []

        def flush():
            tb = P.TOKENS_HEAD_FMT.pack(made - len(batch), len(batch), 0, 1000 * len(batch))
            tb += struct.pack(f"<{len(batch)}H", *[t & 0xFFFF for t in batch])
            self._send(conn, P.TOKENS, f.seq, tb[:-2] if m == "short_step" else tb)
            batch.clear()

        while m == "endless" or made < len(toks):
            batch.append(toks[min(made, len(toks) - 1)])
            made += 1
            if m in ("vanish", "stall") and made == 3:
                flush()
                if m == "stall":
                    self._stop.wait()
                return False
            if len(batch) == 4 or made == len(toks):
                flush()
            if m == "endless":
                self._stop.wait(0.001)
                if self._stop.is_set():
                    return False
        pos = n + made - 1
        done = P.DONE_FMT.pack(n, made, P.DONE_COMPLETE, 0, 1000 * n, 1000 * made, 2000 * pos)
        self._send(conn, P.GENERATE | P.REPLY, f.seq, done)
        return True
