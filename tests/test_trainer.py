"""The trainer end to end on a tiny synthetic configuration: the CLI, the run directory, resume, stage 2."""

import json
import os
import re

import pytest
import torch
from tiny import TINY, tiny_config

from cmc_fast import checkpoint_manager, loop
from cmc_fast.cli import main
from cmc_fast.config import Config
from cmc_fast.stages import FusionStage, MutualStage
from cmc_fast.trainer import BASELINE_ROW, Trainer


def test_cli_end_to_end_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--data-root", str(tmp_path / "data"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for variant in ("finetune-t", "finetune-v", "cmc-t", "cmc-v", "cmc-shared", "cmc"):
        assert variant in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"finetune-t", "finetune-v", "cmc-t", "cmc-v", "cmc-shared", "cmc", BASELINE_ROW}
    for r in metrics["results"].values():
        assert 0.0 <= r["test"]["accuracy"] <= 1.0 and r["test"]["n"] == 40
    report = (out / "report.md").read_text()
    assert "| cmc |" in report and "Fake F1" in report
    assert "cmc-shared loss: fused (the paper's CMC-shared baseline" in report
    assert "scored on the 40 test posts with an image (all of them)" in report
    assert re.search(r"- stage1: NCE loss form: (dense|gather) \(auto\) at B=\d+ d=\d+ K=\d+ N=\d+ fp32 bank on cpu: "
                     r"\d+ calls", report), report  # which form of the NCE loss ran (issue 21)
    assert json.loads((out / "config.json").read_text())["epochs"] == 1
    assert (out / "log.txt").stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [h["epoch"] for h in metrics["history"]["stage2"]] == [1, 2]
    assert (out / "checkpoints" / "stage1.best-text.pt").exists()
    for path in (out / "checkpoints").iterdir():  # everything the checkpoint manager saves loads without pickle
        state = torch.load(path, weights_only=True)
        assert isinstance(state, dict) and "modules" in state
    # evaluate re-scores the finished run to the same numbers
    assert main(["evaluate", "--run", str(out)]) == 0
    again = json.loads((out / "evaluate.json").read_text())["results"]
    for variant, r in metrics["results"].items():
        assert again[variant]["test"] == r["test"]


def test_resume_refuses_a_checkpoint_of_another_layout_in_one_line(tmp_path, monkeypatch, capsys):
    """A last checkpoint without a field resume needs (another version's layout) ends in one line naming the file
    and what to do, exit code 2, not a KeyError half-way through restoring the stage."""
    args = [*TINY, "--variant", "finetune-t", "--epochs", "2", "--data-root", str(tmp_path / "data")]
    real_save = checkpoint_manager.save_checkpoint

    def killed_after_first_epoch(state, path):
        real_save(state, path)
        if path.name == "finetune-t.last.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", killed_after_first_epoch)
    run = tmp_path / "run"
    assert main(["train", *args, "--out", str(run)]) == 130
    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", real_save)
    last = run / "checkpoints" / "finetune-t.last.pt"
    state = checkpoint_manager.load_checkpoint(last)
    del state["clock"]
    real_save(state, last)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert str(last) in err[-1] and "no clock" in err[-1] and "--overwrite" in err[-1]


