"""Recipes per encoder kind, the flags that override them, class weights, the selection metric, minimum steps,
early stopping and the TF-IDF + logistic-regression baseline row."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY

from cmc_fast import loop
from cmc_fast.cli import build_parser, config_from_args, main
from cmc_fast.errors import UsageError
from cmc_fast.recipes import IMAGE_RECIPES, NGRAM_SGD_MIN_POSTS, TEXT_RECIPES, configure
from cmc_fast.stages import FinetuneStage, class_weight, planned_epochs
from cmc_fast.trainer import BASELINE_ROW

MINILM = "/models/all-MiniLM-L6-v2"  # a local directory name: a pretrained transformer (nothing is loaded here)


def _cli(*argv: str):
    return config_from_args(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("argv, text_kind", [
    (["--text-model", "ngram"], "ngram"),
    (["--text-model", "tiny"], "tiny"),
    (["--text-model", "tiny", "--text-pretrain-epochs", "3"], "tiny+mlm"),
    (["--text-model", MINILM], "pretrained"),
])
def test_the_recipe_of_the_text_encoder_kind_is_chosen_by_default(argv, text_kind):
    cfg = _cli("--dataset", "fakenewsnet", "--image-weights", "none", *argv)
    _, described = configure("fakenewsnet", {"image_weights": "none", **_pairs(argv)})
    assert described["text_kind"] == text_kind and described["image_kind"] == "cnn-scratch"
    for key, value in {**TEXT_RECIPES[text_kind], **IMAGE_RECIPES["cnn-scratch"]}.items():
        assert getattr(cfg, key) == value, key
    # the dataset preset's bert-base-uncased learning rate (the Config default) is gone
    assert cfg.text_lr != 2e-5 or text_kind == "pretrained"


def _pairs(argv: list[str]) -> dict:
    out = {}
    for flag, value in zip(argv[::2], argv[1::2]):
        key = flag[2:].replace("-", "_")
        out[key] = int(value) if key == "text_pretrain_epochs" else value
    return out


def test_recipes_differ_where_the_encoders_need_it():
    assert TEXT_RECIPES["ngram"]["text_lr"] >= 100 * TEXT_RECIPES["pretrained"]["text_lr"]
    assert TEXT_RECIPES["tiny"]["text_lr"] >= 10 * TEXT_RECIPES["pretrained"]["text_lr"]
    assert IMAGE_RECIPES["cnn-scratch"]["image_lr"] > IMAGE_RECIPES["cnn-pretrained"]["image_lr"]
    assert _cli("--dataset", "weibo").image_lr == IMAGE_RECIPES["cnn-pretrained"]["image_lr"]
    assert _cli("--dataset", "weibo", "--image-model", "tiny").image_lr == IMAGE_RECIPES["cnn-scratch"]["image_lr"]


def test_flags_and_config_files_override_the_recipe(tmp_path):
    cfg = _cli("--dataset", "fakenewsnet", "--text-model", "ngram", "--text-lr", "0.5", "--min-steps", "7")
    assert (cfg.text_lr, cfg.min_steps, cfg.epochs) == (0.5, 7, TEXT_RECIPES["ngram"]["epochs"])
    # epochs typed are the epochs that run: the recipe's minimum steps no longer raise them
    assert (_cli("--dataset", "manifest", "--text-model", "tiny", "--epochs", "2").min_steps,
            _cli("--dataset", "manifest", "--text-model", "tiny").min_steps) == (0, TEXT_RECIPES["tiny"]["min_steps"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 2, "text_lr": 0.25}))
    cfg = _cli("--dataset", "fakenewsnet", "--text-model", "ngram", "--config", str(path), "--text-lr", "0.125")
    assert (cfg.epochs, cfg.text_lr) == (2, 0.125)  # the file over the recipe, the flag over the file
    none = _cli("--dataset", "fakenewsnet", "--text-model", "ngram", "--recipe", "none")
    assert (none.text_lr, none.min_steps, none.epochs, none.max_len) == (2e-5, 0, 30, 512)


def test_a_preset_tuned_for_its_own_encoder_keeps_its_values():
    synthetic = _cli()  # the synthetic preset's tiny models: its own sizes, so the default run stays short
    assert (synthetic.text_lr, synthetic.epochs, synthetic.min_steps) == (1e-3, 6, 0)
    bert = _cli("--dataset", "fakenewsnet")  # the authors' BERT keeps the preset's length
    assert bert.max_len == 512 and bert.text_lr == TEXT_RECIPES["pretrained"]["text_lr"]
    assert _cli("--dataset", "fakenewsnet", "--text-model", MINILM).max_len == TEXT_RECIPES["pretrained"]["max_len"]
    assert _cli("--text-model", "ngram").text_lr == TEXT_RECIPES["ngram"]["text_lr"]  # another encoder: the recipe


def test_the_model_card_command_reproduces_a_recipe_run():
    import dataclasses
    import shlex

    from cmc_fast.export import train_command

    cfg, _ = configure("politifact", {"text_model": "ngram", "text_lr": 0.02})
    cfg = dataclasses.replace(cfg, out=None).validate()
    command = train_command(cfg)
    assert "--text-lr 0.02" in command and "--min-steps" not in command, command
    back = config_from_args(build_parser().parse_args(shlex.split(command)[1:]))
    for f in dataclasses.fields(cfg):
        if f.name not in ("progress", "out"):
            assert getattr(back, f.name) == getattr(cfg, f.name), f.name


def test_min_steps_raise_the_epochs():
    assert planned_epochs(3, n_fit=170, batch_size=32, min_steps=150) == 30  # 5 steps an epoch
    assert planned_epochs(8, n_fit=6800, batch_size=32, min_steps=300) == 8
    assert planned_epochs(1, n_fit=10, batch_size=32, min_steps=4) == 4  # one (short) batch an epoch
    assert planned_epochs(2, n_fit=100, batch_size=10, min_steps=0) == 2


def _epochs_by_counting(epochs: int, n_fit: int, batch_size: int, min_steps: int, max_epochs: int) -> int:
    """The planned epochs counted pass by pass: add passes of max(1, n // batch) steps until min_steps are
    reached or the cap is, never below ``epochs``."""
    done, steps = 0, 0
    while steps < min_steps and (not max_epochs or done < max_epochs):
        done, steps = done + 1, steps + max(1, n_fit // batch_size)
    return max(epochs, done)


def test_the_epoch_cap_bounds_what_min_steps_add_on_small_data():
    gen = torch.Generator().manual_seed(26)
    for _ in range(300):
        epochs, n_fit, batch, min_steps, cap = (int(torch.randint(lo, hi, (1,), generator=gen))
                                                for lo, hi in ((1, 12), (1, 9000), (1, 65), (0, 600), (0, 30)))
        assert planned_epochs(epochs, n_fit, batch, min_steps, cap) == _epochs_by_counting(
            epochs, n_fit, batch, min_steps, cap), (epochs, n_fit, batch, min_steps, cap)
    # PolitiFact's 172 fit posts: the tiny recipe's minimum steps stop at its cap; Weibo's 6778 reach them in
    # the recipe's own epochs
    tiny = TEXT_RECIPES["tiny"]
    small = planned_epochs(tiny["epochs"], 172, 32, tiny["min_steps"], tiny["max_epochs"])
    assert small == tiny["max_epochs"] < planned_epochs(tiny["epochs"], 172, 32, tiny["min_steps"])
    assert planned_epochs(tiny["epochs"], 6778, 32, tiny["min_steps"], tiny["max_epochs"]) == tiny["epochs"]


@pytest.mark.parametrize("text_model", ["ngram", "tiny", MINILM])
def test_the_data_size_cap_comes_with_the_recipe_and_yields_to_flags(text_model):
    kind = "pretrained" if text_model == MINILM else text_model
    recipe = TEXT_RECIPES[kind]
    assert _cli("--dataset", "fakenewsnet", "--text-model", text_model).max_epochs == recipe.get("max_epochs", 0)
    # the epochs or the minimum steps you type are what runs: the recipe's cap does not cut them
    assert _cli("--dataset", "fakenewsnet", "--text-model", text_model, "--epochs", "40").max_epochs == 0
    typed = _cli("--dataset", "fakenewsnet", "--text-model", text_model, "--min-steps", "500")
    assert (typed.min_steps, typed.max_epochs) == (500, 0)
    both = _cli("--dataset", "fakenewsnet", "--text-model", text_model, "--min-steps", "500", "--max-epochs", "3")
    assert (both.min_steps, both.max_epochs) == (500, 3)
    assert _cli("--dataset", "fakenewsnet", "--text-model", text_model, "--recipe", "none").max_epochs == 0


def test_the_synthetic_default_keeps_its_epochs_under_the_cap():
    synthetic = _cli()
    # its preset's own minimum steps (none) leave the cap nothing to bound: 6 epochs of 22 steps, as before
    assert planned_epochs(synthetic.epochs, 720, synthetic.batch_size, synthetic.min_steps,
                          synthetic.max_epochs) == synthetic.epochs == 6


def test_the_epoch_cap_stops_a_run_short_of_its_minimum_steps(tmp_path):
    out = tmp_path / "run"
    # 86 fit posts at batch 16 are 5 steps an epoch: 40 steps would need 8 epochs, the cap allows 2
    assert main(["train", *TINY, "--variant", "finetune-t", "--epochs", "1", "--min-steps", "40", "--max-epochs",
                 "2", "--no-baseline", "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]["finetune-t"]] == [1, 2]
    assert metrics["timings"]["finetune-t"]["steps"] == 10


def test_class_weights_balance_the_fit_split():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    weight = class_weight("balanced", labels)
    assert weight.tolist() == pytest.approx([8 / 12, 8 / 4])
    assert torch.equal(class_weight("auto", labels), weight)  # 25% fake: imbalanced
    assert class_weight("none", labels) is None
    assert class_weight("auto", torch.tensor([0, 1, 0, 1, 1])) is None  # 40% or more: left unweighted
    # the weighted loss a stage trains on, against the mean of per-post losses weighted by hand (float64)
    stage = FinetuneStage.__new__(FinetuneStage)
    stage.train_split = type("Split", (), {"labels": labels})()
    stage.class_weight = weight
    rows = torch.tensor([0, 6, 7, 1, 2])
    logits = torch.randn(5, 2)  # the logits of those rows
    per_post = -F.log_softmax(logits.double(), 1)[torch.arange(5), labels[rows]]
    w = weight.double()[labels[rows]]
    assert float(stage.cross_entropy(logits, rows)) == pytest.approx(float((w * per_post).sum() / w.sum()), rel=1e-6)
    stage.class_weight = None
    assert float(stage.cross_entropy(logits, rows)) == pytest.approx(float(per_post.mean()), rel=1e-6)


def _scripted_validation(monkeypatch, scripted: list[dict]):
    """FinetuneStage's validation returns ``scripted[epoch]`` for its head (test scoring stays real)."""
    real = FinetuneStage.evaluate
    calls = []

    def evaluate(self, split, *, keep_scores=False):
        out = real(self, split, keep_scores=keep_scores)
        if split is self.val_split:
            out = {h: {**m, **scripted[min(len(calls), len(scripted) - 1)]} for h, m in out.items()}
            calls.append(1)
        return out

    monkeypatch.setattr(FinetuneStage, "evaluate", evaluate)
    return calls


@pytest.mark.parametrize("metric, chosen", [("accuracy", 1), ("macro-f1", 2), ("auc", 3)])
def test_the_selection_metric_picks_the_checkpoint(tmp_path, monkeypatch, metric, chosen):
    _scripted_validation(monkeypatch, [dict(accuracy=0.9, macro_f1=0.5, auc=0.6),
                                       dict(accuracy=0.8, macro_f1=0.8, auc=0.7),
                                       dict(accuracy=0.7, macro_f1=0.7, auc=0.9)])
    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "finetune-t", "--epochs", "3", "--select-metric", metric,
                 "--select-min-val", "0", "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    row = metrics["results"]["finetune-t"]
    assert row["val_score"] == {metric: [0.9, 0.8, 0.9][chosen - 1]}
    assert row["val_accuracy"] == [0.9, 0.8, 0.7][chosen - 1]  # the accuracy of the epoch chosen
    record = torch.load(out / "checkpoints" / "finetune-t.last.pt", weights_only=True)
    assert record["best_epoch"] == {"text": chosen}
    assert f"validation split by {metric}" in (out / "report.md").read_text()


def test_patience_stops_a_stage_and_a_stopped_stage_is_finished(tmp_path, monkeypatch):
    calls = _scripted_validation(monkeypatch, [dict(accuracy=0.9), dict(accuracy=0.8), dict(accuracy=0.8),
                                               dict(accuracy=0.95)])
    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "finetune-t", "--epochs", "6", "--patience", "2",
                 "--select-min-val", "0", "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    row = json.loads((out / "metrics.json").read_text())["results"]["finetune-t"]
    assert (row["epochs_run"], row["stopped_early"], len(calls)) == (3, True, 3)  # best at 1, none better at 2, 3
    assert main(["evaluate", "--run", str(out)]) == 0  # finished: evaluate does not ask to resume it
    assert main(["train", "--resume", str(out)]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]["finetune-t"]) == 3


