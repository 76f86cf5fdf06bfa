"""The serial protocol (firmware/PROTOCOL.md): Python implementation, and agreement with the C one.

firmware/proto.c is compiled natively into a shared library and driven through ctypes with the
same inputs as host/bakedllama/device/protocol.py: identical bytes out, identical verdicts in."""

from __future__ import annotations

import ctypes
import random
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from bakedllama.device import protocol as P

ROOT = Path(__file__).resolve().parents[1]
FW = ROOT / "firmware"


# Python side -------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,enc", [  # Wikipedia's COBS examples
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255))),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
])
def test_cobs_known_vectors(data, enc):
    assert P.cobs_encode(data) == enc
    assert P.cobs_decode(enc) == data


def test_cobs_roundtrip_random():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.choice([0, 1, 2, 253, 254, 255, 256, 508, 509, rng.randint(0, 1100)])
        data = bytes(rng.choice([0, 0, rng.getrandbits(8)]) for _ in range(n))
        enc = P.cobs_encode(data)
        assert 0 not in enc
        assert len(enc) <= n + n // 254 + 1
        assert P.cobs_decode(enc) == data


def test_cobs_decode_rejects_damage():
    with pytest.raises(P.ProtocolError):
        P.cobs_decode(b"\x05\x11\x22")  # truncated block
    with pytest.raises(P.ProtocolError):
        P.cobs_decode(b"\x03\x11\x00")  # zero inside


def test_crc32_and_residue():
    assert P.crc32(b"123456789") == 0xCBF43926
    rng = random.Random(1)
    for _ in range(200):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 100)))
        assert P.crc32(body + struct.pack("<I", P.crc32(body))) == P.CRC_RESIDUE


def test_frame_layout():
    wire = P.encode(P.ECHO, 7, b"\x00ab")
    assert wire.endswith(b"\x00") and wire.count(0) == 1
    f = P.cobs_decode(wire[:-1])
    assert f[:3] == bytes((P.VERSION, P.ECHO, 7)) and f[3:6] == b"\x00ab"
    assert struct.unpack("<I", f[-4:])[0] == zlib.crc32(f[:-4])
    assert P.decode_frame(wire[:-1]) == P.Frame(P.ECHO, 7, b"\x00ab")
    with pytest.raises(P.ProtocolError):
        P.encode(P.ECHO, 1, bytes(P.MAX_PAYLOAD + 1))
    assert len(P.encode(P.ECHO, 1, bytes(P.MAX_PAYLOAD))) <= P.MAX_ENCODED + 1


def test_decoder_splits_and_resyncs():
    rng = random.Random(2)
    frames = [(rng.choice([P.TOKENS, P.ERROR, 0x81]), rng.randint(1, 255),
               bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 50)))) for _ in range(100)]
    stream = bytearray()
    for t, s, p in frames:
        stream += bytes(rng.getrandbits(8) | 1 for _ in range(rng.randint(0, 20)))  # noise
        stream += b"\x00" + P.encode(t, s, p)
    d = P.Decoder()
    out = []
    i = 0
    while i < len(stream):  # arbitrary chunking
        k = rng.randint(1, 64)
        out += d.feed(bytes(stream[i:i + k]))
        i += k
    good = [(f.type, f.seq, f.payload) for f in out if isinstance(f, P.Frame)]
    assert good == frames


def test_decoder_memory_is_bounded():
    d = P.Decoder()
    for _ in range(100):
        assert d.feed(b"\x01" * 10_000) == []
        assert len(d.buf) <= P.MAX_ENCODED
    (bad,) = d.feed(b"\x00")
    assert isinstance(bad, P.BadFrame) and bad.reason == "too_long"
    assert d.feed(P.encode(P.INFO, 3)) == [P.Frame(P.INFO, 3, b"")]


def test_bad_frames_are_classified():
    good = P.cobs_encode(P.frame_bytes(P.INFO, 1))
    assert P.decode_frame(good[:-1]).reason in ("cobs", "crc")
    assert P.decode_frame(b"\x03ab").reason == "short"
    body = bytearray(P.frame_bytes(P.INFO, 1))
    body[-1] ^= 0x80
    assert P.decode_frame(P.cobs_encode(bytes(body))).reason == "crc"
    body = bytes((1, P.INFO, 1))
    f = P.decode_frame(P.cobs_encode(body + struct.pack("<I", P.crc32(body))))
    assert f.reason == "version" and f.version == 1


