"""bakedllama gateware: the model compiler (baked model -> Migen/LiteX accelerator) and its tools.

compiler.py     passes: geometry, weight bank images, tables, schedule (pure Python, no Migen)
cycle_model.py  expected cycles per token from the config and the lanes (pure Python)
hw.py           small hardware helpers (rounding shifts, saturation, leading-one detect, CSD)
matvec.py       banked weight ROMs and the lanes-wide matrix-vector engine
units.py        RMSNorm, activation quantizer, RoPE, SwiGLU, exp, divider, argmax, sampler, ...
attention.py    attention over the on-chip KV cache (two passes: max, then exp-weighted values)
core.py         BakedLlamaCore: the LiteX module (streams, CSRs, fixed-schedule sequencer)
build.py        `python -m gateware.build`: Verilog, and synthesis / place-and-route for ECP5
sim.py          Verilator harness (cached build, C++ testbench driving streams and CSRs)
"""
