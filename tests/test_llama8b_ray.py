"""Scale-out on Ray (host/bakedllama/llama8b/cluster.py): partitions on Ray actors as pipeline stages.

A local Ray cluster (2 worker actors, 127.0.0.1) gives the tokens and logits of the in-process run,
bit for bit, through a compiled graph and through chained actor tasks; `run8b --cluster ray` does
so from the command line and leaves no Ray process behind; a bad address is one line and exit 2.
Ray starts twice here (the CLI's own cluster, then one shared by the in-process tests); the
placement and the 70B shapes need no Ray at all."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bakedllama.llama8b import checkpoint, cli, cluster, partition, projection, quant, runner
from bakedllama.llama8b.arch import LLAMA31_70B, SPECS, from_hf_config

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install 'bakedllama[cluster]')")
PROMPT = [384, 72, 101, 108, 111]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama8b_ray")
    checkpoint.open_checkpoint("synthetic:llama3-tiny", 64, d, show_progress=False)
    return d


@pytest.fixture(scope="module")
def qm(tiny_dir):
    ck = checkpoint.open_checkpoint("synthetic:llama3-tiny", 64, tiny_dir, show_progress=False)
    return quant.quantized(ck, "8", cache_dir=tiny_dir, show_progress=False)


def _same_logits(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x.acc, y.acc) and np.array_equal(x.frac, y.frac)
                                    for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the command line
@needs_ray
def test_cli_cluster_run_is_exact_and_leaves_nothing_running(tiny_dir):
    """A user's run in its own process: its own local cluster, compared with the unpartitioned
    in-process run (--check), then every process of that cluster gone once the command exits."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(cluster.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "bakedllama.cli", "run8b", "--checkpoint",
                        "synthetic:llama3-tiny", "--cache-dir", str(tiny_dir), "--cluster", "ray",
                        "--chip-bytes", "3000", "--max-tokens", "5", "--context", "32", "--check",
                        "--json", "Hello"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("\n") == 1
    res = json.loads(p.stdout)
    assert res["check"]["tokens_identical"] and res["check"]["logits_identical"]
    cr = res["cluster"]
    assert cr["nodes"] == 1 and len(cr["stages"]) == 2
    assert cr["mode"] == ("compiled" if (os.cpu_count() or 1) >= 12 else "tasks")  # auto: 3 parties
    got = [i for sg in cr["stages"] for i in sg["partitions"]]
    assert got == list(range(res["partitions"]))  # contiguous runs, every partition once
    assert len({sg["pid"] for sg in cr["stages"]}) == 2 and all(sg["node"] == "127.0.0.1"
                                                               for sg in cr["stages"])
    assert cr["overhead_seconds_per_token"] is not None
    assert cluster.tagged_processes(cr["tag"]) == []


@needs_ray
@pytest.mark.parametrize("spec,expect", [("ray://127.0.0.1:1", "cannot reach a Ray cluster"),
                                         ("bogus", "--cluster must be"),
                                         ("ray://127.0.0.1", "--cluster must be")])
def test_bad_address_one_line_exit_2(tiny_dir, capsys, spec, expect):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    rc = cli.run(p.parse_args(["--checkpoint", "synthetic:llama3-tiny", "--cache-dir",
                               str(tiny_dir), "--cluster", spec, "Hi"]))
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert rc == 2 and cap.out == "" and len(err) == 1 and expect in err[0], err


# ----------------------------------------------------------------------------- the API on one cluster
@pytest.fixture(scope="module")
def local_cluster():
    cl = cluster.Cluster("ray", num_cpus=2)
    yield cl
    cl.close()


@needs_ray
@pytest.mark.parametrize("chip,graph", [(3000, "compiled"), (None, "tasks")])
def test_pipeline_equals_in_process(local_cluster, qm, chip, graph):
    """Prompt (a batched pass) and decode steps: tokens and every position's logits identical.
    chip 3000: 56 partitions, the stage boundary inside a layer (the whole step crosses);
    unpartitioned: the boundary at the final norm (only the residual crosses)."""
    parts = partition.plan(qm.cfg, qm.fmt, chip)
    ref = runner.generate(runner.Runner(qm, parts), PROMPT, 8, keep_logits=True)
    rr = cluster.RayRunner(local_cluster, qm, parts, actors=2, graph=graph)
    try:
        assert rr.mode == graph
        first = rr.groups[1][0].pieces[0]
        assert (first.name in partition.NORMS) == (chip is None)
        out = runner.generate(rr, PROMPT, 8, keep_logits=True)
        assert out["tokens"] == ref["tokens"]
        assert _same_logits(out["logits"], ref["logits"])
        assert len(out["logits"]) == len(PROMPT) + len(out["tokens"]) - 1
        # one pass time per partition, measured inside the actors
        assert all(len(ps) == len(parts) for ps in out["pass_seconds"])
        # a second sequence on the same actors starts afresh (their KV caches reset at position 0)
        again = runner.generate(rr, PROMPT, 8, keep_logits=True)
        assert again["tokens"] == ref["tokens"] and _same_logits(again["logits"], ref["logits"])
        pids = {sg["pid"] for sg in rr.placement}
        assert len(pids) == 2 and os.getpid() not in pids
    finally:
        rr.close()