def test_payload_structs():
    assert P.INFO_FMT.size == 48 and P.STATS_FMT.size == 64
    assert P.DONE_FMT.size == 30 and P.TOKENS_HEAD_FMT.size == 8
    t = P.Tokens.parse(P.TOKENS_HEAD_FMT.pack(5, 3, 0, 1234) + struct.pack("<3H", 7, 8, 0x1FF))
    assert (t.first, t.tokens, t.cycles) == (5, (7, 8, 0x1FF), 1234)
    for bad in (P.TOKENS_HEAD_FMT.pack(0, 0, 0, 1), P.TOKENS_HEAD_FMT.pack(0, 2, 0, 1) + b"\x01\x00",
                P.TOKENS_HEAD_FMT.pack(0, P.TOKENS_BATCH + 1, 0, 1) + bytes(2 * P.TOKENS_BATCH + 2)):
        with pytest.raises(P.ProtocolError):
            P.Tokens.parse(bad)
    # full batches: 3 + 8 + 64 + 4 = 79 frame bytes, one COBS code byte, the delimiter
    assert P.wire_bytes_per_token() == 81 / 32
    d = P.Done.parse(P.DONE_FMT.pack(4, 3, 0, 0, 400, 200, 9999))
    assert d.passes == 6 and d.cycles_per_token == 100.0 and d.wall_cycles_per_token == 9999 / 6
    assert P.prompt_payload(2, [1, 0x1FF]) == b"\x02\x00\x01\x00\xff\x01"
    with pytest.raises(P.ProtocolError):
        P.prompt_payload(0, [0x10000])


# Agreement with the C implementation -------------------------------------------------------------

def _header_defines() -> dict[str, int]:
    out = {}
    for m in re.finditer(r"#define\s+(\w+)\s+\(?(0x[0-9A-Fa-f]+|\d+)u?\)?\s", (FW / "proto.h").read_text()):
        out[m.group(1)] = int(m.group(2), 0)
    return out


def test_constants_match_proto_h():
    d = _header_defines()
    assert d["PROTO_VERSION"] == P.VERSION
    assert d["PROTO_MAX_PAYLOAD"] == P.MAX_PAYLOAD
    assert d["PROTO_CRC_RESIDUE"] == P.CRC_RESIDUE
    for name in ("INFO", "RESET", "PROMPT", "GENERATE", "STATS", "ABORT", "ECHO", "DRAFT",
                 "DRAFT_SAMPLED", "LOGITS", "REPLY", "TOKENS", "ERROR"):
        assert d[f"T_{name}"] == getattr(P, name), name
    for code, name in P.ERROR_NAMES.items():
        assert d[f"E_{name}"] == code, name
    assert (d["INFO_SIZE"], d["STATS_SIZE"], d["DONE_SIZE"], d["TOKENS_HEAD"], d["TOKENS_BATCH"]) == (
        P.INFO_FMT.size, P.STATS_FMT.size, P.DONE_FMT.size, P.TOKENS_HEAD_FMT.size, P.TOKENS_BATCH)
    assert (d["DRAFT_HEAD"], d["DRAFT_SAMPLED_ITEM"]) == (P.DRAFT_HEAD_FMT.size, P.DRAFT_ITEM_FMT.size)
    assert (d["DONE_COMPLETE"], d["DONE_ABORTED"], d["DONE_HW_TIMEOUT"]) == (
        P.DONE_COMPLETE, P.DONE_ABORTED, P.DONE_HW_TIMEOUT)


class RxState(ctypes.Structure):  # firmware/proto.h struct rx_state
    _fields_ = [("buf", ctypes.c_uint8 * P.MAX_FRAME), ("len", ctypes.c_size_t),
                ("total", ctypes.c_size_t), ("crc", ctypes.c_uint32), ("remaining", ctypes.c_uint8),
                ("zero_due", ctypes.c_uint8), ("bad", ctypes.c_uint8), ("started", ctypes.c_uint8)]


RX_NAMES = {1: "frame", 2: "crc", 3: "bad", 4: "too_long"}
PUT = ctypes.CFUNCTYPE(None, ctypes.c_uint8, ctypes.c_void_p)


