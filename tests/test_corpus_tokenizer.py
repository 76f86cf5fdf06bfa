import numpy as np
import pytest
from bakedllama.fileformat import ModelFileError
from bakedllama.tokenizer import Tokenizer, train_tokenizer

from weights.corpus import NOVELS, CorpusError, austen_novels, load_text


def test_austen_corpus_is_read_from_the_debian_package():
    novels = austen_novels()
    assert list(novels) == NOVELS
    assert novels["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in novels["prideprejudice"]
    assert 3_500_000 < sum(map(len, novels.values())) < 4_500_000


@pytest.mark.parametrize("content,msg", [
    (b"\x00\x01\x02" * 5000, "binary"),
    (b"\xff\xfe caf\xe9 " * 3000, "not UTF-8"),
    (b"too short", "at least 10,000"),
])
def test_bad_corpus_files(tmp_path, content, msg):
    p = tmp_path / "c.txt"
    p.write_bytes(content)
    with pytest.raises(CorpusError, match=msg):
        load_text(str(p))
    with pytest.raises(CorpusError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))


def test_tokenizer_train_round_trip_and_checksum(tmp_path):
    text = "It was a truth universally acknowledged. Emma Woodhouse, handsome, clever. " * 200
    tok = train_tokenizer(text, 300)
    assert tok.vocab_size == 300
    ids = tok.encode("It was Emma, café ü", bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids) == "It was Emma, café ü"
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json", tok.sha256)
    assert again.encode("handsome") == tok.encode("handsome")
    with pytest.raises(ModelFileError, match="does not match"):
        Tokenizer.load(tmp_path / "t.json", "0" * 64)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path / "bad.json")
    assert np.all(np.asarray(ids) < 300)
