"""The console tells the story off a terminal: one line per epoch, a reader's warnings once in our words, an
unknown model name answered with the choices."""

import sys
import warnings

import pytest
from cmc_fast.data_pipeline.readers import DatasetWarning
from tiny import TINY

from cmc_fast.cli import _dataset_warnings_in_our_words, main


@pytest.mark.parametrize("select_min_val", ["0", "100"])
def test_every_epoch_is_one_line_on_stderr_when_it_is_not_a_terminal(tmp_path, capsys, select_min_val):
    assert not sys.stderr.isatty()
    assert main(["train", *TINY, "--variant", "finetune-t", "--epochs", "3", "--data-root", str(tmp_path / "d"),
                 "--select-min-val", select_min_val, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if " epoch " in line]
    assert [line.split(":")[1].strip() for line in lines] == [f"finetune-t epoch {e}/3" for e in (1, 2, 3)]
    choosing = select_min_val == "0"  # the tiny run's ~10 validation posts are under 100: the last epoch is kept
    for line in lines:
        assert "loss " in line and "text val acc " in line and (("(best " in line and " @ " in line) == choosing)
    assert any("under --select-min-val 100: each head keeps the stage's last epoch" in line
               for line in err) != choosing
    assert "ETA" in lines[0] and "ETA" in lines[1] and "ETA" not in lines[2]  # nothing left after the last
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "finetune-t epoch 3/3: loss" in log


def test_a_dataset_warning_is_said_once_in_our_words(capsys):
    with _dataset_warnings_in_our_words():
        for _ in range(3):
            warnings.warn("weibo: 9 of 10 posts have no local image", DatasetWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "cmc-fast: warning: weibo: 9 of 10 posts have no local image\n"  # no class name, no source line


def test_an_unknown_text_model_is_answered_with_the_choices(tmp_path, capsys):
    assert main(["train", *TINY, "--variant", "finetune-t", "--text-model", "tny",
                 "--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--text-model tny: unknown model (did you mean tiny?)" in err and "ngram" in err
    assert "huggingface.co" not in err and "connect" not in err
    assert not (tmp_path / "run").exists()
