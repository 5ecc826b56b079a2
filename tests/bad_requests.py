"""Invalid requests and the errors every runtime (Python, C++) must answer them with; the exports they are
sent to hold 120 items and take histories of at most 8 items and 1..20 candidates."""
import numpy as np

BAD_REQUESTS = [  # (history_ids, candidate_ids, error message pattern)
    ([[3, 120]], [[1]], r"history_ids\[0\]: item ids must be in 0..119"),
    ([[3, -2]], [[1]], r"item ids must be in 0..119"),
    ([[3], []], [[1], [2]], r"history_ids\[1\]: empty history"),
    ([list(range(9))], [[1]], r"9 items; this export takes at most 8"),
    ([[3]], [list(range(21))], r"21 candidates per user; this export takes 1..20"),
    ([[3]], [[120]], r"candidate_ids: item ids must be in 0..119"),
    ([[3], [4]], [[1, 2], [3]], r"candidate_ids: expected a 2-D batch"),
    ([[3]], [[1], [2]], r"2 rows for 1 histories"),
    ([3, 4], [[1]], r"history_ids\[0\]: expected a list of item ids"),
    (np.array([[-1, 3]]), [[1]], r"padding \(negative ids\) must come after"),
    ([], [], r"empty batch"),
    ([[1.5]], [[1]], r"item ids must be integers"),
]
