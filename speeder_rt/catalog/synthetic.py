"""Seeded synthetic item-token catalogs with cluster structure, for the index's tests and benchmark.

Real item tokens are not isotropic noise: items of a genre / style sit near each other. Here ``N`` tokens
are drawn around ``max(16, N // 500)`` cluster centres, ``t = c_j + NOISE z`` with ``c_j, z ~ N(0, I_d)``,
and queries (user states) from the same law, near a random centre. Isotropic queries would make an ANN
index look falsely bad (no neighbourhood structure to exploit)."""
from __future__ import annotations

import numpy as np

NOISE = 1.0
_CHUNK_ROWS = 1 << 20


def clustered_catalog(num_items: int, dim: int, num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [num_items, dim], queries [num_queries, dim])``, float32, deterministic by ``seed``;
    built in chunks of 2^20 rows, so the peak is the output plus one chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, num_items // 500), dim), dtype=np.float32)
    tokens = np.empty((num_items, dim), dtype=np.float32)
    for start in range(0, num_items, _CHUNK_ROWS):
        tokens[start:start + _CHUNK_ROWS] = _around(rng, centres, min(_CHUNK_ROWS, num_items - start))
    return tokens, _around(rng, centres, num_queries)


def _around(rng: np.random.Generator, centres: np.ndarray, rows: int) -> np.ndarray:
    noise = rng.standard_normal((rows, centres.shape[1]), dtype=np.float32)
    noise *= NOISE
    noise += centres[rng.integers(len(centres), size=rows)]
    return noise
