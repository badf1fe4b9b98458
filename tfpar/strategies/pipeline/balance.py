"""Balancing pipeline stages: where to cut a chain of layers into K stages.

Pure Python (no TensorFlow), so `tfpar plan` predicts the very cuts the
pipeline runner will make, without building the model.
"""

from __future__ import annotations


def balanced_cuts(weights: list[float], cuts: list[int], num_stages: int) -> list[int]:
    """K-1 of the allowed cuts minimizing the largest stage's total weight.

    Dynamic programming over segments (the runs of operations between allowed
    cuts); ties go to the earliest cut, so equal blocks split evenly.
    """
    if num_stages == 1:
        return []
    bounds = [-1] + cuts + [len(weights) - 1]
    segments = [sum(weights[bounds[i] + 1: bounds[i + 1] + 1]) for i in range(len(bounds) - 1)]
    n = len(segments)
    prefix = [0.0]
    for w in segments:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][j]: the smallest max-stage weight splitting segments[:j] into k stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j] - 1e-9:
                    best[k][j], choice[k][j] = value, i
    ends, j = [], n
    for k in range(num_stages, 0, -1):
        i = choice[k][j]
        ends.append(i)
        j = i
    starts = sorted(ends)[1:]  # segment indices where stages 1..K-1 begin
    return [bounds[i] for i in starts]
