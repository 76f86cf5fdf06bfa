"""How far two quantizations of the same model disagree: top-1 and KL on the same tokens.

Both models are run teacher-forced over one token sequence (the same positions, the same
inputs); their integer logits are turned into floats only here, for measuring (as
golden.Logits.as_float says), never inside the datapath."""

from __future__ import annotations

import numpy as np

from bakedllama.llama8b import partition, runner
from bakedllama.llama8b.quant import QuantModel


def logits_over(qm: QuantModel, tokens: list[int], chip_bytes=None, streaming=True) -> np.ndarray:
    """Float logits (T, vocab) of the model at every position of `tokens`."""
    r = runner.Runner(qm, partition.plan(qm.cfg, qm.fmt, chip_bytes), streaming=streaming)
    s = r.new_state()
    return np.concatenate([r.forward(s, t).as_float() for t in tokens])


def compare(la: np.ndarray, lb: np.ndarray) -> dict:
    """top-1 agreement and mean KL(a || b) (nats) of two (T, vocab) float logit arrays."""
    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    pa, pb = logp(la.astype(np.float64)), logp(lb.astype(np.float64))
    kl = (np.exp(pa) * (pa - pb)).sum(-1)
    return dict(positions=int(la.shape[0]), top1_agreement=float((la.argmax(-1) == lb.argmax(-1)).mean()),
                kl_mean=float(kl.mean()), kl_max=float(kl.max()))