@pytest.fixture(scope="module")
def cproto(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc) on PATH: the C/Python agreement cannot be checked")
    so = tmp_path_factory.mktemp("proto") / "libproto.so"
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(so),
                    str(FW / "proto.c")], check=True)
    lib = ctypes.CDLL(str(so))
    lib.crc32.restype = ctypes.c_uint32
    lib.crc32.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.rx_byte.restype = ctypes.c_int
    lib.rx_byte.argtypes = [ctypes.POINTER(RxState), ctypes.c_uint8]
    lib.frame_build.restype = ctypes.c_size_t
    lib.frame_build.argtypes = [ctypes.c_char_p, ctypes.c_uint8, ctypes.c_uint8, ctypes.c_char_p,
                                ctypes.c_size_t]
    lib.cobs_write.argtypes = [ctypes.c_char_p, ctypes.c_size_t, PUT, ctypes.c_void_p]
    return lib


def c_encode(lib, type_, seq, payload) -> bytes:
    buf = ctypes.create_string_buffer(P.MAX_FRAME)
    n = lib.frame_build(buf, type_, seq, payload, len(payload))
    out = bytearray()
    cb = PUT(lambda b, _ctx: out.append(b))
    lib.cobs_write(buf, n, cb, None)
    return bytes(out)


def c_receive(lib, stream: bytes) -> list[tuple[str, bytes]]:
    st = RxState()
    lib.rx_init(ctypes.byref(st))
    out = []
    for b in stream:
        r = lib.rx_byte(ctypes.byref(st), b)
        if r:
            out.append((RX_NAMES[r], bytes(st.buf[:st.len])))
    return out


def test_c_crc_matches(cproto):
    rng = random.Random(3)
    for _ in range(200):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        assert cproto.crc32(data, len(data)) == zlib.crc32(data)


def test_c_encoder_matches_python(cproto):
    rng = random.Random(4)
    for _ in range(500):
        n = rng.choice([0, 1, 250, 251, 252, 253, 254, 508, P.MAX_PAYLOAD, rng.randint(0, 100)])
        payload = bytes(rng.choice([0, rng.getrandbits(8)]) for _ in range(n))
        t, s = rng.getrandbits(8), rng.getrandbits(8)
        assert c_encode(cproto, t, s, payload) == P.encode(t, s, payload)


def _py_verdict(enc: bytes) -> str:
    f = P.decode_frame(enc)
    if isinstance(f, P.Frame):
        return "frame"
    return {"crc": "crc", "cobs": "bad", "short": "bad", "too_long": "too_long",
            "version": "frame"}[f.reason]  # the version is checked above the framing in C


def test_c_decoder_matches_python(cproto):
    rng = random.Random(5)
    chunks = []
    for _ in range(400):
        kind = rng.randrange(5)
        good = P.cobs_encode(P.frame_bytes(rng.getrandbits(8), rng.randint(1, 255),
                                           bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 60)))))
        if kind == 0:
            chunks.append(good)
        elif kind == 1:
            chunks.append(good[:rng.randint(1, len(good) - 1)])  # truncated
        elif kind == 2:
            b = bytearray(good)
            k = rng.randrange(len(b))
            b[k] = (b[k] ^ (1 << rng.randrange(8))) or 1  # flipped, never a delimiter
            chunks.append(bytes(b))
        elif kind == 3:
            chunks.append(bytes(rng.getrandbits(8) | 1 for _ in range(rng.randint(1, 40))))
        else:
            chunks.append(b"\x01" * rng.randint(P.MAX_ENCODED - 5, P.MAX_ENCODED + 600))
    stream = b"".join(b"\x00" + c for c in chunks) + b"\x00"
    got = c_receive(cproto, stream)
    assert len(got) == len(chunks)
    for (verdict, data), enc in zip(got, chunks):
        assert verdict == _py_verdict(enc), enc[:20]
        if verdict == "frame":
            assert data == P.cobs_decode(enc)


def test_c_decoder_skips_empty_frames(cproto):
    stream = b"\x00\x00\x00" + P.encode(P.INFO, 9) + b"\x00\x00"
    assert c_receive(cproto, stream) == [("frame", P.frame_bytes(P.INFO, 9))]
