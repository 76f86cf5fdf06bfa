"""The firmware's protocol code (firmware/app.c, proto.c) built natively, over a real TCP socket.

firmware/native/hw_native.c stands in for the SoC: a 127.0.0.1 socket for the UART and a model of
the test stand-in accelerator (soc/testing_core.py). Built with AddressSanitizer and UBSan, so the
fuzzing below also catches memory errors. The same checks run against the firmware in the
Verilator SoC in tests/test_soc_sim.py."""

from __future__ import annotations

import random
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from bakedllama.device import DeviceError, open_device
from bakedllama.device import protocol as P
from bakedllama.device.fuzz import run_fuzz
from bakedllama.numerics import XorShift32, temperature_q8

from soc.testing_core import lookup_table, reference_generate

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 256
TABLE = lookup_table(512)
PROMPTS = [[1], [1, 5, 300, 7], list(range(2, 60)), [511] * 10]


@pytest.fixture(scope="module")
def fw_native(tmp_path_factory):
    d = tmp_path_factory.mktemp("fw_native")
    subprocess.run(["make", "-s", "-f", str(ROOT / "firmware" / "Makefile"), "native", f"OUT={d}"],
                   check=True, timeout=120)
    (d / "table.bin").write_bytes(struct.pack(f"<{len(TABLE)}H", *TABLE))
    return d


