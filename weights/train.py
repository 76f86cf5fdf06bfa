"""Train the tiny Llama (RMSNorm, RoPE, GQA, SwiGLU, tied embeddings) on the Austen corpus.

Reproducible: fixed seeds, one thread, deterministic torch. Writes, each atomically:
    <out>/tokenizer.json     byte-level BPE (tokenizers)
    <out>/model-f32.bkl      float checkpoint (bakedllama container, checksummed)
    <out>/train-log.json     losses per evaluation; <out>/train-loss.png the curve
Usage: python -m weights.train [--preset tiny|target] [--corpus FILE] [--steps N] [--out DIR]

--preset target trains the speculative-decoding target (8.3x the baked model's parameters) with the
tiny model's tokenizer, corpus and split, and also writes it in the Hugging Face Llama layout
(config.json, model.safetensors in bf16, tokenizer.json) for `run8b` and `generate --target`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from bakedllama import fileformat
from bakedllama.config import ModelConfig
from bakedllama.tokenizer import Tokenizer, train_tokenizer

from weights.corpus import CorpusError, load_text

VAL_FRACTION = 0.05
TINY_TOKENIZER = Path(__file__).resolve().parent / "tiny" / "tokenizer.json"
# name -> (config, defaults); the target shares the baked model's vocabulary, context and tokenizer
PRESETS = {
    "tiny": (ModelConfig(), dict(out="weights/tiny", steps=6000, lr=3e-3, tokenizer=None)),
    "target": (ModelConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, hidden_dim=704),
               dict(out="weights/target", steps=2000, lr=2e-3, tokenizer=str(TINY_TOKENIZER))),
}


def build_model(cfg: ModelConfig):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class RMSNorm(nn.Module):
        def __init__(self, dim, eps):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rope(x, cos, sin):
        # x: (B, T, H, hd); interleaved pairs (2i, 2i+1) as in llama2.c
        xr, xi = x[..., 0::2], x[..., 1::2]
        out_r = xr * cos - xi * sin
        out_i = xr * sin + xi * cos
        return torch.stack([out_r, out_i], dim=-1).flatten(-2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            hd = cfg.head_dim
            self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
            self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
            self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
            self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
            self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
            self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
            self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            h = self.attention_norm(x)
            q = self.wq(h).view(B, T, cfg.n_heads, cfg.head_dim)
            k = self.wk(h).view(B, T, cfg.n_kv_heads, cfg.head_dim)
            v = self.wv(h).view(B, T, cfg.n_kv_heads, cfg.head_dim)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            k = k.repeat_interleave(cfg.kv_mul, dim=2)
            v = v.repeat_interleave(cfg.kv_mul, dim=2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            x = x + self.wo(a.transpose(1, 2).reshape(B, T, cfg.dim))
            h = self.ffn_norm(x)
            return x + self.w2(F.silu(self.w1(h)) * self.w3(h))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(Block() for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            if cfg.tied_embeddings:
                self.output.weight = self.tok_embeddings.weight
            freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
            ang = torch.outer(torch.arange(cfg.seq_len).float(), freqs)  # (seq_len, hd/2)
            self.register_buffer("cos", ang.cos()[None, :, None, :], persistent=False)
            self.register_buffer("sin", ang.sin()[None, :, None, :], persistent=False)
            self.apply(self._init)
            for n, p in self.named_parameters():
                if n.endswith("wo.weight") or n.endswith("w2.weight"):
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))

        @staticmethod
        def _init(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

        def forward(self, tokens, targets=None):
            T = tokens.shape[1]
            x = self.tok_embeddings(tokens)
            cos, sin = self.cos[:, :T], self.sin[:, :T]
            for layer in self.layers:
                x = layer(x, cos, sin)
            logits = self.output(self.norm(x))
            if targets is None:
                return logits
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return Llama()


def state_to_numpy(model, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Torch state -> the llama2.c-style names used everywhere else (wq, wk, ..., rms_att_weight)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"tok_embeddings": sd["tok_embeddings.weight"]}
    for name in ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3"):
        src = {"rms_att_weight": "attention_norm.weight", "rms_ffn_weight": "ffn_norm.weight"}.get(
            name, f"{name}.weight")
        out[name] = np.stack([sd[f"layers.{i}.{src}"] for i in range(cfg.n_layers)])
    out["rms_final_weight"] = sd["norm.weight"]
    if not cfg.tied_embeddings:
        out["wcls"] = sd["output.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def encode_corpus(tok: Tokenizer, text: str) -> np.ndarray:
    ids = tok.encode(text, bos=True)
    return np.asarray(ids, dtype=np.int32)


def _state_args(args) -> dict:
    """The settings a resumed run must share with the run that wrote the state (not the thread
    count: a run may go on with fewer threads when the machine is busy)."""
    return dict(preset=args.preset, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                corpus=args.corpus, tokenizer=args.tokenizer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="UTF-8 text file (default: Jane Austen's novels)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="tiny: the baked model; target: the speculative-decoding target")
    ap.add_argument("--out", help="output directory (default weights/<preset>)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: tiny 6000, target 2000)")
    ap.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one "
                    "(default for the target: weights/tiny/tokenizer.json)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, help="peak learning rate (default: tiny 3e-3, target 2e-3)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true", help="save the training state at every "
                    "evaluation (<out>/train-state.pt) and continue from it if present")
    args = ap.parse_args(argv)
    cfg, defaults = PRESETS[args.preset]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    import torch
    from tqdm import tqdm

    try:
        text = load_text(args.corpus)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    if args.tokenizer:
        try:
            tok = Tokenizer.load(args.tokenizer)
        except fileformat.ModelFileError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if tok.vocab_size != cfg.vocab_size:
            print(f"error: {args.tokenizer} has {tok.vocab_size} tokens, the {args.preset} model "
                  f"{cfg.vocab_size}", file=sys.stderr)
            return 2
    else:
        tok = train_tokenizer(text, cfg.vocab_size)
    data = encode_corpus(tok, text)
    n_val = int(len(data) * VAL_FRACTION)
    train, val = data[:-n_val], data[-n_val:]
    print(f"corpus: {len(text):,} chars -> {len(data):,} tokens ({len(text) / len(data):.2f} chars/token); "
          f"train {len(train):,}, val {len(val):,}")

    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == cfg.param_count(), (n_params, cfg.param_count())
    print(f"model: {n_params:,} parameters, {cfg}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    T = cfg.seq_len
    warmup = max(1, args.steps // 50)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    @torch.no_grad()
    def val_loss():
        model.eval()
        n = (len(val) - 1) // T
        xs = torch.from_numpy(val[: n * T].astype(np.int64)).view(n, T)
        ys = torch.from_numpy(val[1: n * T + 1].astype(np.int64)).view(n, T)
        tot = 0.0
        for i in range(0, n, 32):
            _, loss = model(xs[i:i + 32], ys[i:i + 32])
            tot += loss.item() * len(xs[i:i + 32])
        model.train()
        return tot / n

    log = []
    t0 = time.time()
    start = 0
    state_path = Path(args.out) / "train-state.pt"  # resumable: written at every evaluation
    if args.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        if {k: v for k, v in st["args"].items() if k != "threads"} != _state_args(args):
            print(f"error: {state_path} was written with other settings ({st['args']})", file=sys.stderr)
            return 2
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        start, log = st["step"], st["log"]
        t0 -= log[-1]["seconds"] if log else 0.0
        print(f"resuming at step {start} from {state_path}")
    bar = tqdm(range(start, args.steps), desc="train", unit="step", initial=start, total=args.steps)
    for step in bar:
        ix = rng.integers(0, len(train) - T - 1, args.batch)
        x = torch.from_numpy(np.stack([train[i:i + T] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([train[i + 1:i + T + 1] for i in ix]).astype(np.int64))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            vl = val_loss()
            log.append(dict(step=step + 1, train_loss=loss.item(), val_loss=vl,
                            seconds=time.time() - t0, tokens=(step + 1) * args.batch * T))
            tqdm.write(f"step {step + 1}: train {loss.item():.4f} val {vl:.4f} "
                       f"({log[-1]['tokens'] / log[-1]['seconds']:,.0f} tok/s)")
            if args.resume:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                tmp = state_path.with_suffix(".tmp")
                torch.save(dict(args=_state_args(args), model=model.state_dict(), opt=opt.state_dict(),
                                rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(),
                                step=step + 1, log=log), tmp)
                tmp.replace(state_path)

    tensors = state_to_numpy(model, cfg)
    meta = dict(config=cfg.to_dict(), tokenizer_sha256=tok.sha256, val_loss=log[-1]["val_loss"],
                train=dict(preset=args.preset, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                           corpus=args.corpus or "janeaustenr", val_fraction=VAL_FRACTION,
                           seconds=round(time.time() - t0, 1)))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.json")
    if args.preset == "tiny":  # the target's float weights live in its Hugging Face directory
        digest = fileformat.save(out / "model-f32.bkl", "float", meta, tensors)
    fileformat.atomic_write_bytes(out / "train-log.json", [json.dumps(log, indent=1).encode()])
    if args.preset == "target":
        from weights.hf_export import write_hf

        write_hf(out, cfg, tensors, tok, dict(val_loss=log[-1]["val_loss"], **meta["train"]))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["tokens"] / 1e6 for r in log], [r["train_loss"] for r in log], label="train (batch)")
        ax.plot([r["tokens"] / 1e6 for r in log], [r["val_loss"] for r in log], label="validation")
        ax.set_xlabel("tokens seen (M)")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "train-loss.png", dpi=100)
    except Exception as e:  # the plot is a convenience; the checkpoint is what matters
        print(f"warning: no loss plot ({e})", file=sys.stderr)
    if args.preset == "tiny":
        print(f"wrote {out / 'model-f32.bkl'} sha256 {digest[:16]}, val loss {log[-1]['val_loss']:.4f}")
    else:
        print(f"wrote {out} (Hugging Face layout), val loss {log[-1]['val_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
