"""The `bakedllama` command line: generate, info, serve, run8b."""

from __future__ import annotations

import argparse
import json
import sys
import time

from bakedllama.fileformat import ModelFileError

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2."""


def _load(model_path, tokenizer_path):
    from bakedllama.model import DEFAULT_BAKED, DEFAULT_TOKENIZER, load_baked
    from bakedllama.tokenizer import Tokenizer

    model = load_baked(model_path or DEFAULT_BAKED)
    tok = Tokenizer.load(tokenizer_path or DEFAULT_TOKENIZER, model.meta.get("tokenizer_sha256"))
    return model, tok


def prompt_ids(tok, prompt: str, seq_len: int, max_tokens: int) -> list[int]:
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
        raise UserError("the prompt is not valid UTF-8 text") from None
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    ids = tok.encode(prompt, bos=True)
    if len(ids) + max_tokens > seq_len:
        raise UserError(f"prompt is {len(ids)} tokens; with --max-tokens {max_tokens} that exceeds the "
                        f"context of {seq_len} tokens (shorten the prompt or ask for fewer tokens)")
    return ids


class TextStream:
    """Prints decoded text as tokens arrive (decoding the whole list keeps multi-byte chars whole)."""

    def __init__(self, tok, out, enabled: bool):
        self.tok, self.out, self.enabled, self.ids, self.shown = tok, out, enabled, [], ""

    def push(self, t: int) -> None:
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if self.enabled and not text.endswith("\ufffd"):
            self.write(text[len(self.shown):])
            self.shown = text

    def write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            raise
        except OSError as e:  # a full disk, a closed terminal
            raise UserError(f"cannot write the output: {e.strerror or e}") from None

    def end_line(self) -> None:
        """Before an error line: the streamed text (the prompt included) ends with a newline, so
        the error is not glued to it."""
        if self.enabled:
            try:
                self.out.write("\n")
                self.out.flush()
            except OSError:
                pass

    def text(self) -> str:
        return self.tok.decode(self.ids)


def cmd_generate(args) -> int:
    from bakedllama.golden import Golden, generate

    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise UserError("--temperature must be a finite number >= 0")
    if args.top_k < 0:
        raise UserError("--top-k must be >= 0")
    model, tok = _load(args.model, args.tokenizer)
    ids = prompt_ids(tok, args.prompt, model.cfg.seq_len, args.max_tokens)
    if args.target or args.draft_tokens is not None:
        return _generate_speculative(args, model, tok, ids)
    device = args.device or "sim"  # no --device: the Verilator SoC (built once, cached)
    stream = TextStream(tok, sys.stdout, not args.json)
    if args.top_k and device != "golden":
        raise UserError("--top-k runs on the golden model only (the hardware sampler has no top-k)")
    stream.write("" if args.json else args.prompt)
    cycles = chip = None
    t0 = time.perf_counter()
    if device == "golden":
        for t in generate(Golden(model), ids, args.max_tokens, args.temperature, args.seed, args.top_k):
            stream.push(t)
        dt = time.perf_counter() - t0
        tps = round(len(stream.ids) / dt, 2) if dt > 0 else None
    else:
        from bakedllama.device import DeviceError, generate_on_device

        try:
            r = generate_on_device(None if device == "sim" else device, model, ids, args.max_tokens,
                                   args.temperature, args.seed, on_token=stream.push,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
        except DeviceError as e:
            stream.end_line()
            raise UserError(str(e)) from None
        device, cycles, tps = r["device"], r["cycles_per_token"], r["tokens_per_s"]
        chip = dict(chip_cycles=r["chip_cycles"], chip_tokens_per_s=r["chip_tokens_per_s"],
                    wall_cycles_per_token=r["wall_cycles_per_token"], sys_clk_freq=r["sys_clk_freq"],
                    **({"bus": r["bus"]} if "bus" in r else {}))  # CSR devices: words per token
    n = len(stream.ids)
    result = dict(prompt=args.prompt, device=device, prompt_tokens=ids, tokens=stream.ids,
                  text=stream.text(), tokens_per_s=tps,
                  cycles_per_token=cycles, temperature=args.temperature, seed=args.seed,
                  model_sha256=model.sha256)
    if chip:
        result.update(chip)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n[{n} tokens, {result['tokens_per_s']} tokens/s on {device}]", file=sys.stderr)
    return 0


def _generate_speculative(args, model, tok, ids) -> int:
    from bakedllama import spec_cli
    from bakedllama.device import DeviceError

    if not args.target:
        raise UserError("--draft-tokens needs --target DIR (the model that verifies the drafts)")
    if args.top_k and not args.temperature:
        raise UserError("--top-k needs --temperature > 0 (greedy speculative decoding has no cut)")
    stream = TextStream(tok, sys.stdout, not args.json)
    stream.write("" if args.json else args.prompt)
    try:
        r = spec_cli.run(args, model, tok, ids, stream, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, DeviceError) as e:
        stream.end_line()
        raise UserError(str(e)) from None
    r.update(prompt=args.prompt, prompt_tokens=ids, text=stream.text(), model_sha256=model.sha256,
             target=str(args.target))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"\n[{len(r['tokens'])} tokens, {r['tokens_per_s']} tokens/s; draft {r['device']}, "
              f"K={r['draft_tokens']}: acceptance {r['acceptance_rate']}, "
              f"{r['tokens_per_target_pass']} tokens per target pass"
              + (f", projected speedup {r['projected_speedup']}x" if r.get("projected_speedup") else "")
              + "]", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from bakedllama.budget import format_budget

    model, tok = _load(args.model, args.tokenizer)
    c, f = model.cfg, model.fmt
    if args.device:
        from bakedllama.device import DeviceError, device_info

        try:  # refuses a device whose model identity differs from this model's (and tokenizer's)
            d = device_info(None if args.device == "sim" else args.device, model,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
        except DeviceError as e:
            raise UserError(str(e)) from None
        if args.json:
            print(json.dumps(d))
        else:
            print(f"device      {d['board']}, firmware {d['firmware']}, protocol {d['protocol']}, "
                  f"clock {d['sys_clk_freq'] / 1e6:.2f} MHz")
            print(f"identity    0x{d['model_id']} (matches the host's model)")
            print(f"config      dim {d['dim']}, layers {d['n_layers']}, heads {d['n_heads']} "
                  f"(kv {d['n_kv_heads']}), hidden {d['hidden_dim']}, vocab {d['vocab_size']}, "
                  f"context {d['seq_len']}, lanes {d['lanes']}")
        return 0
    if args.json:
        print(json.dumps(dict(config=c.to_dict(), params=c.param_count(), sha256=model.sha256,
                              identity=f"{model.identity():08x}", numerics=f,
                              tokenizer_sha256=tok.sha256)))
        return 0
    print(f"model       {model.meta.get('source', 'weights/tiny')}  sha256 {model.sha256}")
    print(f"identity    0x{model.identity():08x}   tokenizer sha256 {tok.sha256[:16]}")
    print(f"config      dim {c.dim}, layers {c.n_layers}, heads {c.n_heads} (kv {c.n_kv_heads}), "
          f"hidden {c.hidden_dim}, vocab {c.vocab_size}, context {c.seq_len}, "
          f"{'tied' if c.tied_embeddings else 'untied'} embeddings")
    print(f"parameters  {c.param_count():,}")
    print(f"numerics    scheme {f['scheme']}; residual int16 Q.{f['f_x']}, q/k int16 Q.{f['f_qk']}, "
          f"ffn int16 Q.{f['f_h']}, KV int8 Q.{f['e_k']}/Q.{f['e_v']}, activations int8 per vector")
    for name, wf in f["weights"].items():
        err = f.get("weight_rel_rms_error", {}).get(name)
        print(f"  {name:<15} int{wf['bits']:<2} group {wf['group']:<4} acc {wf['acc_bits']} bits"
              + (f", rel. RMS error {err:.4f}" if err is not None else ""))
    for k in ("val_loss_float", "val_loss_golden"):
        if k in model.meta:
            print(f"{k:<16} {model.meta[k]:.4f} nats/token (at bake time; today's: eval.json)")
    print("\nblock RAM budget (ULX3S 85F):")
    print(format_budget(model))
    return 0


def cmd_serve(args) -> int:
    from bakedllama.device import DeviceError
    from bakedllama.serve import run

    if args.max_queue < 1:
        raise UserError("--max-queue must be at least 1")
    model, tok = _load(args.model, args.tokenizer)
    try:
        return run(model, tok, model_path=args.model, device=args.device or "sim", host=args.host,
                   port=args.port, max_queue=args.max_queue)
    except DeviceError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bakedllama", description="A hardwired tiny Llama.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp):
        sp.add_argument("--model", help="baked model file (default weights/tiny/model-q.bkl)")
        sp.add_argument("--tokenizer", help="tokenizer.json (default weights/tiny/tokenizer.json)")

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt")
    g.add_argument("--device", help="sim (default: the Verilator SoC) | golden | "
                   "socket://127.0.0.1:PORT | /dev/ttyUSB0 | pcie://BDF | litex://HOST:PORT "
                   "(?csr=PATH) | sim-bridge (the PCIe target's CSR path in Verilator)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--target", metavar="DIR", help="speculative decoding: this Hugging Face Llama "
                   "directory (e.g. weights/target) verifies the device's drafts; greedy output is "
                   "exactly the target's own")
    g.add_argument("--draft-tokens", type=int, metavar="K", help="drafts per target pass with "
                   "--target (default 4; 0 runs the target alone)")
    model_args(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="model, numerics, identity and block-RAM budget")
    i.add_argument("--device", help="read the identity from a device instead "
                   "(sim | socket://127.0.0.1:PORT | /dev/ttyUSB0 | pcie://BDF | litex://HOST:PORT "
                   "| sim-bridge)")
    i.add_argument("--json", action="store_true")
    model_args(i)
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("serve", help="OpenAI-compatible completions server and playground page")
    s.add_argument("--device", help="sim (default: the Verilator SoC) | golden | "
                   "socket://127.0.0.1:PORT | /dev/ttyUSB0 | pcie://BDF | litex://HOST:PORT")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    s.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the device; more get 503 (default 16)")
    model_args(s)
    s.set_defaults(func=cmd_serve)

    from bakedllama.llama8b import cli as run8b_cli

    r = sub.add_parser("run8b", help="Llama 3.1 8B in chip-sized partitions (the accelerator's arithmetic)")
    run8b_cli.add_arguments(r)
    r.set_defaults(func=run8b_cli.run)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
