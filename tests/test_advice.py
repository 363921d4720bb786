"""Right advice and exits: a run's variants named when one is missing, predict's exit when no image could be used,
the cmc row's whole-pipeline time, evaluate's figures and times, run files as the umask allows, text-only data
named before image weights, help with descriptions and defaults, curves named by variant."""

import json
import os

import matplotlib.figure
import pytest
from tiny import TINY

from cmc_fast.cli import main
from cmc_fast.report import plot_history


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("advice")
    old = os.umask(0o022)
    try:
        assert main(["train", *TINY, "--variant", "finetune-t,cmc", "--epochs", "2", "--data-root",
                     str(base / "data"), "--out", str(base / "run")]) == 0
    finally:
        os.umask(old)
    return base / "run"


def test_run_files_follow_the_umask(run):
    for path in (run / "metrics.json", run / "config.json", run / "report.md", run / "checkpoints" / "stage2.last.pt"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_the_cmc_row_counts_both_stages(run):
    metrics = json.loads((run / "metrics.json").read_text())
    timings = metrics["timings"]
    assert metrics["results"]["cmc"]["train_seconds"] == pytest.approx(
        timings["stage1"]["train_seconds"] + timings["stage2"]["train_seconds"])
    assert metrics["results"]["finetune-t"]["train_seconds"] == pytest.approx(timings["finetune-t"]["train_seconds"])


def test_a_variant_the_run_lacks_is_refused_with_the_variants_it_has(run, tmp_path, capsys):
    posts = tmp_path / "posts.jsonl"
    posts.write_text(json.dumps({"text": "a post"}) + "\n")
    assert main(["predict", "--run", str(run), "--variant", "finetune-v", "--input", str(posts)]) == 2
    assert "The run's variants: finetune-t, cmc-t, cmc-v, cmc (pass --variant finetune-t)" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--variant", "cmc-shared", "--out", str(tmp_path / "b")]) == 2
    assert "The run's variants: finetune-t, cmc-t, cmc-v, cmc" in capsys.readouterr().err


def test_predict_fails_when_no_image_of_the_input_could_be_used(run, tmp_path, capsys):
    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(json.dumps({"text": f"post {i}", "image": f"missing/{i}.jpg"}) + "\n" for i in range(3)))
    assert main(["predict", "--run", str(run), "--variant", "cmc", "--input", str(posts), "--no-progress",
                 "--out", str(tmp_path / "p.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "3 scored (3 by the text branch alone)" in err and "cmc-fast: error: no image of" in err
    assert main(["predict", "--run", str(run), "--variant", "finetune-t", "--input", str(posts), "--no-progress",
                 "--out", str(tmp_path / "t.jsonl")]) == 0  # a text variant needs no image


def test_evaluate_redraws_the_figures_and_claims_no_training_time(run, capsys):
    figures = [run / name for name in ("curves.png", "confusion.png", "roc.png", "pr.png")]
    for path in figures:
        path.unlink()
    assert main(["evaluate", "--run", str(run)]) == 0
    assert not any(p.exists() for p in figures)  # evaluate alone writes evaluate.json only
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("cmc ", "finetune-t "))]
    assert rows and all(row[-1] == "-" for row in rows)
    assert json.loads((run / "evaluate.json").read_text())["timings"] == {}
    assert main(["evaluate", "--run", str(run), "--figures"]) == 0
    assert all(p.is_file() and p.stat().st_size > 0 for p in figures)


def test_curves_are_named_by_variant_with_the_chosen_epoch_marked(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    history = {"stage1": [{"epoch": e, "train_loss": 1.0 / e, "val_accuracy": {"text": a, "image": b}}
                          for e, a, b in ((1, 0.6, 0.7), (2, 0.8, 0.65), (3, 0.7, 0.6))]}
    chosen = {"stage1": {"cmc-t": (2, "text"), "cmc-v": (1, "image")}}
    assert plot_history(history, tmp_path / "curves.png", chosen)
    top, bottom = drawn[0].axes
    assert top.get_title() == "cmc-t, cmc-v\n(stage1)"
    labels = [t.get_text() for t in bottom.get_legend().get_texts()]
    assert labels == ["cmc-t", "cmc-t: chosen, epoch 2", "cmc-v", "cmc-v: chosen, epoch 1"]
    stars = [line for line in bottom.get_lines() if line.get_marker() == "*"]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in stars] == [([2], [0.8]), ([1], [0.7])]


def test_text_only_data_is_named_before_image_weights_are_asked_for(tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"text": f"post {i}", "label": i % 2, "split": "test" if i < 8 else
                                            "train"}) + "\n" for i in range(40)))
    assert main(["train", "--dataset", "manifest", "--data-root", str(manifest), "--text-model", "tiny",
                 "--image-model", "vgg19", "--image-weights", str(tmp_path / "missing.pth"),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "names an image" in err and "run --variant finetune-t" in err and "--image-weights" not in err
    assert not (tmp_path / "run").exists()


def test_every_subcommand_help_has_its_description_and_defaults(capsys):
    assert main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "re-score a finished run's checkpoints" in out and "--figures" in out and "the run folder" in out
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0)" in out and "--epochs EPOCHS stage-1" in out and "synthetic: 6" in out
    assert main(["predict", "--help"]) == 0
    assert "(default: 64)" in " ".join(capsys.readouterr().out.split())


def test_tsne_embeds_fine_tuned_text_and_image_together_though_their_widths_differ(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "finetune-t,finetune-v", "--tiny-text-dim", "32",  # image: 64 wide
                 "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    assert main(["tsne", "--run", str(out), "--max-points", "20"]) == 0
    panel = json.loads((out / "tsne.json").read_text())["panels"]["fine-tuned"]
    assert len(panel["shared"]) == 40 and all(len(p) == 2 for p in panel["shared"])
