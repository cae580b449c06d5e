"""Synthetic token data with structure a model can learn.

Each sequence is an arithmetic progression modulo the vocabulary with its own
random start and stride, so the next token follows from the previous two:
the loss of a working model falls well below log(vocab).
"""

import numpy as np


def progressions(rng: np.random.Generator, batch: int, length: int, vocab: int,
                 max_stride: int = 16) -> np.ndarray:
    """int32 [batch, length] tokens."""
    start = rng.integers(0, vocab, (batch, 1))
    stride = rng.integers(1, max_stride, (batch, 1))
    return ((start + stride * np.arange(length)[None, :]) % vocab).astype(np.int32)
