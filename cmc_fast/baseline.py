"""The classical baseline row of every run: TF-IDF + logistic regression (scikit-learn), fitted on the run's fit
split, its C chosen on the run's validation split by the run's selection metric, and scored once on the run's test
posts. It tells at a glance whether a network learned more than the words: a text row far below it is not learning
the task.

Word 1-2-grams for texts written with spaces, character 1-3-grams for Chinese (../shared/data/README.md measures
0.804 on the Weibo text split with those).
"""

from __future__ import annotations

import torch

from cmc_fast.metrics import classification_metrics, roc_curve, selection_score

C_GRID = (0.1, 1.0, 10.0, 100.0)
MISSING = "scikit-learn is not installed (pip install 'cmc-fast[plots]')"


def mostly_cjk(texts: list[str], share: float = 0.3) -> bool:
    """At least ``share`` of the non-space characters are CJK ideographs (text that has no word boundaries)."""
    chars = [c for t in texts[:2000] for c in t if not c.isspace()]
    cjk = sum("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in chars)
    return bool(chars) and cjk >= share * len(chars)


def vectorizer_options(texts: list[str]) -> tuple[dict, str]:
    """TfidfVectorizer keyword arguments for ``texts`` and their description. N-grams seen in one fit text only
    are dropped (from 50 texts on): on the Weibo split they cost 4 points of test accuracy
    (bench/results/weibo-text-sweep-cpu.md)."""
    min_df = 2 if len(texts) >= 50 else 1
    if mostly_cjk(texts):
        return dict(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=min_df), "character 1-3-grams"
    return dict(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=min_df), "word 1-2-grams"


def _scores(model, features, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    p_fake = torch.from_numpy(model.predict_proba(features)[:, list(model.classes_).index(1)]).float()
    metrics = classification_metrics((p_fake > 0.5).long(), labels)
    metrics["auc"] = roc_curve(p_fake.tolist(), labels.tolist())[2]
    return metrics, p_fake


def tfidf_logistic_regression(fit_texts: list[str], val_texts: list[str], test_texts: list[str],
                              fit_labels: torch.Tensor, val_labels: torch.Tensor, test_labels: torch.Tensor, *,
                              select_metric: str = "accuracy", balanced: bool = False, seed: int = 0) -> dict | str:
    """The fitted baseline's validation and test metrics, its test scores (``p_fake``, ``pred``, ``label``) and a
    description of the model; or, when it cannot run, the reason in words. Among ``C_GRID`` the best validation
    score wins, ties going to the lower validation log-loss."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import log_loss
    except ImportError:
        return MISSING
    options, words = vectorizer_options(fit_texts)
    vectorizer = TfidfVectorizer(**options)
    try:
        x_fit = vectorizer.fit_transform(fit_texts)
    except ValueError as exc:  # e.g. no token in any fit text
        return f"TF-IDF found nothing to fit ({exc})"
    x_val, x_test = vectorizer.transform(val_texts), vectorizer.transform(test_texts)
    y_fit = fit_labels.cpu().numpy()
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000, solver="liblinear", random_state=seed,
                                   class_weight="balanced" if balanced else None).fit(x_fit, y_fit)
        val, p_val = _scores(model, x_val, val_labels.cpu())
        key = (selection_score(val, select_metric),
               -log_loss(val_labels.cpu().numpy(), p_val.double().numpy(), labels=[0, 1]))
        if best is None or key > best[0]:
            best = (key, c, model, val)
    (score, _), c, model, val = best
    test, p_test = _scores(model, x_test, test_labels.cpu())
    weighting = ", class-balanced" if balanced else ""
    return {"val": val, "val_score": score, "test": test, "C": c,
            "model": f"{words}, C={c:g} chosen on validation {select_metric}{weighting}",
            "scores": {"p_fake": p_test, "pred": (p_test > 0.5).long(), "label": test_labels.cpu()}}
