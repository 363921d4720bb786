"""A finished run is never overwritten, and a command that fails leaves no run folder behind."""

from pathlib import Path

from tiny import TINY

from cmc_fast.cli import main

TEXT_ONLY = [*TINY, "--variant", "finetune-t"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cmc-fast: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_out_holding_a_run_is_refused_and_overwrite_clears_the_whole_folder(tmp_path, capsys):
    out, data = tmp_path / "run", str(tmp_path / "data")
    assert main(["train", *TEXT_ONLY, "--data-root", data, "--out", str(out)]) == 0
    (out / "tsne.png").write_bytes(b"an older run's figure")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert main(["train", *TEXT_ONLY, "--epochs", "2", "--data-root", data, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert f"--out {out}: holds a finished run" in line
    assert f"cmc-fast train --resume {out}" in line and "new --out" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing changed

    assert main(["train", *TEXT_ONLY, "--epochs", "2", "--data-root", data, "--out", str(out), "--overwrite"]) == 0
    assert "--overwrite: deleted the" in capsys.readouterr().err
    assert not (out / "tsne.png").exists()  # nothing of the old run is left beside the new one
    assert '"epochs": 2' in (out / "config.json").read_text()


def test_overwrite_beside_resume_is_refused(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "run"), "--overwrite"]) == 2
    assert "--overwrite" in _error_line(capsys)


def test_a_failed_command_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default runs/<dataset>-<time> would go
    assert main(["train", *TEXT_ONLY, "--dataset", "weibo", "--text-model", "tiny", "--data-root",
                 str(tmp_path / "nowhere")]) == 2
    assert "--data-root" in _error_line(capsys)
    assert main(["train", *TINY, "--variant", "finetune-v", "--image-model", "resnet50", "--image-weights",
                 str(tmp_path / "missing.pth"), "--data-root", str(tmp_path / "data")]) == 2
    assert "--image-weights" in _error_line(capsys)
    assert main(["train", *TEXT_ONLY, "--text-model", str(tmp_path / "no-model"),
                 "--data-root", str(tmp_path / "data")]) == 2
    _error_line(capsys)
    assert not Path("runs").exists()
