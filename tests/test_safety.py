"""Nothing runs that a file smuggles in; nothing of the user's is overwritten; every mistake is one line, exit 2.

Each planted checkpoint pickles a call that would create a marker file: loading it with ``weights_only=False``
would run the call (the test fails on the marker), ``weights_only=True`` refuses it (our one-line error, naming
the file)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from tiny import TINY, one_line_error

from cmc_fast import checkpoint_manager
from cmc_fast import trainer as trainer_mod
from cmc_fast.cli import main
from cmc_fast.errors import UsageError
from cmc_fast.rundir import LOCK_NAME, claim

TEXT_ONLY = [*TINY, "--variant", "finetune-t"]


class _Planted:
    """Unpickling this calls os.system(command): what a malicious ``.pt`` in a shared run folder does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant(path, marker) -> None:
    torch.save({"modules": _Planted(f"touch {marker}"), "epoch": 1}, path)


def _kill_after_first_epoch(monkeypatch, at_last_checkpoint: int = 1):
    """Interrupt the run (as Ctrl-C would) right after its ``at_last_checkpoint``-th last checkpoint is written."""
    real_save, calls = checkpoint_manager.save_checkpoint, {"n": 0}

    def killed(state, path):
        real_save(state, path)
        if str(path).endswith(".last.pt"):
            calls["n"] += 1
            if calls["n"] == at_last_checkpoint:
                raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", killed)
    return real_save


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TEXT_ONLY, "--epochs", "3", "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------ planted pickles
def test_a_planted_best_checkpoint_does_not_run_under_evaluate(finished_run, tmp_path, capsys):
    target, marker = finished_run / "checkpoints" / "finetune-t.best-text.pt", tmp_path / "ran"
    _plant(target, marker)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(finished_run)]) == 2
    assert not marker.exists()
    line = one_line_error(capsys)
    assert str(target) in line and "could run code" in line
    assert line.removeprefix("cmc-fast: error: ") in (finished_run / "log.txt").read_text()


def _killed_run(tmp_path, monkeypatch, extra=()):
    broken = tmp_path / "broken"
    real_save = _kill_after_first_epoch(monkeypatch)
    args = [*TEXT_ONLY, "--epochs", "2", "--data-root", str(tmp_path / "data"), *extra, "--out", str(broken)]
    assert main(["train", *args]) == 130
    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", real_save)
    return broken


def test_a_planted_last_checkpoint_does_not_run_under_resume(tmp_path, monkeypatch, capsys):
    broken = _killed_run(tmp_path, monkeypatch)
    target, marker = broken / "checkpoints" / "finetune-t.last.pt", tmp_path / "ran"
    _plant(target, marker)
    capsys.readouterr()
    assert main(["train", "--resume", str(broken)]) == 2
    assert not marker.exists()
    assert str(target) in one_line_error(capsys)


def test_a_planted_masked_lm_cache_does_not_run_under_resume(tmp_path, monkeypatch, capsys):
    broken = _killed_run(tmp_path, monkeypatch, extra=["--text-pretrain-epochs", "1"])
    target, marker = broken / "checkpoints" / "text-mlm.pt", tmp_path / "ran"
    assert target.exists()
    _plant(target, marker)
    capsys.readouterr()
    assert main(["train", "--resume", str(broken)]) == 2
    assert not marker.exists()
    assert str(target) in one_line_error(capsys)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(finished_run, capsys, damage):
    target = finished_run / "checkpoints" / "finetune-t.best-text.pt"
    data = target.read_bytes()
    target.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    capsys.readouterr()
    assert main(["evaluate", "--run", str(finished_run)]) == 2
    assert str(target) in one_line_error(capsys)


