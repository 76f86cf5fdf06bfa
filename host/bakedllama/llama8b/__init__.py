"""Llama 3.1 8B (any Llama checkpoint) in chip-sized partitions, with the accelerator's arithmetic.

  checkpoint  Hugging Face directories (safetensors, mmap), GGUF, synthetic:llama3.1-8b / -tiny
  quant       quantize once (bake.py schemes, numerics.quantize_matrix) into a checksummed,
              memory-mapped cache; calibration by the float path streamed layer by layer
  kernels     packed weight layouts and the exact numba matrix-vector kernel
  partition   cut the model for a chip's on-chip memory (whole layers, row splits)
  runner      pass-by-pass execution, bit-exact with golden.Golden
  projection  tokens/s for N chips from an analytic cycle model; table and plot
  agreement   top-1 / KL between two quantizations
  cli         `bakedllama run8b`
"""

from bakedllama.llama8b.arch import LLAMA3_TINY, LLAMA31_8B, Special, from_hf_config
from bakedllama.llama8b.checkpoint import (
                                           Checkpoint,
                                           GGUFCheckpoint,
                                           HFCheckpoint,
                                           open_checkpoint,
                                           write_synthetic,
)
from bakedllama.llama8b.kernels import Packed, matvec_packed, pack, unpack
from bakedllama.llama8b.partition import CHIPS, Partition, PartitionError, Piece, plan
from bakedllama.llama8b.quant import QuantModel, build_cache, from_baked, open_cache, quantized
from bakedllama.llama8b.runner import Runner, generate

__all__ = ["LLAMA3_TINY", "LLAMA31_8B", "Special", "from_hf_config", "Checkpoint", "GGUFCheckpoint",
           "HFCheckpoint", "open_checkpoint", "write_synthetic", "Packed", "matvec_packed", "pack",
           "unpack", "CHIPS", "Partition", "PartitionError", "Piece", "plan", "QuantModel",
           "build_cache", "from_baked", "open_cache", "quantized", "Runner", "generate"]
