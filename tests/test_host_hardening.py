"""The host trusts nothing it reads: misbehaving devices (host/bakedllama/device/fake.py, scripted
devices on 127.0.0.1), model files whose checksum is right but whose header is not, and the CLI's
bad-input table (every case: exit 2, one line naming the cause, no traceback)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from bakedllama import fileformat
from bakedllama.device import DeviceError, generate_on_device
from bakedllama.device.fake import FakeDevice
from bakedllama.model import load_baked
from bakedllama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "bakedllama.cli"]


@pytest.fixture(scope="module")
def model():
    return load_baked()


@pytest.fixture(scope="module")
def ids():
    return Tokenizer.load(ROOT / "weights" / "tiny" / "tokenizer.json").encode("It was", bos=True)


# ---------------------------------------------------------------- devices

@pytest.mark.parametrize("mode,pattern,most", [
    ("endless", "more tokens than the 8 asked", 8),
    ("double", "more tokens than the 8 asked", 8),
    ("bad_token", "token 60000, outside the vocabulary of 512", 0),
    ("short_step", "TOKENS of 14 bytes says 4 tokens", 0),
    ("short_info", "INFO reply of 40 bytes, expected 48", 0),
    ("wrong_type", "answered INFO with a STATS reply", 0),
    ("stale_seq", "INFO within 2 s: 1 frames, none answering it", 0),
    ("vanish", r"disconnected or unusable .*\(3 of 8 tokens arrived\)", 3),
    ("stall", r"nothing within [0-9.]+ s .*\(3 of 8 tokens arrived\)", 3),
    ("babble", "no valid frame", 0),
    ("old_protocol", "device speaks protocol 0", 0),
])
def test_misbehaving_devices_end_in_one_error(model, ids, mode, pattern, most):
    """Never more tokens than asked, never a token outside the vocabulary, no hang: one
    DeviceError naming what the device did (and how many tokens arrived)."""
    import bakedllama.device.transport as T

    got = []
    with FakeDevice(model, mode) as fake:
        dev = T.open_device(fake.url, timeout=2.0, step_timeout=0.5, retries=1)
        with dev:
            with pytest.raises(DeviceError, match=pattern):
                info = dev.info()
                T.check_model(info, model, dev.url)
                for t in dev.generate(ids, 8, vocab_size=model.cfg.vocab_size):
                    got.append(t)
    assert len(got) == most and all(0 <= t < 512 for t in got)


def test_a_well_behaved_fake_device_generates_golden(model, ids):
    """The harness itself: in its default mode the fake device is golden behind protocol v1."""
    from bakedllama.golden import Golden, generate

    with FakeDevice(model) as fake:
        r = generate_on_device(fake.url, model, ids, 8)
    assert r["tokens"] == list(generate(Golden(model), ids, 8))


def _cli(*argv, stdout=subprocess.PIPE, timeout=120):
    return subprocess.run([*CLI, *argv], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)


def test_cli_ends_streamed_text_with_a_newline_before_the_error(model):
    with FakeDevice(model, "vanish") as fake:
        r = _cli("generate", "It was", "--max-tokens", "8", "--device", fake.url)
    assert r.returncode == 2
    assert r.stdout.startswith("It was") and r.stdout.endswith("\n") and len(r.stdout) > 8
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "3 of 8 tokens arrived" in err[0]


# ---------------------------------------------------------------- model files

def _container(path: Path, header) -> None:
    """A container whose checksum is right whatever its header says."""
    raw = json.dumps(header).encode()
    head = fileformat.MAGIC + struct.pack("<II", fileformat.FORMAT_VERSION, len(raw)) + raw
    head += b"\0" * ((-len(head)) % 64) + bytes(64)
    path.write_bytes(head + hashlib.sha256(head).digest())


GOOD_ENTRY = dict(name="t", dtype="int8", shape=[4], offset=0, nbytes=4)


@pytest.mark.parametrize("header,pattern", [
    ([1, 2, 3], "a JSON list, not an object"),
    (dict(kind="baked", tensors=[]), "no 'meta' object"),
    (dict(kind="baked", meta={}), "no 'tensors' list"),
    (dict(kind="baked", meta={}, tensors=[7]), "tensor entry 0 is not an object"),
    (dict(kind="baked", meta={}, tensors=[dict(GOOD_ENTRY, dtype="object")]), "dtype 'object'"),
    (dict(kind="baked", meta={}, tensors=[dict(GOOD_ENTRY, shape=[-4])]), "shape \\[-4\\]"),
    (dict(kind="baked", meta={}, tensors=[dict(GOOD_ENTRY, shape="4")]), "shape '4'"),
    (dict(kind="baked", meta={}, tensors=[dict(GOOD_ENTRY, offset=-64)]), "offset -64"),
    (dict(kind="baked", meta={}, tensors=[dict(GOOD_ENTRY, nbytes=8)]), "8 bytes do not hold"),
    (dict(kind="baked", meta={}, tensors=[GOOD_ENTRY, GOOD_ENTRY]), "appears twice"),
    (dict(kind="baked", meta={}, tensors=[dict(GOOD_ENTRY, offset=4096)]), "runs past the end"),
    (dict(kind="baked", meta={}, tensors=[GOOD_ENTRY]), "lacks 'config'"),
])
def test_malformed_headers_are_model_file_errors(tmp_path, header, pattern):
    p = tmp_path / "m.bkl"
    _container(p, header)
    with pytest.raises(fileformat.ModelFileError, match=pattern):
        load_baked(p)


# ---------------------------------------------------------------- the CLI's bad-input table

def _bad_model(tmp_path: Path) -> Path:
    p = tmp_path / "bad.bkl"
    _container(p, dict(kind="baked", tensors=[]))
    return p


BAD_INPUT = [
    # (argv, the cause the one line names); MODEL / TMP are filled in below
    (["generate", "It was", "--model", "MODEL", "--device", "golden"], "no 'meta' object"),
    (["generate", "It was", "--tokenizer", "TMP", "--device", "golden"], "is a directory"),
    (["generate", "It was", "--model", "TMP", "--device", "golden"], "is a directory"),
    (["generate", "It was", "--model", "/nonexistent.bkl"], "no such file"),
    (["generate", "It \udcff was", "--device", "golden"], "not valid UTF-8"),
    (["generate", "", "--device", "golden"], "the prompt is empty"),
    (["generate", "It was", "--temperature", "nan", "--device", "golden"], "finite number"),
    (["generate", "It was", "--temperature", "inf", "--device", "golden"], "finite number"),
    (["generate", "It was", "--temperature", "-1", "--device", "golden"], "finite number"),
    (["generate", "It was", "--top-k", "-1", "--device", "golden"], "--top-k must be >= 0"),
    (["generate", "It was", "--max-tokens", "0", "--device", "golden"], "at least 1"),
    (["generate", "It was", "--max-tokens", "9999", "--device", "golden"], "exceeds the context"),
    (["generate", "It was", "--device", "socket://127.0.0.1"], "needs a host and a port"),
    (["generate", "It was", "--device", "socket://127.0.0.1:99999"], "needs a host and a port"),
    (["generate", "It was", "--device", "/dev/nonexistent-tty"], "cannot open /dev/nonexistent-tty"),
    (["generate", "It was", "--device", "socket://127.0.0.1:1"], "cannot open socket://127.0.0.1:1"),
    (["generate", "It was", "--top-k", "5", "--device", "socket://127.0.0.1:1"], "golden model only"),
    (["info", "--model", "MODEL"], "no 'meta' object"),
    (["serve", "--max-queue", "0", "--device", "golden"], "--max-queue must be at least 1"),
    (["run8b", "--checkpoint", "/nonexistent/dir", "It was"], "error: "),
]


@pytest.mark.parametrize("argv,cause", BAD_INPUT, ids=[" ".join(a[1:4]) for a, _ in BAD_INPUT])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, argv, cause):
    argv = [str(_bad_model(tmp_path)) if a == "MODEL" else str(tmp_path) if a == "TMP" else a
            for a in argv]
    r = subprocess.run([*CLI, *argv], cwd=ROOT, capture_output=True, timeout=120,
                       errors="surrogateescape")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert len(err) == 1 and err[0].startswith("error: ") and cause in err[0], err
    assert "Traceback" not in r.stderr


def test_cli_output_on_a_full_disk_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        r = _cli("generate", "It was", "--max-tokens", "4", "--device", "golden", stdout=full)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "cannot write the output" in err[0], r.stderr


def test_a_corrupt_model_does_not_cost_the_cached_simulator(tmp_path):
    """`python -m bakedllama.device --model CORRUPT` refuses before it touches the build."""
    from bakedllama.device.sim import BUILD_ROOT

    keep = BUILD_ROOT / "sim-real" / "keep-me"
    existed = keep.parent.exists()
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text("a cached build")
    try:
        r = subprocess.run([sys.executable, "-m", "bakedllama.device", "--build-only", "--model",
                            str(_bad_model(tmp_path))], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "cannot build the simulator" in r.stderr, r.stderr
        assert keep.read_text() == "a cached build"
    finally:
        keep.unlink()
        if not existed:
            keep.parent.rmdir()


def test_a_taken_sim_port_is_named(tmp_path):
    import socket

    from bakedllama.device.sim import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(DeviceError, match=f"cannot listen on 127.0.0.1:{port}"):
            launch(tmp_path, port=port)