def test_the_checkpoints_the_trainer_writes_load_pickle_free(finished_run):
    for path in (finished_run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert isinstance(state, dict) and "modules" in state


def test_junk_image_weights_are_our_one_line_error(tmp_path, capsys):
    junk = tmp_path / "weights.pth"
    junk.write_bytes(os.urandom(4096))
    planted, marker = tmp_path / "planted.pth", tmp_path / "ran"
    _plant(planted, marker)
    for path in (junk, planted):
        assert main(["train", *TINY, "--variant", "finetune-v", "--image-model", "resnet50", "--image-weights",
                     str(path), "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "r")]) == 2
        line = one_line_error(capsys)
        assert "--image-weights" in line and str(path) in line and "weights_only=False" not in line
    assert not marker.exists()


# ------------------------------------------------------------------------------------ the run folder
def test_a_held_run_folder_refuses_a_second_run(tmp_path):
    with claim(tmp_path / "run"), pytest.raises(UsageError) as caught, claim(tmp_path / "run"):
        pass
    assert f"PID {os.getpid()} on {socket.gethostname()}" in str(caught.value)
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released by its holder


def test_a_second_train_on_a_folder_in_use_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}
        (out / LOCK_NAME).write_text(json.dumps(lock))
        args = ["train", *TEXT_ONLY, "--data-root", str(tmp_path / "data"), "--out", str(out)]
        assert main(args) == 2
        line = one_line_error(capsys)
        assert f"PID {holder.pid} on {socket.gethostname()}" in line
        assert not (out / "config.json").exists() and not (out / "log.txt").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the holder died: its lock is taken over, and said so
    assert f"took over the lock of PID {holder.pid}" in capsys.readouterr().err
    assert f"took over the lock of PID {holder.pid}" in (out / "log.txt").read_text()
    assert not (out / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_never_presumed_dead(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(UsageError, match="PID 1 on elsewhere.example"), claim(out):
        pass


def test_a_folder_that_is_not_a_run_is_refused_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "report.md").write_text("my report")
    assert main(["train", *TEXT_ONLY, "--data-root", str(tmp_path / "data"), "--out", str(mine)]) == 2
    assert "is not a cmc-fast run" in one_line_error(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "report.md"]
    assert (mine / "config.json").read_text() == '{"my": "settings"}'


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stray_temporaries_are_removed_on_resume(tmp_path, monkeypatch, capsys):
    broken = _killed_run(tmp_path, monkeypatch)
    gone = _dead_pid()
    strays = [broken / f".metrics.json.cmc-fast-{gone}.x1.tmp",
              broken / "checkpoints" / f".finetune-t.last.pt.cmc-fast-{gone}.x2.tmp"]
    for path in strays:
        path.write_bytes(b"half")
    assert main(["train", "--resume", str(broken)]) == 0
    assert not any(p.exists() for p in strays)
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ one error path
def _config(tmp_path, values: dict) -> str:
    path = tmp_path / f"c-{next(iter(values))}.json"
    path.write_text(json.dumps(values))
    return str(path)


@pytest.mark.parametrize("case", ["out-is-a-file", "out-under-a-file", "text-lr", "seed", "config-str-int",
                                  "config-int-pair", "config-float-int", "evaluate-bad-json", "resume-bad-json",
                                  "resume-config-types"])
def test_user_mistakes_are_one_line_exit_2(tmp_path, capsys, case):
    data = ["--data-root", str(tmp_path / "data")]
    afile = tmp_path / "afile"
    afile.write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"dataset": "synthetic", "epochs": ')
    argv, needle = {
        "out-is-a-file": (["train", *TEXT_ONLY, *data, "--out", str(afile)], "--out"),
        "out-under-a-file": (["train", *TEXT_ONLY, *data, "--out", str(afile / "run")], "--out"),
        "text-lr": (["train", *TEXT_ONLY, *data, "--text-lr", "-1"], "--text-lr"),
        "seed": (["train", *TEXT_ONLY, *data, "--seed", "-1"], "--seed"),
        "config-str-int": (["train", "--config", _config(tmp_path, {"epochs": "3"})], "'epochs'"),
        "config-int-pair": (["train", "--config", _config(tmp_path, {"image_size": 64})], "'image_size'"),
        "config-float-int": (["train", "--config", _config(tmp_path, {"batch_size": 1.5})], "'batch_size'"),
        "evaluate-bad-json": (["evaluate", "--run", str(run)], "invalid JSON"),
        "resume-bad-json": (["train", "--resume", str(run)], "invalid JSON"),
        "resume-config-types": (["train", "--resume", str(run)], "'seed'"),
    }[case]
    if case == "resume-config-types":
        (run / "config.json").write_text('{"dataset": "synthetic", "seed": "7"}')
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert needle in line
    if case.startswith("config"):
        assert "c-" in line and ".json" in line
    if case.endswith("bad-json") or case == "resume-config-types":
        assert str(run / "config.json") in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_folder_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["train", *TEXT_ONLY, "--data-root", str(tmp_path / "data"), "--out", str(ro / "run")]) == 2
        assert "--out" in one_line_error(capsys)
    finally:
        ro.chmod(0o700)


def test_a_diverged_loss_is_one_line_and_in_the_log(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TEXT_ONLY, "--text-lr", "1e30", "--data-root", str(tmp_path / "data"),
                 "--out", str(out)]) == 2
    line = one_line_error(capsys).removeprefix("cmc-fast: error: ")
    assert "loss became" in line
    assert f"ERROR {line}" in (out / "log.txt").read_text()


def test_a_genuine_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(trainer_mod.Trainer, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", *TEXT_ONLY, "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ splits, collapse, resume
def _manifest(tmp_path, posts: list[dict]) -> str:
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in posts) + "\n")
    return str(path)