def test_a_validation_split_under_select_min_val_keeps_the_last_epoch(tmp_path, monkeypatch):
    scripted = [dict(accuracy=0.9, auc=0.9), dict(accuracy=0.6, auc=0.5), dict(accuracy=0.7, auc=0.6)]
    calls = _scripted_validation(monkeypatch, scripted)
    out = tmp_path / "last"
    # the default --select-min-val (100) is far above the tiny run's validation split; --patience 1 would stop a
    # choosing stage after epoch 2
    assert main(["train", *TINY, "--variant", "finetune-t", "--epochs", "3", "--patience", "1",
                 "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    row = json.loads((out / "metrics.json").read_text())["results"]["finetune-t"]
    n_val = row["selection"]["val_posts"]
    assert 0 < n_val < 100 and row["selection"]["rule"] == "last"
    assert (row["epoch"], row["epochs_run"], row["stopped_early"], len(calls)) == (3, 3, False, 3)
    assert row["val_accuracy"] == 0.7 and row["val_score"] == {"accuracy": 0.7}  # the last epoch's, not the best
    last = torch.load(out / "checkpoints" / "finetune-t.last.pt", weights_only=True)
    kept = torch.load(out / "checkpoints" / "finetune-t.best-text.pt", weights_only=True)
    assert last["best_epoch"] == {"text": 3}
    assert last["modules"] and kept["modules"].keys() == last["modules"].keys()
    for name, weights in last["modules"].items():
        assert all(torch.equal(weights[k], kept["modules"][name][k]) for k in weights), name
    assert f"under --select-min-val 100 posts for finetune-t ({n_val} posts)" in (out / "report.md").read_text()

    # a split of exactly --select-min-val posts is large enough: the stage chooses on it, and patience acts
    calls.clear()
    out = tmp_path / "chosen"
    assert main(["train", *TINY, "--variant", "finetune-t", "--epochs", "3", "--patience", "1", "--select-min-val",
                 str(n_val), "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    row = json.loads((out / "metrics.json").read_text())["results"]["finetune-t"]
    assert row["selection"] == {"rule": "accuracy", "val_posts": n_val}
    assert (row["epoch"], row["epochs_run"], row["stopped_early"], row["val_accuracy"]) == (1, 2, True, 0.9)
    assert "validation split by accuracy" in (out / "report.md").read_text()


def test_min_steps_train_more_epochs(tmp_path):
    out = tmp_path / "run"
    # 96 train posts, 10% validation: 86 fit posts at batch 16 are 5 steps an epoch; 12 steps need 3 epochs
    assert main(["train", *TINY, "--variant", "finetune-t", "--epochs", "1", "--min-steps", "12", "--no-baseline",
                 "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]["finetune-t"]] == [1, 2, 3]
    assert metrics["timings"]["finetune-t"]["steps"] == 15
    assert set(metrics["results"]) == {"finetune-t"}  # --no-baseline


def test_the_collapse_note_names_an_imbalanced_split():
    from cmc_fast.trainer import Trainer

    stage = type("S", (), {})()
    stage.train_split = type("Split", (), {"labels": torch.tensor([0] * 9 + [1] * 2)})()
    stage.class_weight = None
    cause = Trainer._collapse_cause(None, stage)
    assert "imbalanced, 2 fake / 9 real" in cause and "--class-weights balanced" in cause and "macro-f1" in cause
    stage.train_split.labels = torch.tensor([0, 1] * 5)
    assert "imbalanced" not in Trainer._collapse_cause(None, stage)


# ---------------------------------------------------------------------------------------------- baseline
def test_the_baseline_matches_scikit_learn_fitted_by_hand():
    pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from cmc_fast.baseline import tfidf_logistic_regression

    gen = torch.Generator().manual_seed(11)
    words = [f"w{i}" for i in range(60)]

    def texts(n):
        labels = torch.randint(0, 2, (n,), generator=gen)
        out = []
        for y in labels.tolist():
            pick = torch.randint(0, 40, (12,), generator=gen).tolist()
            out.append(" ".join(words[i + 20 * y] for i in pick))  # the labels share words 20-39
        return out, labels

    (fit, y_fit), (val, y_val), (test, y_test) = texts(80), texts(30), texts(40)
    out = tfidf_logistic_regression(fit, val, test, y_fit, y_val, y_test)
    vec = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit(fit)
    model = LogisticRegression(C=out["C"], solver="liblinear", max_iter=2000).fit(vec.transform(fit), y_fit.numpy())
    p = model.predict_proba(vec.transform(test))[:, 1]
    assert out["scores"]["p_fake"].tolist() == pytest.approx(p.tolist(), abs=1e-6)
    assert out["test"]["accuracy"] == pytest.approx(float(((torch.from_numpy(p) > 0.5).long() == y_test)
                                                          .double().mean()))
    assert out["test"]["accuracy"] > 0.8  # the toy task is learnable from the words


def test_chinese_text_uses_character_ngrams():
    from cmc_fast.baseline import vectorizer_options

    assert vectorizer_options(["今天的新闻是假的", "转发这条微博"])[0]["analyzer"] == "char"
    assert vectorizer_options(["breaking news today", "a real article"])[0]["analyzer"] == "word"


def test_the_baseline_row_is_scored_on_the_same_posts_as_the_others(tmp_path):
    pytest.importorskip("sklearn")
    import os

    from cmc_fast.data_pipeline.synthetic import generate

    data = generate(96, 40, seed=0, root=tmp_path / "data")
    for r in data.test[:5]:  # undecodable images: the image rows (and so every row) score 35 test posts
        path = r.image_paths[0]
        with open(path, "r+b") as f:
            f.write(b"\0" * os.path.getsize(path))
    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "finetune-t,finetune-v", "--data-root", str(tmp_path / "data"),
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    base, text = metrics["results"][BASELINE_ROW], metrics["results"]["finetune-t"]
    assert base["test"]["n"] == text["test"]["n"] == 35 and base["posts"] == text["posts"]
    assert base["stage"] == "baseline" and "word 1-2-grams" in base["model"]
    report = (out / "report.md").read_text()
    assert f"| {BASELINE_ROW} |" in report and "Recipe: text tiny, image cnn-scratch" in report
    assert "recipe" in metrics and metrics["select_metric"] == "accuracy"


def test_without_scikit_learn_one_line_says_why_the_row_is_missing(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "finetune-t", "--data-root", str(tmp_path / "data"),
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert BASELINE_ROW not in metrics["results"]
    missing = [n for n in metrics["notes"] if "row missing" in n]
    assert len(missing) == 1 and "scikit-learn is not installed" in missing[0]
    assert "scikit-learn is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, kind", [
    ([], torch.optim.Adam), (["--text-optimizer", "sgd", "--text-lr", "5"], torch.optim.SGD),
    (["--text-weight-decay", "0.1"], torch.optim.AdamW)])
def test_the_text_optimiser_follows_the_recipe_and_the_flags(argv, kind):
    from cmc_fast.models import ModelBuilder

    cfg = _cli("--dataset", "fakenewsnet", "--text-model", "ngram", "--text-momentum", "0.5", *argv)
    builder = ModelBuilder(cfg, torch.device("cpu"), None, tokenizer=None, fit_text=None, val_text=None)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, 3))
    opt = builder.text_optimizer([weight])
    assert type(opt) is kind and opt.param_groups[0]["lr"] == cfg.text_lr
    # two steps of the same gradient, against the update rules written out: SGD with momentum m moves by lr * g,
    # then lr * (1 + m) * g (PyTorch's heavy ball); Adam's first steps move each weight by lr * sign(g), AdamW's
    # after shrinking it by (1 - lr * decay)
    grad, start = torch.randn(5, 3), weight.detach().clone()
    for _ in range(2):
        weight.grad = grad.clone()
        opt.step()
    moved = start - weight.detach()
    if kind is torch.optim.SGD:
        assert cfg.text_lr == 5.0
        torch.testing.assert_close(moved, cfg.text_lr * (2 + 0.5) * grad)
    else:
        assert cfg.text_optimizer == "adam" and cfg.text_lr == TEXT_RECIPES["ngram"]["text_lr"]
        shrink = 1 - cfg.text_lr * cfg.text_weight_decay
        expected = start * (1 - shrink**2) + cfg.text_lr * grad.sign() * (1 + shrink)
        torch.testing.assert_close(moved, expected, rtol=1e-3, atol=1e-6)


def test_another_text_optimiser_needs_its_own_learning_rate():
    with pytest.raises(UsageError, match="--text-optimizer sgd: the tiny recipe's text_lr .* give --text-lr"):
        _cli("--dataset", "fakenewsnet", "--text-model", "tiny", "--text-optimizer", "sgd")
    for model in ("ngram", "tiny"):
        cfg = _cli("--dataset", "fakenewsnet", "--text-model", model, "--text-optimizer", "adam")
        assert cfg.text_lr == TEXT_RECIPES[model]["text_lr"]
    # the n-gram bag has a recipe per optimiser: the one typed picks it
    cfg = _cli("--dataset", "fakenewsnet", "--text-model", "ngram", "--text-optimizer", "sgd")
    assert {k: getattr(cfg, k) for k in TEXT_RECIPES["ngram-sgd"]} == TEXT_RECIPES["ngram-sgd"]


@pytest.mark.parametrize("train_posts, typed, kind", [
    (None, None, "ngram"), (NGRAM_SGD_MIN_POSTS - 1, None, "ngram"), (NGRAM_SGD_MIN_POSTS, None, "ngram-sgd"),
    (10 * NGRAM_SGD_MIN_POSTS, "adam", "ngram"), (10, "sgd", "ngram-sgd")])
def test_the_ngram_recipe_follows_the_training_split_size_unless_an_optimiser_is_typed(train_posts, typed, kind):
    user = {"text_model": "ngram", "image_weights": "none", **({"text_optimizer": typed} if typed else {})}
    cfg, described = configure("weibo", user, train_posts)
    assert described["text_kind"] == kind and described["train_posts"] == train_posts
    expected = {"text_optimizer": "adam", **TEXT_RECIPES[kind]}
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.min_steps == 0) == (kind == "ngram-sgd")  # the SGD recipe counts its passes, not its steps


@pytest.mark.parametrize("threshold, optimizer", [(50, "sgd"), (1000, "adam")])
def test_a_run_chooses_the_ngram_recipe_once_its_data_is_read(tmp_path, monkeypatch, threshold, optimizer):
    from cmc_fast import recipes

    monkeypatch.setattr(recipes, "NGRAM_SGD_MIN_POSTS", threshold)  # the tiny run has 96 training posts
    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "finetune-t", "--text-model", "ngram", "--epochs", "1",
                 "--no-baseline", "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["text_optimizer"] == optimizer
    assert saved["text_lr"] == TEXT_RECIPES["ngram-sgd" if optimizer == "sgd" else "ngram"]["text_lr"]
    relation = ">=" if optimizer == "sgd" else "<"
    assert f"(96 training posts, {relation} {threshold})" in (out / "report.md").read_text()
    assert main(["train", "--resume", str(out)]) == 0  # a resumed run keeps what was chosen, and its report says so
    assert json.loads((out / "config.json").read_text())["text_optimizer"] == optimizer
    kind = "ngram-sgd" if optimizer == "sgd" else "ngram"
    assert f"Recipe: text {kind}, image cnn-scratch; values as saved" in (out / "report.md").read_text()


def test_lr_warmup_follows_the_flag():
    f = loop.lr_factor("linear", 100, 0.2)
    assert [f(s) for s in (0, 19)] == pytest.approx([1 / 20, 1.0]) and f(20) == pytest.approx(1.0)


def test_a_saved_config_without_class_weights_takes_the_default(tmp_path):
    from tiny import tiny_config

    from cmc_fast.config import Config

    saved = json.loads(tiny_config(tmp_path).to_json())
    assert Config.from_dict(saved).class_weights == "auto"
    saved["class_weights"] = "none"
    assert Config.from_dict(saved).class_weights == "none"
    del saved["class_weights"]
    assert Config.from_dict(saved).class_weights == "auto"
