"""Scale-out on Ray: the partitions on Ray actors, one pipeline stage per actor (`run8b --cluster`).

    --cluster ray            a local Ray cluster on 127.0.0.1, started for the run, stopped after
    --cluster ray://auto     the running cluster this machine is a node of (`ray start ...`)
    --cluster ray://HOST:PORT   the cluster whose head (GCS) listens at HOST:PORT; the driver runs
                             on a node of it, as Ray Compiled Graphs need (vLLM's pattern)

Each actor (`Stage`) holds a contiguous run of partitions (`assign`: balanced by bytes, the
per-token work of a memory-bound pass) resident, as a chip holds its weights: it maps the
quantized cache, touches its partitions' pages once at load and never releases them, and keeps
the KV cache of its own layers. A step's activations (runner.Step, cut to what the next stage
reads) go from actor to actor; the driver sends tokens in and gets logits back. The hops run
through a Ray Compiled Graph (channels set up once, no task launch per call) or through chained
actor tasks whose object refs pass from actor to actor. A compiled graph's readers wait by
spinning, so `auto` takes it where the nodes have cores to spare (compiled_graph_fits) and chained
tasks where they do not (two stages and the driver on this 2-core machine: tasks measured faster).

Exact by construction: every stage runs runner.Runner's own pieces (Runner._piece, the code the
in-process run executes) on the same Step, in the same order; the cluster run gives the tokens
and logits of the in-process one, bit for bit (tests/test_llama8b_ray.py).

Every node needs the project installed (same version) and the quantized cache at the same path
(a shared filesystem or the same copy: the actor checks the manifest's sha256 against the
driver's). A running cluster's authentication is the user's: with Ray's token auth (`ray start`
in Ray 2.60) the driver needs RAY_AUTH_MODE=token and the cluster's token in its environment
(tried here against `ray start --head` on 127.0.0.1: exact, compiled and tasks).

Processes of a local cluster carry a tag in their environment; `Cluster.close` ends Ray and then
any tagged process still alive, so nothing is left running; the next local cluster also ends
those of a driver that was killed before it could close (sweep_orphans)."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, fields

import numpy as np

from bakedllama.golden import Logits
from bakedllama.llama8b.partition import NORMS, Partition
from bakedllama.llama8b.runner import Runner, Step, check_tokens

TAG_VAR = "BAKEDLLAMA_RAY_RUN"  # in the environment of every process of a local cluster we start
OBJECT_STORE_BYTES = 96 << 20  # local cluster: activations are small (Ray's minimum is 75 MiB)
CONNECT_TIMEOUT = 5.0  # seconds for the TCP check of a remote head before ray.init
# seconds a stage's load or one pipelined step may take before the run gives up
CALL_TIMEOUT = float(os.environ.get("BAKEDLLAMA_RAY_TIMEOUT", 600))
USAGE = "--cluster must be 'ray' (a local cluster) or 'ray://ADDRESS' (auto, or HOST:PORT of a head)"


class ClusterError(ValueError):
    """The cluster cannot be reached or used (one clear line)."""


def parse_address(spec: str) -> str:
    """'ray' -> 'local'; 'ray://auto' -> 'auto'; 'ray://HOST:PORT' -> 'HOST:PORT'."""
    s = str(spec).strip()
    if s == "ray":
        return "local"
    if not s.startswith("ray://"):
        raise ClusterError(f"bad --cluster {spec!r}: {USAGE}")
    addr = s[len("ray://"):]
    if addr == "auto":
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"bad --cluster {spec!r}: {USAGE}")
    return addr


def _loopback_only() -> None:
    """A local cluster on 127.0.0.1 only: Ray's own single-host switch (it otherwise binds its
    services to the address of the machine's first interface). Set before Ray starts anything."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as rc  # read when Ray picks the node address

    rc.ENABLE_RAY_CLUSTER = False


def _find_running() -> str:
    """ray://auto: RAY_ADDRESS, or the cluster `ray start` left on this machine (Ray's lookup)."""
    try:
        from ray._private.services import get_ray_address_from_environment

        found = get_ray_address_from_environment("auto", None)
    except Exception:  # none found (Ray raises ConnectionError), or Ray moved the helper
        found = None
    if not found or found == "auto" or ":" not in found:
        raise ClusterError("ray://auto: no running Ray cluster found on this machine (`ray start "
                           "--head`, or give ray://HOST:PORT)")
    return found