def test_an_empty_fit_split_is_caught_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TEXT_ONLY, "--synthetic-n", "40,20", "--val-fraction", "0.99", "--val-split", "random",
                 "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert "the fit split has no posts" in line and "--val-fraction 0.99 of 40 training posts" in line
    assert not list((out / "checkpoints").glob("*.pt"))


def test_a_grouped_split_that_leaves_no_validation_posts_says_why(tmp_path, capsys):
    story_a = "the dam upstream of the old city burst tonight and water is flooding every street near the river"
    story_b = "a new vaccine was approved after the trial showed strong protection for older adults this winter"
    posts = [{"text": f"{story_a} {i}", "label": 1} for i in range(5)]
    posts += [{"text": f"{story_b} {i}", "label": 0} for i in range(4)]
    posts += [{"text": "test post one about the weather", "label": 1, "split": "test"},
              {"text": "test post two about the market", "label": 0, "split": "test"}]
    assert main(["train", *TEXT_ONLY, "--dataset", "manifest", "--data-root", _manifest(tmp_path, posts),
                 "--out", str(tmp_path / "run")]) == 2
    line = one_line_error(capsys)
    assert "the val split has no posts" in line and "2 near-duplicate groups whole" in line


def test_image_variants_without_decodable_images_are_caught_before_training(tmp_path, capsys):
    posts = [{"text": f"post number {i} says something {i % 3}", "label": i % 2, "image": f"missing{i}.jpg"}
             for i in range(30)]
    posts += [{"text": f"test post {i}", "label": i % 2, "split": "test", "image": "gone.jpg"} for i in range(6)]
    assert main(["train", *TINY, "--variant", "finetune-t,cmc", "--dataset", "manifest", "--val-split", "random",
                 "--image-model", "tiny", "--image-weights", "none", "--data-root", _manifest(tmp_path, posts),
                 "--out", str(tmp_path / "run")]) == 2
    line = one_line_error(capsys)
    assert "--variant cmc:" in line and "the fit split has no posts with a decodable image" in line
    assert "36 posts have no decodable image" in line