class NativeFirmware:
    def __init__(self, d: Path, *extra: str):
        self.proc = subprocess.Popen([str(d / "fw_native"), "--table", str(d / "table.bin"),
                                      "--seq-len", str(SEQ_LEN), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, f"fw_native did not start: {line!r}"
        self.url = f"socket://127.0.0.1:{m.group(1)}"

    def stop(self) -> str:
        self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        return err.decode(errors="replace")


@pytest.fixture
def fw(fw_native):
    f = NativeFirmware(fw_native)
    yield f
    err = f.stop()
    assert "ERROR: AddressSanitizer" not in err and "runtime error" not in err, err


def ref(prompt, n, inv_t=0, seed=0):
    return reference_generate(TABLE, prompt, n, inv_t, seed)


def test_info_and_echo(fw):
    with open_device(fw.url) as dev:
        info = dev.info()
        assert info.protocol == P.VERSION and info.testing_core
        assert (info.vocab_size, info.seq_len, info.max_payload) == (512, SEQ_LEN, P.MAX_PAYLOAD)
        for n in (0, 1, 253, 254, 255, 600, P.MAX_PAYLOAD):
            data = bytes((i * 7) & 0xFF for i in range(n))
            assert dev.echo(data) == data


@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_matches_reference(fw, prompt):
    with open_device(fw.url) as dev:
        g = dev.generate(prompt, 20)
        assert list(g) == ref(prompt, 20)
        assert g.done.prompt_tokens == len(prompt) and g.done.generated == 20
        # protocol v2: TOKENS batches, contiguous, each with its passes' cycles (64 + pos here);
        # the first generated token's pass is the last prompt pass
        n = len(prompt)
        assert [b.first for b in g.batches] == [sum(len(x.tokens) for x in g.batches[:i])
                                                for i in range(len(g.batches))]
        assert all(1 <= len(b.tokens) <= P.TOKENS_BATCH for b in g.batches)
        assert sum(b.cycles for b in g.batches) == sum(64 + p for p in range(n - 1, n + 19))
        assert g.done.prefill_cycles == sum(64 + p for p in range(n))
        assert g.done.decode_cycles == sum(64 + p for p in range(n, n + 19))
        assert g.done.wall_cycles > 0
        inv_t = temperature_q8(0.7)
        assert list(dev.generate(prompt, 20, temperature=0.7, seed=1234)) == ref(prompt, 20, inv_t, 1234)
        st = dev.stats()
        assert st.generated == 20 and st.prompt_tokens == len(prompt)


def test_generate_fills_the_context(fw):
    with open_device(fw.url) as dev:
        prompt = [3] * 200
        assert list(dev.generate(prompt, SEQ_LEN - 200)) == ref(prompt, SEQ_LEN - 200)
        with pytest.raises(DeviceError, match="OUT_OF_RANGE"):
            list(dev.generate(prompt, SEQ_LEN - 199))


def test_long_prompt_in_several_frames(fw_native):
    f = NativeFirmware(fw_native, "--seq-len", "1024")
    try:
        with open_device(f.url) as dev:
            prompt = [(i * 13) % 512 for i in range(900)]  # 2 PROMPT frames
            assert list(dev.generate(prompt, 30)) == ref(prompt, 30)
    finally:
        f.stop()


def test_errors_are_reported(fw):
    with open_device(fw.url) as dev:
        with pytest.raises(DeviceError, match="OUT_OF_RANGE"):
            dev.set_prompt([1, 2, 512])
        with pytest.raises(DeviceError, match="OUT_OF_RANGE"):
            dev.set_prompt([1] * (SEQ_LEN + 1))
        dev.reset()
        with pytest.raises(DeviceError, match="BAD_STATE"):
            list(dev.generate([], 3))
        with pytest.raises(DeviceError, match="UNKNOWN_TYPE"):
            dev.request(0x33)
        with pytest.raises(DeviceError, match="BAD_LENGTH"):
            dev.request(P.INFO, b"x")
        assert dev.info().protocol == P.VERSION  # still fine


def _table_draft(pos, tokens, k):
    """DRAFT on the stand-in (greedy): feed tokens from pos, then k tokens fed back but the last."""
    mask = len(TABLE) - 1
    out = []
    for t in tokens[:-1] + [tokens[-1]]:
        o = TABLE[(t + pos) & mask]
        pos += 1
    out.append(o)
    while len(out) < k:
        out.append(TABLE[(out[-1] + pos) & mask])
        pos += 1
    return out


def test_draft_rewinds_feeds_and_drafts(fw):
    with open_device(fw.url) as dev:
        dev.reset()
        r = dev.draft(0, [1, 5, 300, 7], 5, 512)
        assert r.tokens == _table_draft(0, [1, 5, 300, 7], 5) and r.pos == 8
        assert r.cycles == sum(64 + p for p in range(8))  # the stand-in's counter: 64 + pos
        # back to position 3 (positions 3.. are overwritten), one new context token
        r = dev.draft(3, [9], 4, 512)
        assert r.tokens == _table_draft(3, [9], 4) and r.pos == 7
        # forward again from where it stands, and the same request twice gives the same tokens
        again = dev.draft(7, [r.tokens[-1], 2], 3, 512)
        assert again.tokens == _table_draft(7, [r.tokens[-1], 2], 3)
        assert dev.draft(7, [r.tokens[-1], 2], 3, 512).tokens == again.tokens
        # bad positions and counts get an error reply, not a token
        with pytest.raises(DeviceError, match="OUT_OF_RANGE.*65535"):
            dev.draft(again.pos + 1, [1], 2, 512)  # past what the cache holds
        with pytest.raises(DeviceError, match="OUT_OF_RANGE.*65534"):
            dev.draft(again.pos, [1], SEQ_LEN, 512)  # past the context
        with pytest.raises(DeviceError, match="OUT_OF_RANGE.*65534"):
            dev.request(P.DRAFT, struct.pack("<HHH", 0, 0, 1))  # k = 0
        with pytest.raises(DeviceError, match="OUT_OF_RANGE.*detail 1"):
            dev.draft(0, [1, 512], 2, 512)  # a token outside the vocabulary
        with pytest.raises(DeviceError, match="BAD_LENGTH"):
            dev.request(P.DRAFT, b"\x00\x00\x01\x00")  # no context token
        dev.reset()
        with pytest.raises(DeviceError, match="OUT_OF_RANGE"):
            dev.draft(1, [1], 2, 512)  # after RESET nothing is cached
        assert dev.draft(0, [1], 2, 512).tokens == _table_draft(0, [1], 2)
        # a reply with a token outside the host's vocabulary is refused
        with pytest.raises(DeviceError, match="outside the vocabulary"):
            dev.draft(0, [1, 5, 300, 7], 5, 2)


def _table_draft_sampled(pos, tokens, k, inv_t, rng):
    """DRAFT_SAMPLED on the stand-in: the context passes greedy but the last, the drafts sampled
    (hw_native.c's model); each draft with its pass's draw (token, pos + 1, vocab + pos)."""
    mask = len(TABLE) - 1
    pos += len(tokens) - 1  # the context passes before the last
    t, out = tokens[-1], []
    while len(out) < k:
        o = (TABLE[(t + pos) & mask] + (rng.next() >> 16) + inv_t) & mask
        out.append((o, (o, pos + 1, len(TABLE) + pos)))
        t, pos = o, pos + 1
    return out


def test_draft_sampled_logits_and_seeded_reset(fw):
    """DRAFT_SAMPLED reports each draft's draw, LOGITS the last pass's logits, RESET takes a seed;
    bad requests get error replies (hw_native.c: logit i = (7 i + token + pos) % 61 - 30)."""
    with open_device(fw.url) as dev:
        with pytest.raises(DeviceError, match="BAD_STATE.*detail 0"):
            dev.logits(512)  # no pass since the reset
        dev.reset(99)
        rng = XorShift32(99)
        inv_t = temperature_q8(0.8)
        r = dev.draft(0, [1, 5, 300], 4, 512, inv_t)
        want = _table_draft_sampled(0, [1, 5, 300], 4, inv_t, rng)
        assert r.tokens == [w[0] for w in want] and r.draws == [w[1] for w in want]
        assert r.pos == 6
        got = dev.logits(512)  # the last pass: position 5, its input the third draft
        assert got == [(i * 7 + r.tokens[2] + 5) % 61 - 30 for i in range(512)]
        # the generator keeps its state across requests; a rewind and a one-token greedy DRAFT
        # re-runs a pass for its logits
        r2 = dev.draft(2, [300], 2, 512, inv_t)
        assert r2.tokens == [w[0] for w in _table_draft_sampled(2, [300], 2, inv_t, rng)]
        dev.draft(3, [r2.tokens[0]], 1, 512)
        assert dev.logits(512)[:3] == [(i * 7 + r2.tokens[0] + 3) % 61 - 30 for i in range(3)]
        f = dev.request(P.LOGITS, P.LOGITS_HEAD_FMT.pack(500, 12))
        assert P.parse_logits(f.payload, 500, 12) == [(i * 7 + r2.tokens[0] + 3) % 61 - 30
                                                      for i in range(500, 512)]
        for payload, pattern in [(P.LOGITS_HEAD_FMT.pack(0, 0), "OUT_OF_RANGE"),
                                 (P.LOGITS_HEAD_FMT.pack(0, 256), "OUT_OF_RANGE"),
                                 (P.LOGITS_HEAD_FMT.pack(500, 13), "OUT_OF_RANGE"),
                                 (b"\x00\x00\x01", "BAD_LENGTH")]:
            with pytest.raises(DeviceError, match=pattern):
                dev.request(P.LOGITS, payload)
        with pytest.raises(DeviceError, match="BAD_STATE.*detail 0"):
            dev.request(P.DRAFT_SAMPLED, struct.pack("<HHHH", 0, 2, 0, 1))  # 1/T = 0
        with pytest.raises(DeviceError, match="OUT_OF_RANGE.*65534"):
            dev.draft(0, [1], 73, 512, inv_t)  # 73 drafts do not fit one reply
        with pytest.raises(DeviceError, match="BAD_LENGTH"):
            dev.request(P.DRAFT_SAMPLED, struct.pack("<HHH", 0, 2, 5))  # no context token
        with pytest.raises(DeviceError, match="BAD_LENGTH"):
            dev.request(P.RESET, b"\x01\x02")
        # a seeded reset draws the same again
        dev.reset(99)
        again = dev.draft(0, [1, 5, 300], 4, 512, inv_t)
        assert again.tokens == r.tokens and again.draws == r.draws


def test_a_v1_host_gets_a_v1_error_it_can_read(fw):
    """Protocol v2 firmware answers a v1 frame with a v1 ERROR frame (BAD_VERSION, detail 2):
    what an old host prints is "device refused INFO: BAD_VERSION ... (detail 2)", not a timeout.
    A v2 host talking to v1 firmware is told so at its first reply (transport._wait)."""
    import zlib

    with open_device(fw.url) as dev:
        body = bytes((1, P.INFO, 9))
        raw = body + struct.pack("<I", zlib.crc32(body))
        dev.send_raw(b"\x00" + P.cobs_encode(raw) + b"\x00")
        deadline = time.monotonic() + 5
        with pytest.raises(DeviceError, match="speaks protocol 1, this host 2: load the bitstream"):
            dev._wait(9, deadline, "the v1 reply")


def test_abort_and_busy(fw):
    with open_device(fw.url) as dev:
        g = dev.generate([1, 2, 3], 200)
        assert next(g) == ref([1, 2, 3], 1)[0]
        g.close()  # aborts on the device
        assert list(dev.generate([4], 5)) == ref([4], 5)


def test_fuzz(fw):
    with open_device(fw.url, timeout=2.0) as dev:
        info = dev.info()
        rep = run_fuzz(dev, info, ref, PROMPTS, rounds=440, seed=7, gen_every=40)
    assert rep.hangs == 0, rep
    assert rep.wrong_tokens == 0, rep
    assert rep.errors_answered == rep.errors_expected, rep
    assert rep.valid_answered == rep.valid_requests, rep
    assert rep.device_stats["frames_bad"] > 0 and rep.device_stats["frames_too_long"] > 0


def test_firmware_watchdog(fw_native):
    """An accelerator that never answers: the firmware gives up after 2^26 cycles (~1.3 s here)."""
    f = NativeFirmware(fw_native, "--stall-at", "3")
    try:
        with open_device(f.url, step_timeout=10.0) as dev:
            t0 = time.monotonic()
            with pytest.raises(DeviceError, match="accelerator stopped answering"):
                list(dev.generate([1, 2, 3, 4, 5], 4))
            assert time.monotonic() - t0 < 8
            assert dev.stats().hw_timeouts == 1
            assert dev.info().protocol == P.VERSION
    finally:
        f.stop()


def test_second_client_gets_the_link_after_the_first(fw):
    with open_device(fw.url) as dev:
        dev.info()
    with open_device(fw.url) as dev:
        assert list(dev.generate([9, 9], 3)) == ref([9, 9], 3)


# Host side: silent, babbling, vanished devices -> one DeviceError line, bounded time -------------

class FakeDevice:
    """A TCP server on 127.0.0.1 that misbehaves: 'silent', 'babble' or 'vanish'."""

    def __init__(self, mode: str):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.mode, self.stop = mode, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        conn, _ = self.sock.accept()
        with conn:
            if self.mode == "vanish":
                conn.recv(100)
                return
            conn.settimeout(0.05)
            x = 12345
            while not self.stop.is_set():
                try:
                    conn.recv(4096)
                except OSError:
                    pass
                if self.mode == "babble":
                    out = bytearray()
                    for _ in range(4096):
                        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
                        out.append((x >> 16) & 0xFF)
                    try:
                        conn.sendall(bytes(out))
                    except OSError:
                        return

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("mode,pattern", [("silent", "silent device"),
                                          ("babble", "babbling device"),
                                          ("vanish", "disconnected")])
def test_misbehaving_device_gives_one_line(mode, pattern):
    fake = FakeDevice(mode)
    try:
        t0 = time.monotonic()
        with open_device(f"socket://127.0.0.1:{fake.port}", timeout=0.5, retries=1) as dev:
            with pytest.raises(DeviceError, match=pattern) as e:
                dev.info()
        assert time.monotonic() - t0 < 5
        assert "\n" not in str(e.value)
    finally:
        fake.close()


def test_no_device():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(DeviceError, match="cannot open"):
        open_device(f"socket://127.0.0.1:{port}")
    with pytest.raises(DeviceError, match="cannot open"):
        open_device("/dev/ttyUSB_does_not_exist")


class LossyLink:
    """A TCP proxy on 127.0.0.1 that flips one byte in about every `every` bytes, both ways."""

    def __init__(self, upstream_url: str, every: int, seed: int = 0):
        host, port = upstream_url.removeprefix("socket://").split(":")
        self.upstream = (host, int(port))
        self.every = every
        self.flips = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"socket://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.rng = random.Random(seed)
        threading.Thread(target=self.serve, daemon=True).start()

    def pump(self, src, dst):
        try:
            while not self.stop.is_set():
                data = bytearray(src.recv(4096))
                if not data:
                    break
                for i in range(len(data)):
                    if self.rng.randrange(self.every) == 0:
                        data[i] ^= 1 << self.rng.randrange(8)
                        self.flips += 1
                dst.sendall(bytes(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve(self):
        client, _ = self.sock.accept()
        up = socket.create_connection(self.upstream)
        threading.Thread(target=self.pump, args=(client, up), daemon=True).start()
        self.pump(up, client)

    def close(self):
        self.stop.set()
        self.sock.close()


def test_generation_survives_a_lossy_link(fw):
    """Damaged frames both ways: requests are retransmitted, a lost TOKENS or DONE frame makes the
    host restart the (deterministic) generation, and the tokens are still exactly right."""
    link = LossyLink(fw.url, every=250, seed=3)  # v2 batches: ~5x fewer bytes than v1
    try:
        with open_device(link.url, timeout=1.0, step_timeout=1.0, retries=8) as dev:
            retried = 0
            for i, prompt in enumerate(PROMPTS * 3):
                g = dev.generate(prompt, 20, temperature=0.5 * (i % 2), seed=i)
                assert list(g) == ref(prompt, 20, temperature_q8(0.5) if i % 2 else 0, i)
                retried += g.retries
        assert link.flips > 0 and retried > 0, (link.flips, retried)
    finally:
        link.close()


def test_device_info_and_model_check(fw, tmp_path):
    """What `bakedllama info --device URL` calls; a stand-in or another model is refused."""
    from bakedllama.config import ModelConfig
    from bakedllama.device import device_info
    from bakedllama.synthetic import random_baked

    d = device_info(fw.url)
    assert d["testing_core"] and d["vocab_size"] == 512 and d["model_id"] == f"{0x7E57C0DE:08x}"
    model = random_baked(tmp_path / "m.bkl", ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                                          hidden_dim=48, vocab_size=512, seq_len=SEQ_LEN))
    with pytest.raises(DeviceError, match="stand-in"):
        device_info(fw.url, model)
