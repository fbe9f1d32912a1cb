"""ROUGE-L: F1 of the longest common subsequence of whitespace tokens. Pure; no dependencies.

Tokens are the prediction and reference split on whitespace, compared exactly (no lower-casing or
stemming), so the score is reproducible without the ``rouge-score`` package. As in that package, an
empty prediction or reference scores 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 in [0, 1]: 2PR / (P + R) with P = LCS / |pred|, R = LCS / |ref| (in tokens)."""
    p, r = pred.split(), ref.split()
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)
