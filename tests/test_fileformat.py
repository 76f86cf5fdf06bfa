import numpy as np
import pytest
from bakedllama import fileformat
from bakedllama.fileformat import ModelFileError


def _save(tmp_path):
    t = {"a": np.arange(12, dtype=np.int8).reshape(3, 4), "b": np.float32([1.5, -2]),
         "s": np.asarray(7, dtype=np.int32)}
    p = tmp_path / "m.bkl"
    digest = fileformat.save(p, "baked", {"x": 1}, t)
    return p, t, digest


def test_round_trip_including_0d(tmp_path):
    p, t, digest = _save(tmp_path)
    header, got, d2 = fileformat.load(p, kind="baked")
    assert d2 == digest and header["meta"] == {"x": 1}
    for k in t:
        assert got[k].dtype == t[k].dtype and got[k].shape == t[k].shape
        assert (got[k] == t[k]).all()


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[:-40], "checksum"),
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "checksum"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b"", "bad magic"),
])
def test_corruption_is_detected(tmp_path, mutate, msg):
    p, _, _ = _save(tmp_path)
    p.write_bytes(mutate(p.read_bytes()))
    with pytest.raises(ModelFileError, match=msg):
        fileformat.load(p)


def test_wrong_kind_and_missing(tmp_path):
    p, _, _ = _save(tmp_path)
    with pytest.raises(ModelFileError, match="expected 'float'"):
        fileformat.load(p, kind="float")
    with pytest.raises(ModelFileError, match="no such file"):
        fileformat.load(tmp_path / "nope.bkl")


def test_failed_write_leaves_nothing(tmp_path):
    p = tmp_path / "out.bkl"
    with pytest.raises(ValueError):
        fileformat.save(p, "baked", {}, {"bad": np.array(["str"])})
    assert list(tmp_path.iterdir()) == []

    def chunks():
        yield b"partial"
        raise RuntimeError("disk gone")
    with pytest.raises(RuntimeError):
        fileformat.atomic_write_bytes(p, chunks())
    assert list(tmp_path.iterdir()) == []