def test_a_collapsed_model_is_noted_in_the_report_and_on_the_console(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TEXT_ONLY, "--epochs", "2", "--text-lr", "5", "--data-root", str(tmp_path / "data"),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "cmc-fast: warning: finetune-t" in err and "collapsed to one class" in err
    assert "collapsed to one class" in (out / "report.md").read_text()
    history = json.loads((out / "metrics.json").read_text())["history"]["finetune-t"]
    assert len({h["val_predicted_fake"]["text"] for h in history}) == 1


def test_a_healthy_model_gets_no_collapse_notice(finished_run):
    assert "collapsed" not in (finished_run / "report.md").read_text()


def test_resume_refuses_flags_it_would_ignore_and_applies_where_it_runs(tmp_path, monkeypatch, capsys):
    broken = _killed_run(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(["train", "--resume", str(broken), "--epochs", "5", "--seed", "7"]) == 2
    line = one_line_error(capsys)
    assert "--epochs, --seed" in line and "--out" in line
    assert main(["train", "--resume", str(broken), "--device", "cpu", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "--device cpu applied" in err and "--threads 1 applied" in err


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds a bare {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_resume_keeps_finished_stages_timings_in_standard_json(tmp_path, monkeypatch):
    real_save = _kill_after_first_epoch(monkeypatch, at_last_checkpoint=2)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "finetune-t,finetune-v", "--epochs", "2", "--data-root",
                 str(tmp_path / "data"), "--out", str(out)]) == 130
    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", real_save)
    assert main(["train", "--resume", str(out)]) == 0
    metrics = _strict_json(out / "metrics.json")
    for stage in ("finetune-t", "finetune-v"):
        assert metrics["timings"][stage]["train_seconds"] > 0 and metrics["timings"][stage]["steps"] > 0
        assert metrics["results"][stage]["train_seconds"] > 0


def test_json_is_written_without_bare_nan(tmp_path):
    from cmc_fast.checkpoint import write_json

    write_json({"t": float("nan"), "rows": [1.5, float("inf")], "n": 3}, tmp_path / "m.json")
    assert _strict_json(tmp_path / "m.json") == {"t": None, "rows": [1.5, None], "n": 3}


def test_evaluate_writes_nothing_but_its_own_outputs(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    assert config["device"] == "auto"

    def snapshot():
        return {p.relative_to(finished_run): (p.stat().st_mtime_ns, p.read_bytes()) for p in finished_run.rglob("*")
                if p.is_file() and p.name not in ("evaluate.json", "log.txt")}

    before = snapshot()
    assert main(["evaluate", "--run", str(finished_run), "--device", "cpu"]) == 0
    assert snapshot() == before
    assert (finished_run / "evaluate.json").exists()


def test_a_planted_text_model_bin_does_not_run(tmp_path, capsys):
    """A local Hugging Face directory is a file the user supplies too: its pytorch_model.bin loads pickle-free."""
    from transformers import BertConfig, BertModel, BertTokenizer

    model_dir, marker = tmp_path / "bert", tmp_path / "ran"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    BertTokenizer(str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    config = BertConfig(vocab_size=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=32)
    BertModel(config).save_pretrained(model_dir)
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    _plant(model_dir / "pytorch_model.bin", marker)
    assert main(["train", *TEXT_ONLY, "--text-model", str(model_dir), "--data-root", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run")]) == 2
    assert not marker.exists()
    line = one_line_error(capsys)
    assert "--text-model" in line and str(model_dir) in line and "could run code" in line


def test_two_real_runs_on_one_folder(tmp_path, capsys):
    """A second ``cmc-fast train`` while another process trains into the same --out is refused, naming it."""
    import time

    out = tmp_path / "run"
    args = [*TEXT_ONLY, "--epochs", "200", "--data-root", str(tmp_path / "data"), "--out", str(out)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.Popen([sys.executable, "-m", "cmc_fast", "train", *args], cwd=root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None and (out / LOCK_NAME).exists()
        assert main(["train", *args]) == 2
        assert f"in use by PID {first.pid} on {socket.gethostname()}" in one_line_error(capsys)
        assert json.loads((out / "config.json").read_text())["epochs"] == 200  # the first run's, untouched
    finally:
        first.kill()
        first.wait()
