"""Training text: Jane Austen's six novels from Debian's r-cran-janeaustenr (public domain).

The package stores them as an R lazy-load database (Rdata.rdx index + Rdata.rdb zlib chunks);
the `rdata` package parses R serialisation, so no R is needed.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

JANEAUSTENR_DATA = Path("/usr/lib/R/site-library/janeaustenr/data")
# Publication order; the held-out validation split is the tail of the last one.
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
          "persuasion"]


class CorpusError(Exception):
    pass


def _reflow(lines) -> str:
    """Join the wrapped lines of a paragraph with spaces, paragraphs with newlines."""
    paras, cur = [], []
    for line in lines:
        line = str(line).strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n".join(paras) + "\n"


def austen_novels(data_dir: Path = JANEAUSTENR_DATA) -> dict[str, str]:
    import warnings

    import rdata

    rdx, rdb = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    if not rdx.exists() or not rdb.exists():
        raise CorpusError(f"{data_dir}: janeaustenr data not found (apt-get install r-cran-janeaustenr)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx.read_bytes())))
        blob = rdb.read_bytes()
        out = {}
        for name in NOVELS:
            off, n = (int(v) for v in index["variables"][name])
            chunk = zlib.decompress(blob[off + 4:off + n])  # 4-byte length, then zlib
            out[name] = _reflow(rdata.conversion.convert(rdata.parser.parse_data(chunk)))
    return out


def load_text(corpus: str | None = None) -> str:
    """The default corpus (Austen), or a user's UTF-8 text file."""
    if corpus is None:
        return "".join(austen_novels().values())
    p = Path(corpus)
    if not p.is_file():
        raise CorpusError(f"{corpus}: no such file")
    raw = p.read_bytes()
    if b"\0" in raw[:65536]:
        raise CorpusError(f"{corpus}: looks binary (NUL bytes), expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{corpus}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text[:100000])
    if len(text) < 10000:
        raise CorpusError(f"{corpus}: only {len(text)} characters; need at least 10,000 to train")
    if printable < 0.95 * min(len(text), 100000):
        raise CorpusError(f"{corpus}: mostly non-printable characters, expected text")
    return text
