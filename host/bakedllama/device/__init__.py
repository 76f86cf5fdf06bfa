"""Talking to a bakedllama device: the ULX3S over its FTDI UART, the PCIe board over its CSRs
(csr.py: pcie://BDF, litex://HOST:PORT, sim-bridge) or the Verilator simulation.

    from bakedllama.device import open_device, start_sim
    with start_sim() as sim, sim.open() as dev:          # or open_device("/dev/ttyUSB0")
        info = dev.info()
        g = dev.generate(prompt_ids, max_tokens=64, temperature=0.0, seed=0)
        for token in g: ...                               # tokens as they arrive
        g.cycles_per_token, g.tokens_per_s

`generate_on_device` / `device_info` are what the CLI calls."""

from bakedllama.device.protocol import DEFAULT_BAUDRATE, Info, Stats
from bakedllama.device.sim import SimHandle, build_sim, start_sim
from bakedllama.device.transport import Device, DeviceError, Generation, check_model, open_device

__all__ = ["DEFAULT_BAUDRATE", "Device", "DeviceError", "Generation", "Info", "SimHandle", "Stats",
           "build_sim", "check_model", "connect_checked", "device_info", "generate_on_device",
           "open_device",
           "start_sim"]


def _connect(url, log):
    """(context manager stack, Device): the URL's device, or a started simulation if url is None."""
    import contextlib

    stack = contextlib.ExitStack()
    try:
        if url is None:
            sim = stack.enter_context(start_sim(log=log))
            dev = stack.enter_context(sim.open())
        elif url == "sim-bridge":  # the PCIe target's CSR host path, in Verilator over UARTBone
            from bakedllama.device.csr import start_bridge_sim

            dev = stack.enter_context(start_bridge_sim(log=log))
        else:  # pcie:// and litex:// drive the accelerator's CSRs (csr.py), the rest is serial
            from bakedllama.device.csr import open_any

            dev = stack.enter_context(open_any(url))
    except BaseException:
        stack.close()
        raise
    return stack, dev


def connect_checked(url, model, log=None):
    """(context manager stack, Device, Info): the URL's device (None = start the simulation),
    refused unless it runs `model`; a simulation gets its long timeouts."""
    from bakedllama.device.sim import SIM_STEP_TIMEOUT, SIM_TIMEOUT

    stack, dev = _connect(url, log)
    try:
        info = dev.info()
        check_model(info, model, dev.url)
    except BaseException:
        stack.close()
        raise
    if info.board == 1:  # a Verilator simulation (e.g. `make sim`): ~1000x slower than the board
        dev.timeout = max(dev.timeout, SIM_TIMEOUT)
        dev.step_timeout = max(dev.step_timeout, SIM_STEP_TIMEOUT)
    return stack, dev, info


def device_info(url, model=None, log=None) -> dict:
    """INFO of a device (None = the simulation) as a dict; with `model`, refuse another model."""
    stack, dev = _connect(url, log)
    with stack:
        info = dev.info()
        if model is not None:
            check_model(info, model, dev.url)
        return info.as_dict()


def generate_on_device(url, model, prompt_ids, max_tokens, temperature=0.0, seed=0,
                       on_token=None, log=None) -> dict:
    """Generate on a device (None = start the simulation, building it once if needed).

    Refuses a device whose model identity differs from `model`'s. on_token(id) is called as each
    token arrives. Returns tokens, cycles_per_token (hardware counter, mean over the forward
    passes), chip_tokens_per_s (generated tokens / the hardware counter's cycles of all passes at
    the system clock), tokens_per_s (end to end: request to last token, including the prompt)."""
    stack, dev, info = connect_checked(url, model, log)
    with stack:
        g = dev.generate(prompt_ids, max_tokens, temperature, seed, vocab_size=model.cfg.vocab_size)
        for t in g:
            if on_token is not None:
                on_token(t)
        cpt = g.cycles_per_token
        d = g.done
        chip = (d.prefill_cycles + d.decode_cycles) if d else 0
        return dict(
            tokens=list(g.tokens),
            cycles_per_token=round(cpt, 1) if cpt else None,
            # the firmware timer over the whole generation per pass: the accelerator + firmware +
            # link (protocol v2: the CPU is not in the token loop, the link carries batches)
            wall_cycles_per_token=round(d.wall_cycles_per_token, 1) if d and d.passes else None,
            # the accelerator's own time: every forward pass's hardware counter, at the SoC clock
            chip_cycles=chip or None,
            chip_tokens_per_s=round(len(g.tokens) * info.sys_clk_freq / chip, 1) if chip else None,
            tokens_per_s=round(g.tokens_per_s, 3) if g.tokens_per_s else None,
            projected_tokens_per_s=round(info.sys_clk_freq / cpt, 1) if cpt else None,
            sys_clk_freq=info.sys_clk_freq,
            board=info.board_name,
            device=dev.url,
            wall_s=round(g.wall_s, 3),
            retries=g.retries,
            **_bus_figures(g),
        )


def _bus_figures(g) -> dict:
    """A CSR device's bus traffic per generated token (csr.CSRGeneration), else nothing."""
    if not hasattr(g, "empty_polls") or not g.tokens:
        return {}
    n = len(g.tokens)
    return dict(bus=dict(reads_per_token=round(g.reads / n, 2), writes_per_token=round(g.writes / n, 2),
                         empty_polls=g.empty_polls))
