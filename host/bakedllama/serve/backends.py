"""What the server generates on: the golden model on the host, or a device (board, `make sim`, or a
simulation the server starts itself). Every method runs on the scheduler's one device thread.

generate(job) yields (token id, hardware cycles of its forward pass or None) and stops early when
job.cancelled is set: a device gets ABORT (the firmware ends the generation within one forward
pass, prompt passes included); the golden model stops before its next token (its prompt passes
run to the end: at most seq_len positions of numpy on the host)."""

from __future__ import annotations

import time

from bakedllama.device import DeviceError


class GoldenBackend:
    kind = "golden"

    def __init__(self, model):
        from bakedllama.golden import Golden

        self.model, self.g = model, Golden(model)
        self.url = "golden"
        self.info = dict(device="golden", board="golden model (numpy, on the host)", sys_clk_freq=None)

    def connect(self) -> dict:
        return self.info

    def probe(self) -> None:
        pass

    def close(self) -> None:
        pass

    def generate(self, job):
        from bakedllama.golden import generate

        gen = generate(self.g, job.ids, job.max_tokens, job.temperature, job.seed, job.top_k)
        n, t_first, finished = 0, None, False
        try:
            for t in gen:
                if job.cancelled.is_set():
                    return
                n += 1
                t_first = t_first or time.monotonic()
                yield t, None
            finished = True
        finally:
            gen.close()  # the golden model computes nothing more
            if not finished:  # stopped early (cancel, or a stop string): it generated n tokens
                job.stats.update(aborted_on_device=True, device_generated=n)
            if n > 1:
                job.stats["device_tokens_per_s"] = (n - 1) / (time.monotonic() - t_first)


class DeviceBackend:
    """A device behind a pyserial URL, or (url None) a Verilator simulation started here."""

    kind = "device"

    def __init__(self, url: str | None, model, log=None):
        self.url, self.model, self.log = url, model, log or (lambda m: None)
        self.sim = None
        self.dev = None
        self.info: dict = {}

    def connect(self) -> dict:
        """(Re)open the device, check it carries our model; raises DeviceError."""
        from bakedllama.device import check_model
        from bakedllama.device.csr import open_any
        from bakedllama.device.sim import SIM_STEP_TIMEOUT, SIM_TIMEOUT, build_sim, launch

        self.close()
        if self.url is None:
            if self.sim is None or not self.sim.alive():
                if self.sim is not None:
                    self.log(f"the simulator exited ({self.sim.proc.returncode}): starting a new one")
                    self.sim.stop()
                self.sim = launch(build_sim("real", log=self.log), boot_timeout=300)
            dev = self.sim.open()
        else:
            dev = open_any(self.url)  # a serial URL, or pcie:// / litex:// (CSR host loop)
        try:
            info = dev.info()
            check_model(info, self.model, dev.url)
            if info.board == 1:  # a Verilator simulation: ~1000x slower than the board
                dev.timeout = max(dev.timeout, SIM_TIMEOUT)
                dev.step_timeout = max(dev.step_timeout, SIM_STEP_TIMEOUT)
        except BaseException:
            dev.close()
            raise
        self.dev = dev
        self.info = dict(device=dev.url, board=info.board_name, sys_clk_freq=info.sys_clk_freq,
                         firmware=info.firmware, lanes=info.lanes, model_id=f"{info.model_id:08x}")
        return self.info

    def probe(self) -> None:
        """An idle device still answers (INFO); raises DeviceError."""
        if self.dev is None:
            raise DeviceError(f"{self.url or 'sim'}: not connected")
        self.dev.info()

    def close(self) -> None:
        if self.dev is not None:
            self.dev.close()
            self.dev = None

    def stop(self) -> None:
        self.close()
        if self.sim is not None:
            self.sim.stop()
            self.sim = None

    def generate(self, job):
        if self.dev is None:
            raise DeviceError(f"{self.url or 'sim'}: not connected")
        g = self.dev.generate(job.ids, job.max_tokens, job.temperature, job.seed)
        job.generation = g  # job.cancel() reaches the transport from the event loop's thread
        if job.cancelled.is_set():
            g.cancel()
        try:
            for t in g:
                yield t, g.token_cycles[-1]
        finally:
            g.close()  # not finished: ABORT (the transport waits for its reply)
            self._figures(job, g)

    def _figures(self, job, g) -> None:
        s = job.stats
        d = g.done
        if d is not None:
            chip = d.prefill_cycles + d.decode_cycles
            s["cycles_per_token"] = round(d.cycles_per_token, 1) if d.cycles_per_token else None
            s["chip_cycles"] = chip
            if chip:
                s["chip_tokens_per_s"] = round(len(g.tokens) * self.info["sys_clk_freq"] / chip, 1)
        elif g.token_cycles:
            s["cycles_per_token"] = round(sum(g.token_cycles) / len(g.token_cycles), 1)
        if len(g.tokens) > 1 and g.t_first is not None:
            end = g.t_end or time.monotonic()
            s["device_tokens_per_s"] = (len(g.tokens) - 1) / max(end - g.t_first, 1e-9)
        if g.aborted is not None:
            s["aborted_on_device"] = g.aborted
        if g.aborted:  # stopped early, and the device answered: what it says it generated
            try:
                s["device_generated"] = self.dev.stats().generated
            except DeviceError:
                pass
