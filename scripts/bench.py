"""make bench: performance figures with their bounds. Nothing here asserts; it measures and prints.

  1. golden model tokens/s (host numpy reference; no bound, for scale)
  2. 8B integer kernel: packed GEMV read rate vs this machine's measured read bandwidth (goal 1.5x);
     simd.c's kernels: decode steps (4-bit vs 8-bit) and a prompt's batched pass per token;
     the 8B cache build: quantize + pack per weight, old numpy path vs fastquant, and full builds
  3. the Verilator SoC: a 16-token prompt + 128 generated, tokens/s of chip time
  4. speculative decoding: acceptance and projected speedup over the target alone, K = 1..8
  5. gateware: cycles/token from the Verilator hardware counter vs the cycle model (when built)
  6. bakedllama serve under load: concurrent streaming clients (some leaving midway) on the golden
     model and on the Verilator SoC: latency p50/p99, aggregate tokens/s vs the device alone
  7. run8b on Ray (--cluster): ms/token in-process vs a local 2-actor pipeline (compiled graph,
     chained tasks), the overhead per token, an idle stage's CPU
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/bench.py` puts scripts/, not the repo, on the path
    sys.path.insert(0, str(REPO))


def bench_golden() -> None:
    from bakedllama.golden import Golden, generate
    from bakedllama.model import load_baked

    m = load_baked()
    g = Golden(m)
    list(generate(g, [0, 42], 4))  # warm up
    t = time.perf_counter()
    n = len(list(generate(g, [0, 42], 64)))
    print(f"golden model: {n / (time.perf_counter() - t):.1f} tokens/s (numpy, 1 sequence, 64 tokens)")


def bench_kernel() -> None:
    from bakedllama import numerics as nx
    from bakedllama.llama8b import bandwidth
    from bakedllama.llama8b.kernels import matvec_packed, pack

    rng = np.random.default_rng(0)
    rows, cols = 14336, 4096  # one Llama 3.1 8B FFN matrix
    for bits, group in ((8, cols), (4, 32)):
        q = rng.integers(-nx.qmax(bits), nx.qmax(bits) + 1, (rows, cols), dtype=np.int8)
        m = rng.integers(1, 1 << nx.M_BITS, (rows, cols // group)).astype(np.uint16)
        p = pack(q, m, 10, bits, group)
        a = rng.integers(-127, 128, cols)
        matvec_packed(p, a)  # compile
        best = min(_timed(lambda p=p, a=a: matvec_packed(p, a)) for _ in range(3))
        nbytes = p.nbytes()
        bw = bandwidth.measure(nbytes).bytes_per_s  # resident, these threads, best of passes
        print(f"8B kernel int{bits}: {nbytes / best / 1e9:.2f} GB/s of packed weights; machine read "
              f"bandwidth {bw / 1e9:.2f} GB/s; time / bound = {best / (nbytes / bw):.2f} (goal <= 1.5)")


def bench_simd(threads=(1, 2), prompt: int = 64) -> None:
    """8B kernels per token, side by side on one Llama 3.1 8B FFN matrix (14336 x 4096): a decode
    step (one activation row) on the numba float kernel and on simd.c's integer kernel, and a
    prompt's batched pass (`prompt` rows at once, simd.c) per prompt token; the 4-bit layout
    against the 8-bit one, and each decode against this machine's read bandwidth."""
    import numba
    from bakedllama import numerics as nx
    from bakedllama.llama8b import bandwidth, simd
    from bakedllama.llama8b.kernels import matvec_numba, matvec_packed, pack

    if not simd.available():
        print("8B simd kernels: not available on this machine (no AVX2 or no C compiler)")
        return
    rng = np.random.default_rng(0)
    rows, cols = 14336, 4096
    mats = {}
    for bits, group in ((8, cols), (4, 32), (3, 32)):
        q = rng.integers(-nx.qmax(bits), nx.qmax(bits) + 1, (rows, cols), dtype=np.int8)
        m = rng.integers(1, 1 << nx.M_BITS, (rows, cols // group)).astype(np.uint16)
        mats[bits] = pack(q, m, 10, bits, group, 4 if bits < 8 else 8)
    a1 = rng.integers(-127, 128, cols)
    ap = rng.integers(-127, 128, (prompt, cols))
    n0 = numba.get_num_threads()
    ks = simd.kernels()
    print(f"8B kernels on a {rows} x {cols} matrix (ms per token; bound: its bytes at the read "
          f"bandwidth measured on the same threads, llama8b/bandwidth.py; simd.c instruction sets "
          f"here: {', '.join(ks)}, default {ks[0]}):")
    print("  threads  bits  bound  decode numba  " + "  ".join(f"decode {k:>4}" for k in ks) + "  "
          + "  ".join(f"prefill x{prompt} {k:>4}" for k in ks) + "  decode / prefill (default)")
    try:
        for th in threads:
            for bits, p in mats.items():
                bw = bandwidth.measure(p.nbytes(), th).bytes_per_s  # (restores the thread count)
                numba.set_num_threads(th)
                tn = min(_timed(lambda p=p: matvec_numba(p, a1, 0, rows)) for _ in range(3))
                def mm(p, a, k, th=th):
                    return lambda: simd.matmat(p, a, 0, rows, th, k)

                td = [min(_timed(mm(p, a1[None], k)) for _ in range(3)) for k in ks]
                tp = [min(_timed(mm(p, ap, k)) for _ in range(2)) / prompt for k in ks]
                tdef = min(_timed(lambda p=p: matvec_packed(p, a1)) for _ in range(3))
                bound = p.nbytes() / bw
                print(f"  {th:7d}  {bits:4d}  {bound * 1e3:5.2f}  {tn * 1e3:12.2f}  "
                      + "  ".join(f"{t * 1e3:11.2f}" for t in td) + "  "
                      + "  ".join(f"{t * 1e3:{13 + len(str(prompt))}.3f}" for t in tp)
                      + f"  {tdef * 1e3:.2f} / {tp[0] * 1e3:.3f} = {tdef / tp[0]:.1f}x")
    finally:
        numba.set_num_threads(n0)


def bench_decode_bound(threads=(1, 2), schemes=("w8", "w4"), steps: int = 8) -> None:
    """Whole decode steps (Runner.forward, resident) of a synthetic model of random packed weights
    in Llama 3.1 8B's layer shapes (2 layers, a small vocabulary: 448 MiB at w8, 14x a 32 MiB LLC,
    read from DRAM on every step like the 8B) against the memory bound measured the way the decode
    reads (llama8b/bandwidth.py), per thread count and scheme: tokens/s and the ratio to the bound
    (>= 1.0 always; a warning names the reason if not)."""
    from bakedllama.config import ModelConfig
    from bakedllama.llama8b import bandwidth

    cfg = ModelConfig(dim=4096, n_layers=2, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                      vocab_size=8192, seq_len=steps + 2, tied_embeddings=False)
    print("8B runner decode vs the memory bound (synthetic: 2 layers of the 8B's shapes, vocab 8192):")
    print("  scheme  threads  MiB/step  decode ms (best, median)  tok/s  bound ms  GB/s  ratio")
    for scheme in schemes:
        qm = bandwidth.timing_model(cfg, scheme)
        nb = bandwidth.decode_bytes(qm)
        for th in threads:
            ds = bandwidth.time_decode(qm, th, steps)
            b = bandwidth.best(bandwidth.measure(nb, th), bandwidth.measure(nb, th))
            c = bandwidth.compare(float(np.median(ds)), nb, b)  # the median step (as run8b: mean)
            med = float(np.median(ds))
            print(f"  {scheme:6s}  {th:7d}  {nb / 2**20:8.1f}  {min(ds) * 1e3:11.2f} {med * 1e3:11.2f}"
                  f"  {1 / med:5.1f}  {c['bound_seconds_per_token'] * 1e3:8.2f}  "
                  f"{b.bytes_per_s / 1e9:4.1f}  {c['ratio_to_bound']:5.2f}")
            if c["warning"]:
                print(f"    warning: {c['warning']}")
        del qm  # before the next model is built


def bench_cache_build(rows_old: int = 1024) -> None:
    """8B cache build (issue 14): quantize + pack per weight on a Llama 3.1 8B FFN matrix, the old
    numpy path (numerics.quantize_matrix + kernels.pack, on its first `rows_old` rows) against
    fastquant (the whole matrix, all threads), for w8 / w4 / 3-bit; then the full synthetic 8B
    caches found on disk, with what their builds cost (their manifests' figures)."""
    import json

    import numba
    from bakedllama import numerics as nx
    from bakedllama.llama8b import fastquant, kernels
    from bakedllama.llama8b.arch import SPECS, from_hf_config
    from bakedllama.llama8b.checkpoint import CACHE_DIR, tensor_list, tensor_shape

    cfg, _ = from_hf_config(SPECS["llama3.1-8b"])
    n8b = sum(int(np.prod(tensor_shape(cfg, n))) for n, _ in tensor_list(cfg))
    rng = np.random.default_rng(0)
    rows, cols = 14336, 4096
    w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    print(f"8B cache build, quantize + pack ({rows} x {cols} matrix; {numba.get_num_threads()} threads; "
          f"whole model = {n8b / 1e9:.2f} G weights):")
    for bits, group, store in ((8, cols, 8), (4, 32, 4), (3, 32, 4)):
        def old(w=w[:rows_old], bits=bits, group=group, store=store):
            qt = nx.quantize_matrix(w, bits, group)
            return kernels.pack(qt.q, qt.m, int(qt.shift), bits, group, store)

        def new(w=w, bits=bits, group=group, store=store):
            qt = fastquant.quantize_matrix(w, bits, group)
            return fastquant.pack(qt.q, qt.m, int(qt.shift), bits, group, store)

        a, b = old(), new(w[:rows_old])  # (also compiles)
        same = all(np.array_equal(x, y) for x, y in zip(a.planes + [a.m], b.planes + [b.m]))
        t_old = _timed(old) / (rows_old * cols)
        t_new = min(_timed(new) for _ in range(2)) / (rows * cols)
        print(f"  {bits}-bit: numpy {t_old * 1e9:6.1f} ns/weight, fastquant {t_new * 1e9:5.2f} ns/weight "
              f"({t_old / t_new:.0f}x; same bytes: {same}); whole 8B at these rates: "
              f"{t_old * n8b:.0f} s -> {t_new * n8b:.0f} s")
    found = []
    for d in dict.fromkeys([Path(CACHE_DIR), Path.home() / ".cache" / "bakedllama"]):
        found += sorted(d.glob("q-synthetic-llama3.1-8b-*/manifest.json")) if d.is_dir() else []
    for mf in found:
        m = json.loads(mf.read_text())
        b = m.get("build")
        cost = (f", {b['cpu_seconds']:.0f} CPU s on {b['threads']} threads, peak RSS "
                f"{b['peak_rss_bytes'] / 2**30:.1f} GiB" if b else " (built by the old quantizer)")
        print(f"  full synthetic 8B, {m['numerics']['scheme']} ({m['store']}): built in "
              f"{m['build_seconds']:.0f} s{cost}  [{mf.parent}]")
    print("  (goal: <= ~220 s for w8, 2x llama.cpp's convert + quantize measured in issue 14; "
          "a full build: bakedllama run8b --checkpoint synthetic:llama3.1-8b ...)" if found else
          "  full synthetic 8B: no cache built here (bakedllama run8b --checkpoint synthetic:llama3.1-8b)")


def bench_soc(prompt_len: int = 16, gen: int = 128) -> None:
    """The issue's figure: a 16-token prompt then 128 generated on the Verilator SoC (firmware +
    accelerator); generated tokens per second of chip time (all passes' hardware counter at the
    system clock), next to the same cycles at the ULX3S build's clock and routed Fmax."""
    import json

    from bakedllama.device import generate_on_device
    from bakedllama.model import load_baked

    m = load_baked()
    ids = [(7 * i + 3) % m.cfg.vocab_size for i in range(prompt_len)]
    t = time.perf_counter()
    r = generate_on_device(None, m, ids, gen, log=lambda s: print("  " + s, flush=True))
    wall = time.perf_counter() - t
    n, cyc = len(r["tokens"]), r["chip_cycles"]
    passes = prompt_len + n - 1
    print(f"SoC (Verilator): {prompt_len}-token prompt + {n} generated, {passes} passes, {cyc:,} "
          f"hardware-counter cycles ({cyc / passes:,.0f} per pass); {wall:.0f} s of simulation")
    clocks = [("system clock", r["sys_clk_freq"])]
    rep = REPO / "build" / "soc" / "ulx3s" / "report.json"
    if rep.exists():
        fmax = json.loads(rep.read_text()).get("fmax_mhz")
        if fmax:
            clocks.append(("ULX3S routed Fmax", fmax * 1e6))
    for name, f in clocks:
        tps = n * f / cyc
        print(f"    at the {name} {f / 1e6:.2f} MHz: {tps:,.0f} generated tokens/s of chip time "
              f"(goal 17,000: ratio {tps / 17000:.2f})")


def bench_speculative(ks=range(1, 9), n_tokens: int = 32) -> None:
    """Speculative decoding sweep: the baked model drafts on golden (its cycles priced at the
    board's engine by the cycle model), the target verifies on the host's integer runner.
    Acceptance, tokens per target pass and the projected speedup over the target alone per K;
    plot in build/bench/speculative.png."""
    import tempfile

    from bakedllama import spec_cli
    from bakedllama import speculative as S
    from bakedllama.model import load_baked, load_float
    from bakedllama.tokenizer import Tokenizer

    from weights import hf_export

    m = load_baked()
    tok = Tokenizer.load(REPO / "weights" / "tiny" / "tokenizer.json")
    tdir, label = REPO / "weights" / "target", "weights/target"
    tmp = None
    if hf_export.verify(tdir):
        # no trained target yet (make target): the tiny model's own float weights at 8 bits stand
        # in, so the loop and its figures run; they are not the target's figures
        tmp = tempfile.TemporaryDirectory()
        cfg, tensors, _ = load_float()
        hf_export.write_hf(tmp.name, cfg, tensors, tok, {})
        tdir, label = Path(tmp.name), "STAND-IN (tiny float model at w8; weights/target not trained)"
    target, _ = S.open_target(tdir)
    prompts = ["It was", "Mr. Darcy", "She could not", "Elizabeth", "The next morning", "Emma",
               "\"My dear", "Lady Catherine", "In the evening", "Her sister"]
    ids = [tok.encode(p, bos=True) for p in prompts]
    clock = spec_cli.board_engine()["sys_clk_freq"]
    temps = (0.0, 1.0)  # greedy, and speculative sampling at T = 1 (seeded per prompt)

    def run(k, temp):
        """All prompts at K drafts: (accepted, drafted, rounds, draft cycles, target seconds)."""
        acc = drafted = rounds = cycles = 0
        tsec = 0.0
        for i, x in enumerate(ids):
            d, t = (S.GoldenDraft(m) if k else None), S.RunnerTarget(target.r)
            r = S.speculate(d, t, x, n_tokens, k, temperature=temp, seed=i)
            acc, drafted, rounds = acc + r.accepted, drafted + r.drafted, rounds + r.rounds
            tsec += t.seconds
            if d is not None:
                cycles += spec_cli.golden_draft_cycles(m.cfg, d.positions, d.sampled)
        return acc, drafted, rounds, cycles, tsec

    alone = {temp: run(0, temp)[4] for temp in temps}
    print(f"speculative decoding (target {label}; draft: the baked model, cycles at the board's "
          f"engine, {clock / 1e6:.0f} MHz): {len(ids)} prompts x {n_tokens} tokens; target alone "
          + ", ".join(f"{alone[t] / (len(ids) * n_tokens) * 1e3:.2f} ms/token at T={t:g}" for t in temps)
          + " on this host")
    rows = {temp: [] for temp in temps}
    for temp in temps:
        for k in ks:
            acc, drafted, rounds, cycles, tsec = run(k, temp)
            spec_s = cycles / clock + tsec
            rows[temp].append((k, acc / drafted, acc / rounds, len(ids) * n_tokens / rounds,
                               alone[temp] / spec_s))
            print(f"  T={temp:g} K={k}: acceptance {acc / drafted:.3f}, {acc / rounds:.2f} accepted per "
                  f"target pass, {rounds / (len(ids) * n_tokens):.3f} target passes per token; draft "
                  f"{cycles / clock * 1e3:.1f} ms at the board, target {tsec:.2f} s; projected "
                  f"speedup over the target alone {alone[temp] / spec_s:.2f}x")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        for ax, temp in zip(axes, temps):
            rr = rows[temp]
            ax.plot([r[0] for r in rr], [r[4] for r in rr], "o-", label="projected speedup")
            ax.plot([r[0] for r in rr], [r[3] for r in rr], "s--", label="tokens per target pass")
            ax.plot([r[0] for r in rr], [r[1] for r in rr], "^:", label="acceptance rate")
            ax.set_xlabel("draft tokens K")
            ax.set_title(("greedy" if temp == 0 else f"sampling, T = {temp:g}")
                         + f"; target: {label[:30]}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        out = REPO / "build" / "bench" / "speculative.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        print(f"  plot: {out.relative_to(REPO)}")
    except Exception as e:  # the figures above are the result; the plot is a convenience
        print(f"  (no plot: {e})")
    if tmp is not None:
        tmp.cleanup()


def bench_serve(clients: int = 32, max_tokens: int = 16, soc_clients: int = 12, soc_tokens: int = 8) -> None:
    """`bakedllama serve` under the issue's load: every client at once, every 4th leaving after 3
    tokens; the device alone is the same requests one after the other without the server."""
    from bakedllama.device import check_model
    from bakedllama.device.sim import build_sim, launch
    from bakedllama.golden import Golden, generate
    from bakedllama.model import DEFAULT_TOKENIZER, load_baked
    from bakedllama.serve.loadtest import alone_rate, run_load
    from bakedllama.serve.process import ServeProcess
    from bakedllama.tokenizer import Tokenizer

    m = load_baked()
    tok = Tokenizer.load(DEFAULT_TOKENIZER, m.meta["tokenizer_sha256"])
    g = Golden(m)

    def ref(prompt, temperature, seed, n):
        return list(generate(g, tok.encode(prompt), n, temperature, seed))

    with ServeProcess(["--device", "golden", "--max-queue", "20"]) as s:
        rep = run_load(s.url, "bakedllama-tiny", ref, clients=clients, max_tokens=max_tokens,
                       alone=lambda: alone_rate(ref, clients, max_tokens), decode=tok.decode)
    print(f"serve (golden, queue 20, {max_tokens} tokens each): {rep.format()}")

    h = launch(build_sim("real"), boot_timeout=300)
    try:
        chip = []

        def soc_alone():  # the same requests straight to the simulated SoC (its one link: no server)
            with h.open() as dev:
                check_model(dev.info(), m, h.url)

                def on_soc(prompt, temperature, seed, n):
                    gen = dev.generate(tok.encode(prompt), n, temperature, seed)
                    out = list(gen)
                    chip.append((len(out), gen.done.prefill_cycles + gen.done.decode_cycles))
                    return out

                return alone_rate(on_soc, soc_clients, soc_tokens), dev.info().sys_clk_freq

        before, clk = soc_alone()
        with ServeProcess(["--device", h.url, "--max-queue", "8"], timeout=300) as s:
            rep = run_load(s.url, "bakedllama-tiny", ref, clients=soc_clients, max_tokens=soc_tokens,
                           decode=tok.decode)
        rep.alone = (before, soc_alone()[0])
        n, cyc = sum(c[0] for c in chip), sum(c[1] for c in chip)
        print(f"serve (Verilator SoC, queue 8, {soc_tokens} tokens each): {rep.format()}; the chip alone: "
              f"{n * clk / cyc:,.0f} generated tokens/s of chip time at {clk / 1e6:.0f} MHz "
              f"(hardware counter, the same requests)")
    finally:
        h.stop()


def bench_ray(tokens: int = 32, actors: int = 2, rounds: int = 3) -> None:
    """run8b's Ray pipeline (llama8b/cluster.py) against the in-process runner on the same small
    synthetic model (synthetic:llama3-tiny, w8, unpartitioned plan: 3 partitions over `actors`
    stages on a local cluster): decode ms/token, the pipeline's overhead per token (a step's
    wall time minus the compute of its passes, measured inside the actors), and the CPU an idle
    stage burns (a compiled graph's actors poll their channels)."""
    import importlib.util
    import os
    import tempfile

    if importlib.util.find_spec("ray") is None:
        print("ray pipeline: skipped (ray not installed: pip install 'bakedllama[cluster]')")
        return
    from bakedllama.llama8b import checkpoint, cluster, partition, quant, runner

    def cpu_seconds(pid):
        st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")

    def decode_ms(r):
        best, over = None, None
        for _ in range(rounds):
            out = runner.generate(r, [384, 72, 101], tokens)
            ds = np.array(out["decode_seconds"])
            comp = np.array([sum(p) for p in out["pass_seconds"]])
            if best is None or ds.mean() < best:
                best, over = ds.mean(), (ds - comp).mean()
        return best * 1e3, over * 1e3

    with tempfile.TemporaryDirectory() as d:
        ck = checkpoint.open_checkpoint("synthetic:llama3-tiny", 64, d, show_progress=False)
        qm = quant.quantized(ck, "8", cache_dir=d, show_progress=False)
        parts = partition.plan(qm.cfg, qm.fmt, None)
        r = runner.Runner(qm, parts, streaming=False)
        runner.generate(r, [384, 72, 101], 4)  # warm up
        local, local_over = decode_ms(r)
        print(f"ray pipeline ({len(parts)} partitions of synthetic:llama3-tiny w8, {actors} actors on "
              f"127.0.0.1, {tokens} decode steps, best of {rounds}):")
        print(f"  in-process         {local:7.2f} ms/token  (overhead {local_over:5.2f} ms)")
        t = time.perf_counter()
        with cluster.Cluster("ray", num_cpus=actors) as cl:
            start = time.perf_counter() - t
            for graph in ("compiled", "tasks"):
                t = time.perf_counter()
                rr = cluster.RayRunner(cl, qm, parts, actors, graph=graph)
                up = time.perf_counter() - t
                ms, over = decode_ms(rr)
                pids = [sg["pid"] for sg in rr.placement]
                c0 = [cpu_seconds(p) for p in pids]
                time.sleep(2.0)
                idle = [(cpu_seconds(p) - c) / 2.0 for p, c in zip(pids, c0)]
                print(f"  ray {rr.mode:<14} {ms:7.2f} ms/token  (overhead {over:5.2f} ms per token, "
                      f"+{ms - local:.2f} vs in-process; stages up in {up:.1f} s; an idle stage "
                      f"uses {100 * max(idle):.0f}% of a core)")
                rr.close()
        print(f"  (local cluster start {start:.1f} s; no tagged process left after close: "
              f"{not cluster.tagged_processes(cl.tag)})")


def bench_llamacpp(spec: str | None = None, rounds: int = 4, threads=(1, 2), max_tokens: int = 16,
                   cache_dir: str | Path | None = None, prompt: str = "It was") -> None:
    """llama.cpp (llama-cpp-python, the optional `bench` extra) side by side with run8b on the SAME
    synthetic weights: decode tokens/s of llama.cpp Q8_0 / Q4_0 and of run8b w8 / w4 --resident
    (HC1 partitions), for 1 and 2 threads, the two engines alternating over `rounds` rounds, each
    run its own process (one engine in memory at a time); min / median per engine and the ratio.
    Also llama.cpp's convert + quantize leg (gguf_export: the GGUF written and quantized by
    gguf.quants, and a BF16 GGUF quantized by llama_model_quantize) next to run8b's cache build.

    The model: synthetic:llama3.1-8b when its w8 and w4 caches are already built (never built
    here: ~35 min and ~20 GB each), otherwise the same architecture at Llama 3.2 1B's widths
    (dim 2048, 16 layers, GQA 32/8, ffn 8192, vocab 128256, untied; its caches are built here)."""
    import importlib.util
    import json
    import os
    import statistics
    import subprocess

    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: not installed (pip install '.[bench]')")
        return
    from bakedllama.llama8b import arch, checkpoint

    cache_dir = Path(cache_dir or checkpoint.CACHE_DIR)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "host"), str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # OpenMP threads that sleep at barriers instead of spinning (both engines; llama.cpp's ggml
    # and numba use libgomp): on a shared machine a spinning thread holds a core another needs
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    schemes = (("8", "w8", "q8_0"), ("4", "w4", "q4_0"))

    def caches(name):  # built quantized caches of the synthetic `name`, by scheme (newest first)
        d = checkpoint.synthetic_dir(name, cache_dir).name
        out = {}
        for _, scheme, _ in schemes:
            found = sorted(cache_dir.glob(f"q-{d}-{scheme}-fast-*/manifest.json"),
                           key=lambda p: -p.stat().st_mtime)
            if found:
                out[scheme] = found[0].parent
        return out

    def child(argv, what):  # one engine in its own process: the JSON it prints
        r = subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
            raise RuntimeError(f"{what} failed: {why}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    # llama.cpp's extra CPU buffer types (AMX, repacked layouts) are its default; where they crash
    # (llama-cpp-python 0.3.36 segfaulted in llama_decode with them on a Sapphire Rapids VM with
    # AMX) the decode runs on the mapped GGUF instead, and the table says so
    no_extra = []

    if spec is None:
        d8 = checkpoint.synthetic_dir("llama3.1-8b", cache_dir)
        have = caches("llama3.1-8b")
        spec = "llama3.1-8b" if (d8 / "SYNTHETIC-COMPLETE").exists() and len(have) == 2 else "llama3-1b-bench"
    ck_dir = checkpoint.synthetic_dir(spec, cache_dir)
    if not (ck_dir / "SYNTHETIC-COMPLETE").exists():
        if spec == "llama3.1-8b":
            print("llama.cpp: synthetic:llama3.1-8b is not written; skipped")
            return
        # not one of arch.SPECS (which the tests and run8b --checkpoint synthetic:NAME list): the
        # bench registers its shape only while writing the directory, then runs it as a directory
        arch.SPECS[spec] = dict(arch.LLAMA31_8B, hidden_size=2048, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                intermediate_size=8192)
        try:
            checkpoint.write_synthetic(ck_dir, spec)
        finally:
            del arch.SPECS[spec]
    have = caches(spec)
    if spec == "llama3.1-8b" and len(have) < 2:
        print("llama.cpp: synthetic:llama3.1-8b has no w8 + w4 caches (run8b builds them); skipped")
        return
    run8b = ["bakedllama.llama8b.cli", prompt, "--checkpoint", str(ck_dir), "--cache-dir",
             str(cache_dir), "--context", "256", "--resident", "--no-verify"]
    for bits, scheme, _ in schemes:  # build a missing cache (the 1B shape only) with its progress
        if scheme not in have:
            print(f"llama.cpp bench: building run8b's {scheme} cache of {ck_dir.name}", flush=True)
            subprocess.run([sys.executable, "-m", *run8b, "--bits", bits, "--max-tokens", "1"], env=env,
                           check=True, stdout=subprocess.DEVNULL)
    have = caches(spec)

    # llama.cpp's leg: the GGUFs (written once, timings kept next to them)
    gdir = REPO / "build" / "bench" / "llamacpp"
    gdir.mkdir(parents=True, exist_ok=True)
    exporter = ["bakedllama.llama8b.gguf_export"]
    gguf = {qt: gdir / f"{ck_dir.name}-{qt}.gguf" for _, _, qt in schemes}
    missing = [qt for qt, g in gguf.items() if not (g.exists() and g.with_suffix(".json").exists())]
    if missing:
        import shutil

        cfg = checkpoint.HFCheckpoint(ck_dir).cfg
        n = sum(int(np.prod(checkpoint.tensor_shape(cfg, name))) for name, _ in checkpoint.tensor_list(cfg))
        size = {"bf16": 2 * n, "q8_0": n * 34 // 32, "q4_0": n * 18 // 32}
        free = shutil.disk_usage(gdir).free - (4 << 30)  # 4 GiB left to everyone else
        if sum(size[qt] for qt in missing) > free:
            print(f"llama.cpp: not enough disk for the GGUFs ({sum(size[qt] for qt in missing) / 1e9:.1f} GB "
                  f"in {gdir}); skipped")
            return
        # llama.cpp's own quantizer first (a BF16 GGUF, then one output at a time), when it fits
        lq, src = {}, gdir / f"{ck_dir.name}-bf16.gguf"
        if size["bf16"] + max(size[qt] for qt in missing) <= free:
            print(f"llama.cpp bench: BF16 GGUF of {ck_dir.name} + llama_model_quantize to "
                  f"{', '.join(missing)} (deleted after)", flush=True)
            try:
                bf16 = child(exporter + ["write", str(ck_dir), str(src), "--type", "bf16"], "GGUF bf16 write")
                for qt in missing:
                    out = gdir / f".lq-{qt}.gguf"
                    try:
                        q = child(exporter + ["quantize", str(src), str(out), "--type", qt],
                                  "llama_model_quantize")
                        lq[qt] = dict(bf16=bf16, llama_model_quantize=q)
                    finally:
                        out.unlink(missing_ok=True)
            finally:
                src.unlink(missing_ok=True)
        else:
            print(f"llama.cpp bench: no disk for a BF16 GGUF ({size['bf16'] / 1e9:.1f} GB): "
                  "llama_model_quantize not timed", flush=True)
        for qt in missing:
            print(f"llama.cpp bench: writing the {qt} GGUF of {ck_dir.name} (gguf.quants)", flush=True)
            res = child(exporter + ["write", str(ck_dir), str(gguf[qt]), "--type", qt], f"GGUF {qt} write")
            res.update(lq.get(qt, dict(bf16=None, llama_model_quantize=None)))
            gguf[qt].with_suffix(".json").write_text(json.dumps(res))
    legs = {qt: json.loads(g.with_suffix(".json").read_text()) for qt, g in gguf.items()}
    built = {s: json.loads((have[s] / "manifest.json").read_text()).get("build_seconds") for s in have}
    print(f"llama.cpp vs run8b on synthetic {spec} ({ck_dir.name}; the same bf16 weights):")
    for _, scheme, qt in schemes:
        lg, lq = legs[qt], legs[qt]["llama_model_quantize"]
        other = (f"BF16 GGUF {lg['bf16']['seconds']} [{lg['bf16']['cpu_seconds']}] + llama_model_quantize "
                 f"{lq['seconds']} [{lq['cpu_seconds']}] ({lq['threads']} threads)" if lq else
                 "llama_model_quantize not timed (disk)")
        print(f"  quantizing to {qt.upper()} (wall s, CPU s in brackets): GGUF written by gguf.quants "
              f"{lg['seconds']} [{lg['cpu_seconds']}] ({lg['bytes'] / 1e9:.2f} GB, {lg['threads']} "
              f"threads); or {other} | run8b {scheme} cache build {built.get(scheme)} s")

    # decode, alternating the engines (the order flips every round)
    tps = {}
    ids = None
    for bits, scheme, qt in schemes:
        for r in range(rounds):
            for th in threads:
                order = ("run8b", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "run8b")
                for eng in order:
                    if eng == "run8b":
                        res = child(run8b + ["--bits", bits, "--threads", str(th), "--json",
                                             "--max-tokens", str(max_tokens), "--quantized",
                                             str(have[scheme])], f"run8b --bits {bits}")
                        ids = res["prompt_ids"]
                        steps = res["seconds_per_token"]
                    else:
                        argv = exporter + ["decode", str(gguf[qt]), "--ids", ",".join(map(str, ids)),
                                           "--max-tokens", str(max_tokens), "--threads", str(th),
                                           "--context", "256"] + no_extra
                        try:
                            res = child(argv, "llama.cpp decode")
                        except RuntimeError as e:
                            if no_extra:
                                raise
                            print(f"  llama.cpp with its extra buffer types: {e}; from here on "
                                  "--no-extra-bufts (the weights in the mapped GGUF)", flush=True)
                            no_extra = ["--no-extra-bufts"]
                            res = child(argv + no_extra, "llama.cpp decode")
                        steps = statistics.fmean(res["decode_seconds"])
                    tps.setdefault((qt, th, eng), []).append(1 / steps)
                print(f"  round {r + 1}/{rounds} {qt}/{scheme} {th} thread(s): llama.cpp "
                      f"{tps[qt, th, 'llama.cpp'][-1]:.2f}, run8b {tps[qt, th, 'run8b'][-1]:.2f} tok/s",
                      flush=True)
    print(f"  decode tokens/s, {rounds} rounds alternating, {max_tokens - 1} decode steps each "
          f"(min / median); prompt {len(ids)} tokens; OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}"
          f"{'; llama.cpp without extra buffer types' if no_extra else ''}:")
    print("  threads  llama.cpp                 run8b --resident          run8b / llama.cpp (medians)")
    for _, scheme, qt in schemes:
        for th in threads:
            a, b = tps[qt, th, "llama.cpp"], tps[qt, th, "run8b"]
            print(f"  {th:7d}  {qt.upper()} {min(a):8.2f} / {statistics.median(a):8.2f}   "
                  f"{scheme} {min(b):8.2f} / {statistics.median(b):8.2f}     "
                  f"{statistics.median(b) / statistics.median(a):.2f}")


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    bench_golden()
    bench_kernel()
    bench_simd()
    bench_decode_bound()
    bench_cache_build()
    bench_soc()
    bench_speculative()
    from gateware import bench as gw_bench

    gw_bench.main([])
    bench_serve()
    bench_ray()
    bench_llamacpp()


if __name__ == "__main__":
    main()