@pytest.mark.parametrize("variant, epochs, killed_stage, extra", [
    ("finetune-t", "3", "finetune-t", []),
    ("finetune-t", "3", "finetune-t", ["--lr-schedule", "cosine", "--group-sampling", "1"]),
    ("cmc", "2", "stage1", []),
    ("cmc", "2", "stage2", []),
    ("cmc-shared", "2", "cmc-shared", []),
])
def test_resume_after_an_interrupted_run_matches_an_uninterrupted_one(tmp_path, monkeypatch, variant, epochs,
                                                                      killed_stage, extra):
    args = [*TINY, "--variant", variant, "--epochs", epochs, "--data-root", str(tmp_path / "data"), *extra]
    assert main(["train", *args, "--out", str(tmp_path / "straight")]) == 0

    real_save = checkpoint_manager.save_checkpoint

    def killed_after_first_epoch(state, path):  # after the last checkpoint, before the best one is renamed
        real_save(state, path)
        if path.name == f"{killed_stage}.last.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", killed_after_first_epoch)
    broken = tmp_path / "broken"
    assert main(["train", *args, "--out", str(broken)]) == 130
    assert not (broken / "metrics.json").exists()
    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", real_save)
    assert main(["train", "--resume", str(broken)]) == 0
    total = "2" if killed_stage == "stage2" else epochs
    assert f"{killed_stage}: resuming at epoch 2/{total}" in (broken / "log.txt").read_text()
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((broken / "metrics.json").read_text())
    assert resumed["results"].keys() == straight["results"].keys()
    for name, row in straight["results"].items():
        again = resumed["results"][name]
        assert again["test"] == row["test"] and again["val_accuracy"] == row["val_accuracy"], name
    assert resumed["history"] == straight["history"]
    for stage, timing in straight["timings"].items():  # timings survive the resume
        assert resumed["timings"][stage]["steps"] == timing["steps"]
        assert resumed["timings"][stage]["train_seconds"] > 0
    assert (broken / "report.md").exists()
    for path in (broken / "checkpoints").iterdir():  # everything saved loads without pickle
        torch.load(path, weights_only=True)


def test_stage2_leaves_the_frozen_encoders_bit_identical(tmp_path):
    tr = Trainer(tiny_config(tmp_path, variant="cmc"), tmp_path / "run")
    tr.setup()
    stage1 = tr.fit_and_score(MutualStage(tr.ctx, tr.mm_splits))
    text_net, image_net = stage1.text_net, stage1.image_net

    def states():
        return {**text_net.state_dict(prefix="t."), **image_net.state_dict(prefix="v.")}

    before = {k: v.clone() for k, v in states().items()}
    tr.fit_and_score(FusionStage(tr.ctx, tr.mm_splits, text_net, image_net))
    after = states()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert "cmc" in tr.results


def test_stage1_trains_both_networks_and_the_projections(tmp_path):
    tr = Trainer(tiny_config(tmp_path, variant="cmc-t,cmc-v"), tmp_path / "run")
    tr.setup()
    torch.manual_seed(0)
    fresh_t, fresh_v = tr.ctx.build.text_net(), tr.ctx.build.image_net()
    stage = tr.fit_and_score(MutualStage(tr.ctx, tr.mm_splits))
    state = torch.load(tmp_path / "run" / "checkpoints" / "stage1.last.pt", weights_only=True)
    dist = state["modules"]["distiller"]
    assert dist["z_v2t"] > 0 and dist["z_t2v"] > 0  # Z estimated once and saved with the checkpoint
    assert not torch.equal(stage.text_net.head.weight, fresh_t.head.weight)
    assert not torch.equal(stage.image_net.head.weight, fresh_v.head.weight)
    assert set(tr.results) == {"cmc-t", "cmc-v"}


@pytest.mark.parametrize("argv, needle", [
    (["train", "--dataset", "nope"], "--dataset"),
    (["train", "--variant", "cmc,bogus"], "--variant"),
    (["train", "--image-model", "alexnet"], "--image-model"),
    (["train", "--negatives", "hard"], "--negatives"),
    (["train", "--shared-loss", "distill"], "--shared-loss"),
    (["train", "--log-every", "0"], "--log-every"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--group-sampling", "1.5"], "--group-sampling"),
    (["train", "--val-split", "by-date"], "--val-split"),
    (["train", "--tiny-text-dropout", "1.5"], "--tiny-text-dropout"),
    (["train", "--threads", "0"], "--threads"),
    (["train", "--dataset", "weibo", "--text-model", "tiny", "--image-model", "tiny", "--image-weights", "none",
      "--data-root", "/definitely/not/here"], "/definitely/not/here"),
    (["train", "--text-model", "/no/such/checkpoint"], "--text-model"),
    (["train", "--config", "/no/such/config.json"], "--config"),
    (["evaluate", "--run", "/no/such/run"], "--run"),
    (["train", "--resume", "/no/such/run"], "--resume"),
])
def test_user_mistakes_exit_2_with_one_line(argv, needle, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and "Traceback" not in err


def test_config_file_with_an_unknown_key_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 2, "learning_rate": 1}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "valid keys" in err


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_warms_up_then_decays_to_zero(schedule):
    total = 200
    f = loop.lr_factor(schedule, total)
    warm = [f(s) for s in range(12)]  # 6% of 200 steps
    assert warm == sorted(warm) and warm[-1] == 1.0 and warm[0] == pytest.approx(1 / 12)
    decay = [f(s) for s in range(12, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:])) and decay[-1] == pytest.approx(0.0, abs=1e-12)
    mid = f(12 + (total - 12) // 2)
    assert mid == pytest.approx(0.5, abs=0.01)  # both are halfway down halfway through the decay
    assert loop.lr_factor("constant", total)(150) == 1.0
    # what an optimiser sees through LambdaLR, step by step
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    for step in range(1, 60):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * f(step))


