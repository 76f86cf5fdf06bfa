"""Pipeline latencies of the units, defined once: the units build their pipelines from these and
the cycle model (and through it the 8B projection) prices the schedule with the same numbers.

Plain constants, no Migen, so `gateware.cycle_model` and `bakedllama.llama8b.projection` import
them cheaply. A unit whose structure cannot follow a constant checks it in its constructor.
"""

ROPE = 2  # Rope: products register, then the rounded sum
SWIGLU = 4  # SwiGLU: sigmoid index, table, h1 * sigmoid, * h3 and round
EXPNEG = 3  # ExpNeg: EXP_HI block-RAM read, hi * lo product, rounded result
ARGMAX = 1  # Argmax: the result register after the last beat
SOFTMAX_EXP = 1 + EXPNEG  # Softmax: the d = max - s register, then ExpNeg
NORM_LAT = 5  # RMSNorm: input beat -> output beat (products, u, u * g, xb, int8 registers)
NORM_GAP = 2  # RMSNorm: between the max pass and the output pass (beat max, quantization shift)
NORM_WAIT = 6  # RMSNorm: last sum-of-squares beat -> 1/sqrt ready (sum 2, ss_tot, bl, kk, mant)
KV_READ = 2  # Attention: KV cache data registered twice (the RAM's output register + one after its
# depth multiplexer)
KV_ADR = 1  # Attention: the KV cache read addresses registered
ATT_SCORE = 7  # Attention: K address (KV_ADR) -> K data (KV_READ), operands, q x k products, the
# scaled dot, the score (+ the adder tree)
ATT_OUT_REGS = 1  # Attention output passes: registers before out x recip (each costs the max
# wait and the drain one cycle)
ATT_MAX_REGS = 2  # Attention max pass: |o| registered, the beat's max tree registered (the wait
# for the last max grows by them)
ATT_EMIT_REGS = 1  # Attention emit pass: o >> ko registered before the clip (the drain grows)
MV_PRODUCTS = 1  # MatVec: the register after the bit-plane combination
MV_DSP = 1  # MatVec with packed DSP pairs: their product register, before the adder trees (every
# slot then waits for it)
ROM_ADR = 2  # weight ROMs: the address registered twice (per column slice, then per depth segment)
MV_LAT = 6 + ROM_ADR  # MatVec: command registers, ROM addresses (ROM_ADR) and data, word/act regs,
# group sum, m x partial, row accumulator
ROWPOST_IN = 1  # row post-processing: the engine's beat and its requantization shift registered
EMBED_RAW = 1  # embedding: its ROM address registered with the engine's (no mux at the RAM pins)
EMBED_MUX = 1  # embedding: the beat of dequantized weights registered after its D/P-way mux
ACTQ_EMIT = 1  # ActQuant: its buffer word registered before the quantizer (qemit, hemit)
SAMPLER = 6  # Sampler: RAM word, logit, t, d, exp tables, w (each pass drains them, the search too)
# row post-processing after the requantization register, per matrix kind
POST = {"qkv": ROPE, "wo": 0, "w13": SWIGLU, "w2": 0, "cls": ARGMAX}


def tree_latency(n: int, regs_every: int = 2) -> int:
    """Registers in hw.adder_tree over n inputs."""
    levels = (n - 1).bit_length() if n > 1 else 0
    return levels // regs_every
