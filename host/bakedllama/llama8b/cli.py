"""`bakedllama run8b`: the full Llama 3.1 8B (or any Llama checkpoint) in partitioned passes.

Wired into the `bakedllama` console script as a subcommand through add_arguments(parser) and
run(args) -> exit code. Bad input gives one line `error: ...` on stderr and exit code 1."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from bakedllama.fileformat import ModelFileError
from bakedllama.llama8b import (
    agreement,
    bandwidth,
    cluster,
    fastglue,
    kernels,
    partition,
    projection,
    quant,
    runner,
)
from bakedllama.llama8b.arch import DEFAULT_CONTEXT
from bakedllama.llama8b.checkpoint import CACHE_DIR, open_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", metavar="PROMPT", help="text to continue (BOS is prepended)")
    p.add_argument("--checkpoint", required=True, metavar="DIR|FILE.gguf|synthetic:NAME",
                   help="Hugging Face Llama directory, GGUF file, or synthetic:llama3.1-8b / -70b / "
                        "synthetic:llama3-tiny (written once into the cache, deterministic)")
    p.add_argument("--bits", default="8", choices=sorted(quant.BITS_TO_SCHEME),
                   help="weight scheme: 8 (per row), 4 (groups of 32), 3/6 (Taalas-like: 3-bit, "
                        "6-bit for embeddings, lm_head, wv, w2); default 8")
    p.add_argument("--chip-bytes", default="hc1", metavar="N",
                   help="on-chip weight memory per partition: bytes (468k, 1.5G, ...), 'ulx3s' "
                        f"({partition.ULX3S_85F_BYTES:,}), 'hc1' ({partition.HC1_BYTES:,}, default) "
                        "or 'none' (unpartitioned)")
    p.add_argument("--max-tokens", type=int, default=16, metavar="N", help="tokens to generate")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, metavar="N",
                   help=f"KV cache positions to allocate (default {DEFAULT_CONTEXT})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--pack", default="fast", choices=("fast", "tight"),
                   help="in-memory layout: fast (3-bit in nibbles, 6-bit in bytes) or tight "
                        "(exact bit planes, slower decode); default fast")
    p.add_argument("--resident", action="store_true",
                   help="keep every partition in memory, copied out of the cache mapping into "
                        "anonymous (huge) pages (default: map each pass, release it after)")
    p.add_argument("--check", action="store_true",
                   help="also run unpartitioned and report whether tokens and logits are identical")
    p.add_argument("--agree", metavar="BITS", choices=sorted(quant.BITS_TO_SCHEME),
                   help="also run this other --bits teacher-forced on the same tokens and report "
                        "top-1 agreement and KL against the main run")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="kernel threads (0: all)")
    p.add_argument("--no-verify", action="store_true", help="skip the cache files' sha256 check")
    p.add_argument("--quantized", metavar="DIR",
                   help="run this already-built quantized cache (weights/cache/q-...) instead of "
                        "the one --bits and the current quantizer select")
    p.add_argument("--cache-dir", default=str(CACHE_DIR), metavar="DIR",
                   help="where synthetic checkpoints and quantized caches live")
    p.add_argument("--plot", metavar="PNG", help="write the projection plot (tokens/s vs chips)")
    p.add_argument("--cluster", metavar="ray|ray://ADDRESS",
                   help="run the partitions on Ray actors (pipeline stages): 'ray' starts a local "
                        "cluster on 127.0.0.1 for the run; ray://auto or ray://HOST:PORT joins a "
                        "running one (llama8b/cluster.py)")
    p.add_argument("--actors", type=int, default=2, metavar="N",
                   help="with --cluster: stages, each a Ray actor holding a contiguous run of "
                        "partitions resident (default 2)")
    p.add_argument("--ray-graph", default="auto", choices=cluster.GRAPHS,
                   help="with --cluster: a Ray Compiled Graph, chained actor tasks, or auto (compiled "
                        "where the nodes have cores to spare for its spinning readers); default auto")


def _kernel_name(qm) -> str:
    """Which kernels the decode and the prompt passes ran on (kernels.matvec_packed's choice)."""
    from bakedllama.llama8b import simd

    ks = simd.kernels()
    on_simd = sorted({p.store_bits for p in qm.mats.values()
                      if simd.supports(p) and (p.store_bits == 4 or "vnni" in ks)})
    if not on_simd:
        return "numba (LLVM, AVX2 float32 FMA on exact small-integer sums, prange over row blocks)"
    return (f"simd.c {ks[0]} (exact integer products) for the {'/'.join(map(str, on_simd))}-bit "
            f"layouts, numba for any other; prompts on simd.c")


def _warm_up(qm) -> None:
    """Compile (or load from numba's cache) the kernels before anything is timed."""
    fastglue.warm_up()
    for sb in sorted({p.store_bits for p in qm.mats.values()}):
        q = np.zeros((64, 32), np.int8)
        p = kernels.pack(q, np.ones((64, 1), np.uint16), 0, min(sb, 8), 32, sb)
        kernels.matvec_packed(p, np.zeros(32, np.int64))


def execute(args, cl=None) -> dict:
    """The run; with cl (a cluster.Cluster) the partitions run on Ray actors."""
    import numba

    t_start = time.perf_counter()
    if args.threads:
        numba.set_num_threads(args.threads)
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    chip = partition.parse_bytes(args.chip_bytes)
    log = (lambda m: print(m, file=sys.stderr)) if not args.json else (lambda m: None)
    t = time.perf_counter()
    ck = open_checkpoint(args.checkpoint, args.context, args.cache_dir,
                         show_progress=not args.json)
    t_ck = time.perf_counter() - t
    scheme = quant.scheme_for(args.bits)
    note = None
    if args.quantized:
        t = time.perf_counter()
        qm = quant.open_cache(args.quantized, verify=not args.no_verify)
        t_open, t_build, built = time.perf_counter() - t, 0.0, False
        c0 = dict(qm.cfg.to_dict(), seq_len=ck.cfg.seq_len)
        if c0 != ck.cfg.to_dict():
            raise ValueError(f"{args.quantized}: quantized cache is of another model than "
                             f"{args.checkpoint}")
        qm.cfg = type(qm.cfg).from_dict(c0)
        scheme = qm.fmt["scheme"]
        if qm.meta.get("numerics_identity") != quant._numerics_identity():
            note = "this cache was built by another version of the quantizer"
    else:
        cache = quant.cache_path(ck, scheme, args.pack, args.cache_dir)
        built = not (cache / "manifest.json").exists()
        t = time.perf_counter()
        quant.build_cache(ck, scheme, args.pack, args.cache_dir, show_progress=not args.json,
                          log=log)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        qm = quant.quantized(ck, args.bits, args.pack, args.cache_dir, verify=not args.no_verify,
                             show_progress=False)
        t_open = time.perf_counter() - t
    parts = partition.plan(qm.cfg, qm.fmt, chip)
    tk = ck.tokenizer()
    ids = tk.encode(args.prompt, add_special_tokens=False).ids
    bos = ck.special.bos
    prompt_ids = ([bos] if 0 <= bos < qm.cfg.vocab_size else []) + ids
    if not prompt_ids:
        raise ValueError("empty prompt")
    _warm_up(qm)
    t = time.perf_counter()
    # resident in this process: the matrices copied out of the page cache (read faster there)
    pinned = qm.pin() if args.resident and cl is None else 0
    t_pin = time.perf_counter() - t
    dbytes = bandwidth.decode_bytes(qm)
    bw = bandwidth.measure(dbytes)  # the bound: resident buffer, these threads, best of passes
    if cl is not None and args.actors < 1:
        raise ValueError("--actors must be at least 1")
    r = (cluster.RayRunner(cl, qm, parts, args.actors, args.threads, args.ray_graph) if cl is not None
         else runner.Runner(qm, parts, streaming=not args.resident))
    keep = bool(args.check or args.agree)
    out = runner.generate(r, prompt_ids, args.max_tokens, ck.special.stop, keep_logits=keep)
    steps = out["decode_seconds"] or out["prefill_seconds"][-1:]
    spt = float(np.mean(steps))
    bw = bandwidth.best(bw, bandwidth.measure(dbytes))  # again after the run: the better of both
    bound = bandwidth.compare(spt, dbytes, bw)
    if bound["warning"] and args.json:  # (the text report prints it with the bound)
        print(f"warning: {bound['warning']}", file=sys.stderr)
    check = None
    if args.check:
        ref = runner.generate(runner.Runner(qm, partition.plan(qm.cfg, qm.fmt, None),
                                            streaming=not args.resident),
                              prompt_ids, args.max_tokens, ck.special.stop, keep_logits=True)
        same_logits = len(ref["logits"]) == len(out["logits"]) and all(
            np.array_equal(a.acc, b.acc) and np.array_equal(a.frac, b.frac)
            for a, b in zip(ref["logits"], out["logits"]))
        check = dict(unpartitioned_tokens=ref["tokens"], tokens_identical=ref["tokens"] == out["tokens"],
                     logits_identical=bool(same_logits))
    agree = None
    if args.agree:
        fed = (prompt_ids + out["tokens"])[:len(out["logits"])]
        la = np.concatenate([lg.as_float() for lg in out["logits"]])
        t = time.perf_counter()
        qm2 = quant.quantized(ck, args.agree, args.pack, args.cache_dir, verify=not args.no_verify,
                              show_progress=not args.json, log=log)
        lb = agreement.logits_over(qm2, fed, chip, streaming=not args.resident)
        agree = dict(other_bits=args.agree, **agreement.compare(la, lb),
                     seconds=round(time.perf_counter() - t, 1))
    fmt8 = projection.scheme_fmt(qm.cfg, scheme)
    proj = {}
    for key, spec in projection.CHIP_SPECS.items():
        pr = projection.project(qm.cfg, fmt8, spec, [], 512)
        ns = sorted({1, min(8, pr["chips_to_hold"]), pr["chips_to_hold"], pr["partitions"]})
        proj[key] = projection.project(qm.cfg, fmt8, spec, ns, 512)
    if args.plot:
        projection.plot(qm.cfg, args.plot, schemes=tuple(dict.fromkeys((scheme, "w8", "w3/6"))))
    st = partition.summary(parts)
    return dict(
        prompt=args.prompt, checkpoint=args.checkpoint, config=qm.cfg.to_dict(),
        bits=args.bits if not args.quantized else scheme, scheme=scheme, pack=qm.meta.get("store"),
        cache=str(qm.path), cache_note=note,
        cache_built_now=built, cache_build_seconds=round(t_build, 1) if built else
        qm.meta.get("build_seconds"), cache_open_seconds=round(t_open, 2),
        checkpoint_seconds=round(t_ck, 1),
        numerics={k: qm.fmt[k] for k in ("f_x", "f_qk", "f_h", "e_k", "e_v", "eps_int")},
        calibration=qm.meta.get("calibration", {}).get("method"),
        chip_bytes=chip, partitions=st["partitions"], partitions_by_kind=st["by_kind"],
        largest_partition_bytes=st["largest_bytes"], weight_bytes=st["total_bytes"],
        partition_list=[p.describe() for p in parts[:8]] + (["..."] if len(parts) > 8 else []),
        prompt_ids=prompt_ids, token_ids=out["tokens"], text=tk.decode(out["tokens"]),
        seconds_per_token=round(spt, 4), decode_steps=len(out["decode_seconds"]),
        prefill_seconds_per_token=round(float(np.mean(out["prefill_seconds"])), 4),
        streaming=not args.resident and cl is None, pinned_bytes=pinned,
        pin_seconds=round(t_pin, 2), peak_rss_bytes=runner.peak_rss_bytes(),
        kv_cache_bytes=2 * qm.cfg.n_layers * qm.cfg.seq_len * qm.cfg.kv_dim,
        threads=numba.get_num_threads(),
        bandwidth=dict(bound, bound_seconds_per_token=round(bound["bound_seconds_per_token"], 6),
                       ratio_to_bound=round(bound["ratio_to_bound"], 3),
                       method=f"best of {bw.runs} rounds over {bw.buffer_bytes:,} resident bytes, "
                              f"{bw.threads} threads, best on {bw.best_threads} (llama8b/bandwidth.py)"),
        kernel=_kernel_name(qm),
        check=check, agreement=agree, projection=proj, cluster=_cluster_result(cl, r, out),
        total_seconds=round(time.perf_counter() - t_start, 1))


def _cluster_result(cl, r, out) -> dict | None:
    """Placement of the stages, and the per-token overhead of the pipeline: a decode step's wall
    time minus the compute of its passes (measured inside the actors)."""
    if cl is None:
        return None
    over = [d - sum(p) for d, p in zip(out["decode_seconds"], out["pass_seconds"])]
    return dict(spec=cl.spec, address=cl.address, nodes=len(cl.nodes()), tag=cl.tag,
                overhead_seconds_per_token=round(float(np.mean(over)), 5) if over else None,
                **r.describe())


def _print(res: dict) -> None:
    c = res["config"]
    print(f"model: {res['checkpoint']}  dim {c['dim']} layers {c['n_layers']} heads "
          f"{c['n_heads']}/{c['n_kv_heads']} ffn {c['hidden_dim']} vocab {c['vocab_size']}")
    print(f"weights: --bits {res['bits']} ({res['scheme']}, {res['pack']} layout), cache "
          f"{res['cache']} (built in {res['cache_build_seconds']} s"
          f"{', now' if res['cache_built_now'] else ''}; opened in {res['cache_open_seconds']} s)"
          + (f" [{res['cache_note']}]" if res["cache_note"] else ""))
    chip = "unpartitioned" if res["chip_bytes"] is None else f"{res['chip_bytes']:,} B chips"
    print(f"partitions: {res['partitions']} for {chip} {res['partitions_by_kind']}, largest "
          f"{res['largest_partition_bytes']:,} B, weights {res['weight_bytes']:,} B")
    for line in res["partition_list"]:
        print(f"  {line}")
    print(f"prompt ids: {res['prompt_ids']}")
    print(f"generated ids: {res['token_ids']}")
    print(f"text: {res['text']!r}")
    b = res["bandwidth"]
    print(f"seconds per token: {res['seconds_per_token']} (decode, {res['decode_steps']} steps, "
          f"{res['threads']} threads; prefill {res['prefill_seconds_per_token']})")
    print(f"peak RSS: {res['peak_rss_bytes'] / 2**20:,.0f} MiB "
          f"({'streaming' if res['streaming'] else 'resident'}; KV cache "
          f"{res['kv_cache_bytes'] / 2**20:,.1f} MiB)")
    print(f"memory bandwidth: {b['measured_bytes_per_s'] / 1e9:.2f} GB/s measured; "
          f"{b['bytes_per_decode_step'] / 1e9:.3f} GB per decode step -> bound "
          f"{b['bound_seconds_per_token']} s/token; measured/bound = {b['ratio_to_bound']} "
          f"({b['method']})")
    if b["warning"]:
        print(f"warning: {b['warning']}")
    if res["cluster"]:
        cr = res["cluster"]
        print(f"cluster: {cr['spec']} ({cr['nodes']} node(s)), {len(cr['stages'])} stages, "
              f"{cr['mode']} ({cr['why']}{'; ' + cr['compile_note'] if cr['compile_note'] else ''}); "
              f"overhead per token {cr['overhead_seconds_per_token']} s")
        for sg in cr["stages"]:
            ps = sg["partitions"]
            print(f"  stage {sg['stage']}: partitions #{ps[0]}-#{ps[-1]} ({len(ps)}, "
                  f"{sg['weight_bytes']:,} B) resident in pid {sg['pid']} on {sg['node']}")
    if res["check"]:
        ch = res["check"]
        print(f"check vs unpartitioned: tokens identical {ch['tokens_identical']}, "
              f"logits identical {ch['logits_identical']}")
    if res["agreement"]:
        a = res["agreement"]
        print(f"agreement --bits {res['bits']} vs {a['other_bits']} over {a['positions']} positions "
              f"(teacher-forced): top-1 {a['top1_agreement']:.3f}, KL mean {a['kl_mean']:.4f} "
              f"max {a['kl_max']:.4f} nats")
    print("projection (context 512; see bakedllama/llama8b/projection.py for the assumptions):")
    rows = []
    for pr in res["projection"].values():
        for r in pr["rows"]:
            rows.append(dict(chip=pr["chip"]["name"], scheme=res["scheme"],
                             partitions=pr["partitions"], **r))
    print(projection.format_table(rows))


def run(args) -> int:
    try:
        # with --cluster: connected first (a bad address fails before any load), shut down on exit
        with cluster.open_cluster(getattr(args, "cluster", None), getattr(args, "actors", 2)) as cl:
            res = execute(args, cl)
    except (ModelFileError, partition.PartitionError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2  # like the rest of the CLI: a user's input that cannot run
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(res))
    else:
        _print(res)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bakedllama run8b", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