def test_a_saved_config_without_val_split_takes_the_default(tmp_path):
    saved = json.loads(tiny_config(tmp_path, val_split="random").to_json())
    assert Config.from_dict(saved).val_split == "random"
    del saved["val_split"]
    assert Config.from_dict(saved).val_split == "grouped"


def test_every_row_is_scored_on_the_posts_with_an_image_and_all_posts_is_its_own_row(tmp_path):
    from cmc_fast.data_pipeline.synthetic import generate

    data = generate(96, 40, seed=0, root=tmp_path / "data")
    broken = [r.image_paths[0] for r in data.train[:4] + data.test[:5]]
    for path in broken:  # same size (kept by the generator), undecodable: kept for text, dropped for images
        with open(path, "r+b") as f:
            f.write(b"\0" * os.path.getsize(path))
    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "finetune-t,finetune-v", "--data-root", str(tmp_path / "data"),
                 "--out", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert set(results) == {"finetune-t", "finetune-v", "finetune-t (all posts)", BASELINE_ROW}
    assert results["finetune-t"]["test"]["n"] == results["finetune-v"]["test"]["n"] == 35
    assert results["finetune-t (all posts)"]["test"]["n"] == 40
    assert results["finetune-t"]["posts"] == "the 35 test posts with an image (of 40)"
    assert results["finetune-t (all posts)"]["posts"] == "all 40 test posts"
    report = (out / "report.md").read_text()
    assert "| finetune-t (all posts) |" in report
    assert f"- finetune-t, finetune-v, {BASELINE_ROW}: scored on the 35 test posts with an image (of 40)" in report
    assert "- finetune-t (all posts): scored on all 40 test posts" in report


def test_each_config_field_is_one_flag_with_its_choices():
    import dataclasses

    from cmc_fast.cli import build_parser
    from cmc_fast.config import config_flag

    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    by_dest = {}
    for action in train._actions:
        by_dest.setdefault(action.dest, []).append(action)
    for f in dataclasses.fields(Config):
        if not f.metadata["cli"]:
            assert f.name not in by_dest
            continue
        (action,) = by_dest[f.name]
        assert action.option_strings == [config_flag(f)]
        assert action.choices == f.metadata["choices"]


@pytest.mark.parametrize("argv, weights", [
    (["--image-model", "tiny"], None),
    (["--image-model", "tiny", "--image-weights", "none"], None),
    (["--image-model", "vgg19"], "imagenet"),
    (["--image-model", "tiny", "--image-weights", "imagenet"], "imagenet"),  # asked for: the build names the flag
])
def test_the_tiny_image_model_implies_no_pretrained_weights(argv, weights):
    from cmc_fast.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--dataset", "weibo", *argv])
    assert config_from_args(args).image_weights == weights


def test_flags_override_the_preset_only_when_given(tmp_path):
    from cmc_fast.cli import build_parser, config_from_args

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 4, "nce_k": 99}))
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(path), "--epochs", "5",
                                                      "--shared-loss", "fused+distill", "--amp", "--no-progress"]))
    assert (cfg.epochs, cfg.nce_k, cfg.shared_loss, cfg.amp, cfg.progress) == (5, 99, "fused+distill", True, False)
    assert cfg.batch_size == 32 and cfg.image_model == "tiny"  # the synthetic preset's
