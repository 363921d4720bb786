"""The paper's metrics (Tables 2 and 3): accuracy, and precision / recall / F1 of the fake and real classes; the
macro F1 and ROC AUC a run may select its checkpoints on (``--select-metric``), and the rule that keeps the last
epoch instead where the validation split is too small to choose on (``--select-min-val``)."""

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
    out["macro_f1"] = (out["fake_f1"] + out["real_f1"]) / 2
    out["n"] = n
    out["predicted_fake"] = c["tp"] + c["fp"]  # 0 or n: every post given one class (a collapsed model)
    return out


def roc_curve(p_fake, label) -> tuple[list[float], list[float], float]:
    """(false-positive rates, true-positive rates, area) over every threshold, fake = positive; tied scores
    move together (one point per distinct score)."""
    order = sorted(range(len(p_fake)), key=lambda i: -float(p_fake[i]))
    pos = sum(int(y) == 1 for y in label)
    neg = len(label) - pos
    fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
    for k, i in enumerate(order):
        tp, fp = tp + (int(label[i]) == 1), fp + (int(label[i]) != 1)
        if k + 1 == len(order) or float(p_fake[order[k + 1]]) != float(p_fake[i]):
            fpr.append(fp / neg if neg else 0.0)
            tpr.append(tp / pos if pos else 0.0)
    area = sum((fpr[j] - fpr[j - 1]) * (tpr[j] + tpr[j - 1]) / 2 for j in range(1, len(fpr)))
    return fpr, tpr, area


SELECT_KEYS = {"accuracy": "accuracy", "macro-f1": "macro_f1", "auc": "auc"}


def selection_score(metrics: dict[str, float], select_metric: str) -> float:
    """The value ``--select-metric`` reads from a head's validation metrics (higher is better)."""
    return float(metrics[SELECT_KEYS[select_metric]])


def selection_rule(select_metric: str, select_min_val: int, val_posts: int) -> str:
    """How a stage keeps each head's checkpoint: by ``select_metric`` on the validation split, or ``"last"`` (the
    stage's last epoch) where the split has fewer than ``select_min_val`` posts. On 20 posts accuracy moves in steps
    of 0.05 with a standard error near 0.09, so the best of six epochs is mostly the luckiest: a run on PolitiFact
    kept its untrained first epoch that way (bench/results/quality-text-cpu.md)."""
    return "last" if val_posts < select_min_val else select_metric
