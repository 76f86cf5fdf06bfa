"""The simulated SoC (soc/sim.py in Verilator): build once (cached), start, wait, stop.

    with start_sim() as sim:                  # builds under build/soc/ if needed
        dev = sim.open()                      # Device on socket://127.0.0.1:PORT
        ...

The build is cached under build/soc/sim-<core>/ and reused while its inputs (soc/, firmware/,
gateware/, the baked model, the LiteX / Verilator versions) are unchanged. Each run gets its own
directory (the binary reads sim_config.js and the memory images from its working directory), so
several simulations can run at once; the TCP port is picked by the simulator (127.0.0.1 only) and
read from its log. The simulator dies with the process that started it (PR_SET_PDEATHSIG).

    python -m bakedllama.device [--port 4321] [--core real|testing]    # for `make sim`
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bakedllama.device.transport import Device, DeviceError, open_device

REPO = Path(__file__).resolve().parents[3]
BUILD_ROOT = REPO / "build" / "soc"
LISTEN_RE = re.compile(rb"\[serial2tcp_local\] listening on 127\.0\.0\.1:(\d+)")
# Simulation is ~1000x slower than the board: generous waits.
SIM_TIMEOUT = 10.0  # s, request -> reply
SIM_STEP_TIMEOUT = 30.0  # s, one forward pass: ~12,000 cycles at ~100k cycles/s (lanes=64) is
#                         0.12 s; 30 s covers a core with a few lanes on a loaded machine
SOURCE_SUFFIXES = (".py", ".c", ".h", ".S", ".ld", ".mak", ".v", ".sv")  # not docs


def _default_model() -> Path:
    from bakedllama.model import DEFAULT_BAKED

    return Path(DEFAULT_BAKED)


def _tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def build_key(core: str, model_path: Path | None) -> str:
    """Hash of everything the simulator binary and its memory images depend on."""
    import litex

    h = hashlib.sha256()
    h.update(f"{core}\n{sys.version_info[:2]}\n{litex.__file__}\n".encode())
    h.update(os.environ.get("BAKEDLLAMA_SIM_TRACE", "0").encode())  # waveforms: opt-in
    h.update(_tool_version(["verilator", "--version"]).encode())
    dirs = [REPO / "soc", REPO / "firmware"] + ([REPO / "gateware"] if core == "real" else [])
    if core == "real":  # the gateware derives its widths and tables from the numerics
        p = REPO / "host" / "bakedllama" / "numerics.py"
        h.update(p.read_bytes())
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and (p.suffix in SOURCE_SUFFIXES
                                                                 or p.name == "Makefile"):
                h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    if core == "real":
        mp = Path(model_path or _default_model())
        if not mp.exists():
            raise DeviceError(f"no baked model at {mp} (make weights, or pass --model)")
        h.update(hashlib.sha256(mp.read_bytes()).digest())
    return h.hexdigest()[:16]


def build_sim(core: str = "real", model_path: Path | str | None = None, *, force: bool = False,
              log=None, timeout: float = 3600.0) -> Path:
    """Build (or reuse) the simulator; returns its output dir. log(str) reports progress."""
    return build_soc_sim(f"sim-{core}", ["--core", core], lambda mp: build_key(core, mp),
                         f"the simulated SoC ({core} core)", model_path, force=force, log=log,
                         timeout=timeout)


def build_soc_sim(name: str, args: list, key_of, what: str, model_path=None, *, force: bool = False,
                  log=None, timeout: float = 3600.0) -> Path:
    """Build (or reuse) `python -m soc.sim ARGS` under BUILD_ROOT/name, cached by key_of(model
    path) and locked (one build at a time; others wait and reuse it). A bad model is refused
    before the cached build of a good one is touched."""
    if not (REPO / "soc" / "sim.py").exists():
        raise DeviceError("the simulation needs the source tree (soc/, firmware/): run from a clone")
    model_path = Path(model_path) if model_path else None
    if model_path is not None:  # a bad model must not cost the cached build of a good one
        from bakedllama.fileformat import ModelFileError
        from bakedllama.model import load_baked

        try:
            load_baked(model_path)
        except ModelFileError as e:
            raise DeviceError(f"cannot build the simulator: {e}") from None
    out = BUILD_ROOT / name
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(BUILD_ROOT / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = key_of(model_path)
        stamp = out / "build.key"
        binary = out / "gateware" / "obj_dir" / "Vsim"
        if not force and binary.exists() and stamp.exists() and stamp.read_text() == key:
            return out
        if log:
            log(f"building {what} in {out.relative_to(REPO)} ...")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "soc.sim", *args, "--output-dir", str(out), "--build"]
        if model_path:
            cmd += ["--model", str(model_path.resolve())]
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # meson...
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
        t0 = time.monotonic()
        with open(out / "build.log", "w") as f:
            try:
                r = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                   timeout=timeout)
            except subprocess.TimeoutExpired:
                raise DeviceError(f"simulator build took over {timeout:.0f} s "
                                  f"(see {out / 'build.log'})") from None
        if r.returncode != 0 or not binary.exists():
            tail = (out / "build.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise DeviceError(f"simulator build failed: {tail[0] if tail else '?'} "
                              f"(see {out / 'build.log'})")
        stamp.write_text(key)
        (out / "build_time_s").write_text(f"{time.monotonic() - t0:.1f}\n")
        if log:
            log(f"built in {time.monotonic() - t0:.0f} s")
        return out


def _pdeathsig():
    """In the child: die with the parent (no simulator left burning a core)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class SimHandle:
    proc: subprocess.Popen
    port: int
    run_dir: Path
    log_path: Path
    build_dir: Path

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def open(self, **kw) -> Device:
        kw.setdefault("timeout", SIM_TIMEOUT)
        kw.setdefault("step_timeout", SIM_STEP_TIMEOUT)
        return open_device(self.url, **kw)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def launch(build_dir: Path, port: int = 0, boot_timeout: float = 120.0,
           cycles_per_byte: int = 0, wait_ready: bool = True) -> SimHandle:
    """Start the simulator of a build in a fresh run dir; returns once it answers INFO
    (wait_ready=False: once it listens, without connecting)."""
    build_dir = Path(build_dir).resolve()
    gw = build_dir / "gateware"
    if port:  # the simulator's own message for a taken port is buried in its log
        import socket

        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as e:
                raise DeviceError(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e} "
                                  f"(another simulation, or pick another --port)") from None
    runs = BUILD_ROOT / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old in runs.iterdir():  # left by a process that was killed: its simulator died with it
        pid = old.name.split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    run_dir = runs / f"{os.getpid()}-{time.monotonic_ns()}"
    run_dir.mkdir()
    for p in gw.iterdir():  # memory images and the module directory, by symlink
        if p.suffix == ".init" or p.name == "modules":
            (run_dir / p.name).symlink_to(p)
    cfg = [m for m in json.loads((gw / "sim_config.js").read_text())]
    for m in cfg:
        if m.get("module") == "serial2tcp_local":
            m["args"] = dict(m.get("args", {}), port=port, cycles_per_byte=cycles_per_byte)
    (run_dir / "sim_config.js").write_text(json.dumps(cfg, indent=1))
    log_path = run_dir / "sim.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([str(gw / "obj_dir" / "Vsim")], cwd=run_dir, stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_pdeathsig, start_new_session=True)
    h = SimHandle(proc, 0, run_dir, log_path, build_dir)
    try:
        deadline = time.monotonic() + boot_timeout
        while True:
            m = LISTEN_RE.search(log_path.read_bytes())
            if m:
                h.port = int(m.group(1))
                break
            if proc.poll() is not None:
                raise DeviceError(f"the simulator exited ({proc.returncode}) before listening: "
                                  f"{h.log_tail(1)}")
            if time.monotonic() > deadline:
                raise DeviceError(f"the simulator did not listen within {boot_timeout:.0f} s")
            time.sleep(0.05)
        if not wait_ready:
            return h
        # Up when the firmware answers INFO (its banner may arrive first: ignored).
        dev = None
        while True:
            try:
                dev = h.open(timeout=2.0, retries=0)
                dev.info()
                break
            except DeviceError as e:
                if proc.poll() is not None:
                    raise DeviceError(f"the simulator exited ({proc.returncode}): "
                                      f"{h.log_tail(1)}") from None
                if time.monotonic() > deadline:
                    raise DeviceError(f"the simulated firmware did not answer within "
                                      f"{boot_timeout:.0f} s ({e})") from None
            finally:
                if dev is not None:
                    dev.close()
                    dev = None
        return h
    except BaseException:
        h.stop()
        raise


