"""Bake the trained float checkpoint into the integer model and measure it (step 2 of make weights).

Reads <dir>/model-f32.bkl + tokenizer.json, calibrates the fixed-point formats on windows of the
training split, quantizes with --scheme, evaluates float and golden validation loss on the whole
held-out split, and writes <dir>/model-q.bkl (atomically) and <dir>/eval.json.
Usage: python -m weights.quantize [--dir weights/tiny] [--scheme w4e6] [--corpus FILE] [--compare]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from bakedllama import fileformat
from bakedllama.bake import DEFAULT_SCHEME, SCHEMES, bake, calibration_windows, write_baked
from bakedllama.evaluate import evaluate
from bakedllama.fileformat import ModelFileError
from bakedllama.model import load_baked, load_float
from bakedllama.tokenizer import Tokenizer

from weights.corpus import CorpusError, load_text
from weights.train import VAL_FRACTION


def split_ids(tok: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(tok.encode(text, bos=True), dtype=np.int64)
    n_val = int(len(ids) * VAL_FRACTION)
    return ids[:-n_val], ids[-n_val:]


def load_dir(d: Path, corpus: str | None):
    """(cfg, float weights, float meta, tokenizer, train ids, val ids) of a model directory."""
    cfg, w, fmeta = load_float(d / "model-f32.bkl")
    tok = Tokenizer.load(d / "tokenizer.json", fmeta.get("tokenizer_sha256"))
    train_ids, val_ids = split_ids(tok, load_text(corpus))
    return cfg, w, fmeta, tok, train_ids, val_ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="weights/tiny")
    ap.add_argument("--scheme", default=DEFAULT_SCHEME, choices=sorted(SCHEMES))
    ap.add_argument("--corpus", help="the text the model was trained on (default: Austen)")
    ap.add_argument("--compare", action="store_true", help="also evaluate every other scheme")
    ap.add_argument("--eval-only", action="store_true", help="re-measure eval.json with today's "
                    "numerics and keep the baked model-q.bkl (its meta keeps the bake-time losses)")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    try:
        cfg, w, fmeta, tok, train_ids, val_ids = load_dir(d, args.corpus)
    except (ModelFileError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    calib = calibration_windows(train_ids, cfg.seq_len)
    results, float_cache = {}, {}
    for scheme in ([args.scheme] + sorted(set(SCHEMES) - {args.scheme})) if args.compare else [args.scheme]:
        meta, tensors = bake(cfg, w, calib, scheme, dict(
            tokenizer_sha256=tok.sha256, float_sha256=fileformat.file_sha256(d / "model-f32.bkl"),
            source="weights/tiny (Jane Austen, janeaustenr)"))
        tmp = d / f".eval-{scheme.replace('/', '_')}.bkl"
        write_baked(tmp, meta, tensors)
        ev = evaluate(cfg, w, load_baked(tmp), val_ids, float_cache=float_cache)
        tmp.unlink()
        results[scheme] = ev
        print(f"{scheme:6s} val loss float {ev['val_loss_float']:.4f}  golden {ev['val_loss_golden']:.4f}  "
              f"(+{ev['val_loss_golden'] - ev['val_loss_float']:.4f})  top-1 agreement "
              f"{ev['top1_agreement']:.4f}  KL {ev['kl_float_golden']:.4f}  ({ev['tokens']:,} tokens)")
        if scheme == args.scheme and not args.eval_only:
            meta.update(val_loss_float=ev["val_loss_float"], val_loss_golden=ev["val_loss_golden"],
                        top1_agreement=ev["top1_agreement"])
            digest = write_baked(d / "model-q.bkl", meta, tensors)
            print(f"wrote {d / 'model-q.bkl'} sha256 {digest}")
    if args.eval_only and not args.compare and (d / "eval.json").exists():  # keep the other rows
        results = {**json.loads((d / "eval.json").read_text()), **results}
    fileformat.atomic_write_bytes(d / "eval.json", [json.dumps(results, indent=1).encode()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
