"""How far two bakes of the tiny model disagree with each other (not with float): top-1 and KL.

Bakes <dir>/model-f32.bkl with scheme A and scheme B (the same calibration as weights.quantize),
runs both golden models teacher-forced over windows of the held-out split and compares their
logits with the 8B path's measure (bakedllama.llama8b.agreement.compare).
Usage: python -m weights.agree [--dir weights/tiny] [--a w8] [--b w3/6] [--windows 16]"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bakedllama import fileformat
from bakedllama.bake import SCHEMES, bake, calibration_windows, write_baked
from bakedllama.evaluate import golden_logits, windows
from bakedllama.fileformat import ModelFileError
from bakedllama.llama8b.agreement import compare
from bakedllama.model import load_baked

from weights.corpus import CorpusError
from weights.quantize import load_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="weights/tiny")
    ap.add_argument("--a", default="w8", choices=sorted(SCHEMES))
    ap.add_argument("--b", default="w3/6", choices=sorted(SCHEMES))
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of seq_len tokens")
    ap.add_argument("--corpus", help="the text the model was trained on (default: Austen)")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    try:
        cfg, w, _, tok, train_ids, val_ids = load_dir(d, args.corpus)
    except (ModelFileError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    calib = calibration_windows(train_ids, cfg.seq_len)
    x, _ = windows(val_ids, cfg.seq_len)
    x = x[:args.windows]
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in (args.a, args.b):
            meta, tensors = bake(cfg, w, calib, scheme, dict(
                tokenizer_sha256=tok.sha256, float_sha256=fileformat.file_sha256(d / "model-f32.bkl")))
            p = Path(tmp) / "m.bkl"
            write_baked(p, meta, tensors)
            logits[scheme] = golden_logits(load_baked(p), x).reshape(-1, cfg.vocab_size)
    res = dict(a=args.a, b=args.b, **compare(logits[args.a], logits[args.b]))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
