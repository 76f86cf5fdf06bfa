"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with a checksum bound to the model."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bakedllama.fileformat import ModelFileError, atomic_write_bytes

BOS = "<s>"
EOS = "</s>"


class Tokenizer:
    def __init__(self, tk):
        self.tk = tk
        self.json = tk.to_str()
        self.sha256 = hashlib.sha256(self.json.encode()).hexdigest()
        self.bos_id = tk.token_to_id(BOS)
        self.eos_id = tk.token_to_id(EOS)
        self.vocab_size = tk.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tk.encode(text).ids
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, [self.json.encode()])

    @classmethod
    def load(cls, path: str | Path, expect_sha256: str | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as TK

        path = Path(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelFileError(f"{path}: no such tokenizer file") from None
        except IsADirectoryError:
            raise ModelFileError(f"{path}: is a directory, not a tokenizer file") from None
        except PermissionError:
            raise ModelFileError(f"{path}: permission denied") from None
        except UnicodeDecodeError:
            raise ModelFileError(f"{path}: tokenizer is not UTF-8 JSON") from None
        try:
            tok = cls(TK.from_str(raw))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
            raise ModelFileError(f"{path}: not a valid tokenizer ({str(e).splitlines()[0]})") from None
        if expect_sha256 is not None and tok.sha256 != expect_sha256:
            raise ModelFileError(f"{path}: tokenizer checksum {tok.sha256[:12]} does not match "
                                 f"the model's {expect_sha256[:12]}")
        return tok


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (256 bytes + specials + merges)."""
    from tokenizers import Tokenizer as TK
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    chunk = 1 << 16
    tk.train_from_iterator((text[i:i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
    if tk.get_vocab_size() != vocab_size:
        raise ValueError(f"tokenizer has {tk.get_vocab_size()} tokens, wanted {vocab_size}")
    return Tokenizer(tk)