@needs_ray
def test_stage_refuses_another_cache(local_cluster, qm):
    qm2 = quant.open_cache(qm.path, verify=False)
    qm2.cfg = qm.cfg
    f = next(iter(qm2.meta["files"]))
    qm2.meta["files"][f] = dict(qm2.meta["files"][f], sha256="0" * 64)
    with pytest.raises(cluster.ClusterError, match="not the driver's quantized cache"):
        cluster.RayRunner(local_cluster, qm2, partition.plan(qm.cfg, qm.fmt, None), actors=1)


@needs_ray
def test_close_ends_every_process(local_cluster):
    tag = local_cluster.tag
    assert tag and cluster.tagged_processes(tag)  # the cluster's own processes carry the tag
    local_cluster.close()
    assert cluster.tagged_processes(tag) == []


def test_auto_graph_where_cores_are_spare():
    one = [dict(node="a", cpus=2), dict(node="a", cpus=2)]
    assert not cluster.compiled_graph_fits(one, dict(node="a", cpus=2))[0]  # this machine
    many = [dict(node=n, cpus=16) for n in "abcd"]
    assert cluster.compiled_graph_fits(many, dict(node="a", cpus=16))[0]  # a stage per node
    assert not cluster.compiled_graph_fits(many[:1] * 5, dict(node="a", cpus=16))[0]


def test_sweep_ends_only_orphans_of_dead_drivers():
    """A driver killed with SIGKILL cannot close its cluster (Ray's agents outlive it): the next
    local cluster ends the processes whose tag names a driver that is gone, and no other."""
    me = f"{os.getpid()}.{cluster._start_time(os.getpid())}.live"
    dead = f"{os.getpid()}.0.dead"  # this pid with another start time: that driver is gone
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = {t: subprocess.Popen(cmd, env=dict(os.environ, **{cluster.TAG_VAR: t})) for t in (me, dead)}
    try:
        deadline = time.monotonic() + 10
        while len(cluster.tagged_processes(me) + cluster.tagged_processes(dead)) < 2:
            assert time.monotonic() < deadline, "the tagged processes did not start"
            time.sleep(0.05)
        assert cluster.sweep_orphans() >= 1  # (and any real orphan of an earlier run)
        assert procs[dead].wait(timeout=10) == -signal.SIGKILL
        assert procs[me].poll() is None
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------- placement, 70B shapes
def test_assign_contiguous_balanced():
    cfg, _ = from_hf_config(LLAMA31_70B)
    fmt = projection.scheme_fmt(cfg, "w8")
    parts = partition.plan(cfg, fmt, 20 << 30)  # a 24 GB node keeps ~20 GB of weights resident
    total = sum(p.nbytes for p in parts)
    for n in (1, 2, 4, 8, len(parts), len(parts) + 3):
        groups = cluster.assign(parts, n)
        assert [p.index for g in groups for p in g] == list(range(len(parts)))
        assert len(groups) == min(n, len(parts)) and all(groups)
        if n <= 4:  # each stage within one partition of its share
            big = max(p.nbytes for p in parts)
            assert all(abs(sum(p.nbytes for p in g) - total / n) <= big for g in groups)


def test_llama31_70b_shapes():
    cfg, special = from_hf_config(SPECS["llama3.1-70b"])
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
            cfg.vocab_size) == (8192, 80, 64, 8, 128, 28672, 128256)
    assert special.bos == 128000
    from bakedllama.model import expected_float_shapes

    n = sum(int(np.prod(s)) for s in expected_float_shapes(cfg).values())
    assert n == 70_553_706_496  # Llama 3.1 70B's published parameter count
    fmt = projection.scheme_fmt(cfg, "w8")
    parts = partition.plan(cfg, fmt, 20 << 30)
    assert sum(p.nbytes for p in parts) > 70e9 and len(parts) >= 5  # more than one 24 GB machine