@contextlib.contextmanager
def start_sim(core: str = "real", model_path: Path | str | None = None, *, port: int = 0,
              rebuild: bool = False, log=None, boot_timeout: float = 120.0,
              cycles_per_byte: int = 0):
    """Build if needed, start the simulated SoC, yield a SimHandle, stop it at the end."""
    build_dir = build_sim(core, model_path, force=rebuild, log=log)
    h = launch(build_dir, port=port, boot_timeout=boot_timeout, cycles_per_byte=cycles_per_byte)
    try:
        yield h
    finally:
        h.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bakedllama.device",
                                description="Start the simulated SoC for other clients.")
    p.add_argument("--port", type=int, default=4321, help="TCP port on 127.0.0.1 (0 = any)")
    p.add_argument("--core", default="real", choices=["real", "testing"],
                   help="testing = the TEST-ONLY stand-in core")
    p.add_argument("--model", help="baked model (default weights/tiny/model-q.bkl)")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--build-only", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.build_only:
            out = build_sim(a.core, a.model, force=a.rebuild, log=print)
            print(f"simulator ready in {out}")
            return 0
        with start_sim(a.core, a.model, port=a.port, rebuild=a.rebuild, log=print) as h:
            with h.open() as dev:
                info = dev.info()
            print(f"simulated SoC ready at {h.url} (model {info.model_id:08x}, "
                  f"log {h.log_path}); Ctrl-C stops it", flush=True)
            while h.alive():
                time.sleep(0.5)
            print(f"the simulator exited ({h.proc.returncode}): {h.log_tail(1)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except DeviceError as e:
        print(f"bakedllama: {e}", file=sys.stderr)
        return 2 if str(e).startswith(("cannot build the simulator:", "cannot listen on")) else 1


if __name__ == "__main__":
    sys.exit(main())
