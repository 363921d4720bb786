import pytest
import torch

from cmc_fast.metrics import classification_metrics, confusion


def test_metrics_match_a_hand_computed_confusion_matrix():
    # fake = 1. target/pred chosen so that tp=3, fp=1, fn=2, tn=4
    target = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    pred = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0, 0, 0])
    assert confusion(pred, target) == {"tp": 3, "fp": 1, "fn": 2, "tn": 4}
    m = classification_metrics(pred, target)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["fake_precision"] == pytest.approx(3 / 4)
    assert m["fake_recall"] == pytest.approx(3 / 5)
    assert m["fake_f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert m["real_precision"] == pytest.approx(4 / 6)
    assert m["real_recall"] == pytest.approx(4 / 5)
    assert m["real_f1"] == pytest.approx(2 * (4 / 6) * 0.8 / ((4 / 6) + 0.8))
    assert m["n"] == 10


def test_metrics_never_divide_by_zero():
    m = classification_metrics(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert m["accuracy"] == 1.0 and m["fake_precision"] == 0.0 and m["fake_f1"] == 0.0 and m["real_f1"] == 1.0


def test_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        classification_metrics(torch.zeros(3), torch.zeros(4))
