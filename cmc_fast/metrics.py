"""The paper's metrics (Tables 2 and 3): accuracy, and precision / recall / F1 of the fake and real classes."""

from __future__ import annotations

import torch

KEYS = ("accuracy", "fake_precision", "fake_recall", "fake_f1", "real_precision", "real_recall", "real_f1")


def confusion(pred: torch.Tensor, target: torch.Tensor) -> dict[str, int]:
    """Counts with fake (label 1) as the positive class."""
    pred, target = pred.long().view(-1).cpu(), target.long().view(-1).cpu()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in length: {pred.numel()} vs {target.numel()}")
    return {"tp": int(((pred == 1) & (target == 1)).sum()), "fp": int(((pred == 1) & (target == 0)).sum()),
            "fn": int(((pred == 0) & (target == 1)).sum()), "tn": int(((pred == 0) & (target == 0)).sum())}


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    # An empty denominator scores 0 (scikit-learn's zero_division=0), never NaN in a report.
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def classification_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    c = confusion(pred, target)
    n = sum(c.values())
    fake = _prf(c["tp"], c["fp"], c["fn"])
    real = _prf(c["tn"], c["fn"], c["fp"])  # real as the positive class: swap roles
    out = {"accuracy": (c["tp"] + c["tn"]) / n if n else 0.0}
    out.update(zip(KEYS[1:4], fake))
    out.update(zip(KEYS[4:], real))
    out["n"] = n
    out["predicted_fake"] = c["tp"] + c["fp"]  # 0 or n: every post given one class (a collapsed model)
    return out