def _tags() -> dict[int, str]:
    """pid -> TAG_VAR value, for this machine's processes that carry one (not this process)."""
    key, out = f"{TAG_VAR}=".encode(), {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                for e in f.read().split(b"\0"):
                    if e.startswith(key):
                        out[int(d)] = e[len(key):].decode()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return out


def tagged_processes(tag: str) -> list[int]:
    """Pids of the processes whose environment carries TAG_VAR=tag (a local cluster's)."""
    return [p for p, t in _tags().items() if t == tag]


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _new_tag() -> str:
    """driver pid . its start time . a random id: a process can tell whether its driver lives."""
    return f"{os.getpid()}.{_start_time(os.getpid())}.{uuid.uuid4().hex}"


def sweep_orphans() -> int:
    """End the processes of local clusters whose driver died without closing them (killed with
    SIGKILL: Ray's agents outlive it). Only processes that carry our tag; returns how many."""
    n = 0
    for pid, tag in _tags().items():
        dpid, _, rest = tag.partition(".")
        start = rest.partition(".")[0]
        if dpid.isdigit() and _start_time(int(dpid)) != start:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                n += 1
    return n


class Cluster:
    """A connection to a Ray cluster (a local one started here, or a running one). Use as a
    context manager, or call close(): Ray is shut down on every exit path."""

    def __init__(self, spec: str, num_cpus: int | None = None):
        self.spec, self.address = spec, parse_address(spec)
        self.tag, self.session_dir, self.owned, self.leftover_killed = None, None, False, 0
        self.orphans_ended = 0
        self._runners: list = []
        try:
            import ray
        except ImportError:
            raise ClusterError("--cluster needs Ray: pip install 'bakedllama[cluster]'") from None
        self.ray = ray
        if self.address == "auto":  # resolved here: the checks below then apply to it
            self.address = _find_running()
        if self.address != "local":
            host, _, port = self.address.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
            except OSError as e:
                raise ClusterError(f"cannot reach a Ray cluster at {self.address} "
                                   f"({e.strerror or e})") from None
        if ray.is_initialized():  # the caller's connection (tests, a notebook): used, left open
            return
        kw = dict(include_dashboard=False, log_to_driver=False, logging_level="warning",
                  configure_logging=True)
        if self.address.rpartition(":")[0] in ("127.0.0.1", "localhost"):
            _loopback_only()  # a head on this machine's loopback: Ray stays on it too
        if self.address == "local":
            _loopback_only()
            self.orphans_ended = sweep_orphans()
            self.tag = _new_tag()
            os.environ[TAG_VAR] = self.tag  # inherited by every process Ray starts from here
            # one logical CPU per stage at least (the stages of one sequence run one at a time)
            kw.update(num_cpus=max(num_cpus or 0, os.cpu_count() or 2),
                      object_store_memory=OBJECT_STORE_BYTES)
        try:
            ctx = ray.init(address=self.address, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            self._end()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ClusterError(f"Ray cluster {self.address}: {first}") from None
        except BaseException:
            self._end()
            raise
        finally:
            os.environ.pop(TAG_VAR, None)
        self.owned = True
        self.session_dir = ctx.address_info.get("session_dir")

    def nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def close(self) -> None:
        for r in self._runners:
            r.close()
        self._runners.clear()
        if self.owned:
            self._end()
            self.owned = False

    def _end(self) -> None:
        """ray.shutdown(), then end whatever tagged process of ours is still alive."""
        with contextlib.suppress(Exception):
            self.ray.shutdown()
        if self.tag is None:
            return
        deadline = time.monotonic() + 5.0
        while (left := tagged_processes(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.1)  # Ray's own shutdown is still ending them
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            self.leftover_killed += len(left)
            time.sleep(0.2)
            left = tagged_processes(self.tag)
            if not left:
                break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


@contextlib.contextmanager
def open_cluster(spec: str | None, num_cpus: int | None = None):
    """`with open_cluster(args.cluster) as cl:` -> a Cluster, or None without --cluster."""
    if not spec:
        yield None
        return
    cl = Cluster(spec, num_cpus)
    try:
        yield cl
    finally:
        cl.close()


# ----------------------------------------------------------------------------- placement
def assign(parts: list[Partition], n: int) -> list[list[Partition]]:
    """Contiguous runs of partitions for n pipeline stages (fewer if there are fewer partitions),
    balanced by bytes: stage k ends at the partition boundary nearest k/n of the weights."""
    n = max(1, min(int(n), len(parts)))
    pre = np.cumsum([p.nbytes for p in parts])
    cuts = [0]
    for k in range(1, n):
        lo, hi = cuts[-1] + 1, len(parts) - (n - k)  # each stage keeps at least one partition
        i = int(np.searchsorted(pre, pre[-1] * k / n))
        i = min(max(i, lo - 1), hi - 1)
        if i + 1 < hi and abs(pre[i + 1] - pre[-1] * k / n) < abs(pre[i] - pre[-1] * k / n):
            i += 1
        cuts.append(i + 1)
    cuts.append(len(parts))
    return [parts[a:b] for a, b in zip(cuts, cuts[1:])]


def _trim(st: Step, next_piece) -> Step:
    """What the next stage reads of a step: the residual alone when it starts at a norm (a layer,
    its FFN, or the head), the logits when there is no next stage, everything otherwise."""
    if next_piece is None:
        keep = {"tokens", "last_only", "logits", "logit_frac", "pass_seconds"}
    elif next_piece.name in NORMS:
        keep = {"tokens", "last_only", "x", "pass_seconds"}
    else:
        return st
    return Step(**{f.name: getattr(st, f.name) for f in fields(Step) if f.name in keep})


# ----------------------------------------------------------------------------- the actor
class Stage:
    """One pipeline stage: a run of partitions resident in this process, and their KV cache."""

    def __init__(self, index: int, cache: str, seq_len: int, parts: list[Partition],
                 next_piece, sha256: dict, threads: int = 0):
        self.index, self.cache, self.seq_len, self.parts = index, cache, seq_len, parts
        self.next_piece, self.sha256, self.threads = next_piece, sha256, threads
        self.r = self.s = None

    def load(self) -> dict:
        """Map the cache, check it is the driver's, touch this stage's weights (resident)."""
        import numba

        from bakedllama.llama8b import fastglue, kernels, quant

        t = time.perf_counter()
        if self.threads:
            numba.set_num_threads(self.threads)
        qm = quant.open_cache(self.cache, verify=False)
        mine = {f: i["sha256"] for f, i in qm.meta["files"].items()}
        if mine != self.sha256:
            raise ValueError(f"{self.cache} on {socket.gethostname()} is not the driver's quantized "
                             "cache (sha256 differs)")
        qm.cfg = type(qm.cfg).from_dict(dict(qm.cfg.to_dict(), seq_len=self.seq_len))
        self.r = Runner(qm, self.parts, streaming=False)
        self.s = self.r.new_state()
        # this stage's matrices copied out of the page cache (QuantModel.pin: read faster there)
        qm.pin({(pc.name, pc.layer) for part in self.parts for pc in part.pieces
                if (pc.name, pc.layer) in qm.mats})
        fastglue.warm_up()
        touched = sum(_touch(a) for a in _arrays(qm, self.parts))
        for p in {p.store_bits: p for p in (qm.mats[(pc.name, pc.layer)] for part in self.parts
                                            for pc in part.pieces if (pc.name, pc.layer) in qm.mats)
                  }.values():
            kernels.matvec_packed(p, np.zeros(p.cols, np.int64), 0, 1)  # compile / load numba
        import ray

        return dict(stage=self.index, pid=os.getpid(), node=ray.util.get_node_ip_address(), cpus=_cpus(),
                    host=socket.gethostname(), partitions=[p.index for p in self.parts],
                    weight_bytes=sum(p.nbytes for p in self.parts), touched_bytes=touched,
                    threads=numba.get_num_threads(), load_seconds=round(time.perf_counter() - t, 2))

    def stage(self, msg):
        """(pos, Step) in -> this stage's partitions run on it -> (pos, Step) for the next."""
        pos, st = msg
        for f in fields(Step):  # arrays that arrive zero-copy are read-only; the pieces write
            v = getattr(st, f.name)
            if isinstance(v, np.ndarray) and not v.flags.writeable:
                setattr(st, f.name, v.copy())
        if pos == 0:  # a new sequence
            self.s = self.r.new_state()
        elif pos != self.s.pos:
            raise RuntimeError(f"stage {self.index} is at position {self.s.pos}, step for {pos}")
        for part in self.parts:
            t = time.perf_counter()
            for pc in part.pieces:
                self.r._piece(self.s, st, pc)
            st.pass_seconds.append(time.perf_counter() - t)
        self.s.pos += len(st.tokens)
        return pos, _trim(st, self.next_piece)


def _arrays(qm, parts: list[Partition]):
    """(array, byte lo, byte hi) of the weights the partitions read (row ranges of matrices)."""
    for part in parts:
        for pc in part.pieces:
            if pc.name == "tok_embeddings":
                for a in (qm.embed.q, qm.embed.m):
                    per = a.nbytes // a.shape[0]
                    yield a, pc.r0 * per, pc.r1 * per
            elif pc.name in NORMS:
                a = qm.norms[(pc.name, pc.layer)]
                yield a, 0, a.nbytes
            else:
                p = qm.mats[(pc.name, pc.layer)]
                b0, b1 = p.block_range(pc.r0, pc.r1)
                for a in (*p.planes, p.m):
                    per = a.nbytes // a.shape[0]
                    yield a, b0 * per, b1 * per


def _touch(item) -> int:
    """Read one byte of every page of a byte range (maps it into this process: resident)."""
    a, lo, hi = item
    flat = np.asarray(a).reshape(-1).view(np.uint8)[lo:hi]
    if len(flat):
        flat[::mmap.PAGESIZE].sum()
    return len(flat)


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(Stage)
    return _ACTOR


# ----------------------------------------------------------------------------- the driver side
GRAPHS = ("auto", "compiled", "tasks")
SPIN_SHARE = 4  # auto: compiled while the waiting parties of a node use at most 1/4 of its cores


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compiled_graph_fits(stages: list[dict], driver: dict) -> tuple[bool, str]:
    """Whether a compiled graph pays here. Its readers wait by spinning (sched_yield) on a core:
    while one stage computes, every other stage and the driver spin. On a node of C cores that
    holds P parties (stages and the driver), P - 1 spinners take cores from the computing one;
    compiled when P <= C / SPIN_SHARE on every node (one stage per many-core node: yes; two
    stages and the driver on this 2-core machine: no, chained tasks measured faster here)."""
    nodes: dict = {}
    for p in [*stages, driver]:
        n = nodes.setdefault(p["node"], dict(parties=0, cpus=p["cpus"]))
        n["parties"] += 1
    worst = max(nodes.items(), key=lambda kv: kv[1]["parties"] / kv[1]["cpus"])
    ip, n = worst
    fits = all(v["parties"] <= max(1, v["cpus"] // SPIN_SHARE) for v in nodes.values())
    return fits, (f"{n['parties']} parties on {n['cpus']} cores of {ip}: "
                  f"{'compiled graph' if fits else 'spinning readers would take cores; tasks'}")


@dataclass
class ClusterState:
    """The driver's view of one sequence: its position (the KV caches live on the actors)."""

    pos: int = 0


class RayRunner:
    """runner.Runner's interface (new_state, forward, forward_many, last_pass_seconds) over Ray
    actors, so runner.generate runs on it unchanged."""

    def __init__(self, cl: Cluster, qm, parts: list[Partition], actors: int = 2, threads: int = 0,
                 graph: str = "auto"):
        """graph: 'compiled' (a Ray Compiled Graph), 'tasks' (chained actor tasks) or 'auto'
        (compiled_graph_fits: compiled where the spinning readers leave the nodes' cores free)."""
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}")
        ray = cl.ray
        self.cl, self.cfg, self.parts = cl, qm.cfg, parts
        if qm.path is None:
            raise ClusterError("--cluster runs a quantized cache (a model mapped from disk)")
        self.groups = assign(parts, actors)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < len(self.groups):  # the actors would wait for resources forever
            raise ClusterError(f"the cluster has {cpus:g} CPUs: {len(self.groups)} stages need one "
                               "each (fewer --actors, or more nodes)")
        sha = {f: i["sha256"] for f, i in qm.meta["files"].items()}
        nxt = [g[0].pieces[0] for g in self.groups[1:]] + [None]
        cls = _actor_class().options(num_cpus=1, scheduling_strategy="SPREAD")
        self.actors = [cls.remote(i, str(qm.path), qm.cfg.seq_len, g, nx, sha, threads)
                       for i, (g, nx) in enumerate(zip(self.groups, nxt))]
        self.dag = None
        self.last_pass_seconds: list = []
        cl._runners.append(self)
        try:
            self.placement = ray.get([a.load.remote() for a in self.actors], timeout=CALL_TIMEOUT)
        except ray.exceptions.RayTaskError as e:
            raise ClusterError(f"a stage could not load: {_cause(e)}") from None
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"the stages did not load within {CALL_TIMEOUT:.0f} s (cluster "
                               "resources: one CPU per stage)") from None
        except ray.exceptions.RayError as e:
            raise ClusterError(f"a stage could not start: {_cause(e)}") from None
        self.mode, self.compile_note = "tasks", None
        driver = dict(node=ray.util.get_node_ip_address(), cpus=_cpus())
        fits, self.graph_reason = compiled_graph_fits(self.placement, driver)
        if graph == "compiled" or (graph == "auto" and fits):
            try:
                from ray.dag import InputNode

                with InputNode() as inp:
                    node = inp
                    for a in self.actors:
                        node = a.stage.bind(node)
                self.dag = node.experimental_compile()
                self.mode = "compiled"
            except Exception as e:  # Ray Client, an old Ray: chained tasks still work
                self.compile_note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if graph != "auto":
            self.graph_reason = f"asked for {graph}"
        t = time.perf_counter()
        self.forward(self.new_state(), 0)  # the first call sets the channels up (seconds here)
        self.warmup_seconds = round(time.perf_counter() - t, 2)

    def new_state(self) -> ClusterState:
        return ClusterState()

    def forward(self, s: ClusterState, token: int) -> Logits:
        return self.forward_many(s, [token])

    def forward_many(self, s: ClusterState, tokens, last_only: bool = False) -> Logits:
        """runner.Runner.forward_many through the pipeline of actors (the same checks first)."""
        tokens = check_tokens(self.cfg, s.pos, tokens)
        msg = (s.pos, Step(tokens, last_only=last_only))
        ray = self.cl.ray
        try:
            if self.dag is not None:
                pos, st = ray.get(self.dag.execute(msg), timeout=CALL_TIMEOUT)
            else:
                ref = msg
                for a in self.actors:
                    ref = a.stage.remote(ref)
                pos, st = ray.get(ref, timeout=CALL_TIMEOUT)
        except ray.exceptions.RayTaskError as e:
            raise ClusterError(f"a stage failed: {_cause(e)}") from None
        except ray.exceptions.RayError as e:  # an actor died, a timeout
            raise ClusterError(f"the pipeline failed: {_cause(e)}") from None
        # copies: a compiled graph hands out arrays that view its channel's buffer, and the
        # channel cannot take the next step while a view of the last one is alive (kept logits)
        lg = Logits(np.array(st.logits), np.array(st.logit_frac))
        self.last_pass_seconds = list(st.pass_seconds)
        del st
        s.pos += len(tokens)
        return lg

    def describe(self) -> dict:
        return dict(mode=self.mode, why=self.graph_reason, compile_note=self.compile_note,
                    warmup_seconds=self.warmup_seconds, stages=self.placement)

    def close(self) -> None:
        if self.dag is not None:
            with contextlib.suppress(Exception):
                self.dag.teardown()
            self.dag = None
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.cl.ray.kill(a)
        self.actors = []


def _cause(e) -> str:
    c = getattr(e, "cause", None) or e
    return (str(c).strip().splitlines() or [type(c).__name__])[0]
