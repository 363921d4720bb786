"""Bundles, run folders and predict, probed as an adversarial user would (issue 23): nothing a file says runs,
nothing of the user's is touched, nothing hangs, every bad file is one line naming it with exit 2.

A probe that would hang (a named pipe where a file is expected) runs under ``_bounded``: the call gets a thread
and 60 s; if it is still blocked then, the pipe is opened for writing to release it and the test fails."""

import json
import os
import shutil
import subprocess
import threading

import pytest
import torch
from cmc_fast.data_pipeline import token_cache
from cmc_fast.data_pipeline.text import VocabTokenizer, encode_texts
from safetensors.torch import load_file, save_file
from tiny import TINY, one_line_error

from cmc_fast.cli import main
from cmc_fast.config import Config
from cmc_fast.errors import UsageError
from cmc_fast.rundir import LOCK_NAME

TEXT_ONLY = [*TINY, "--variant", "finetune-t"]


def _bounded(call, fifos=(), seconds: float = 60.0):
    """``call()``'s result, failing the test (after releasing the pipes it blocks on) if it takes over ``seconds``."""
    box = {}

    def target():
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        for fifo in fifos:  # unblock a reader stuck in open() or read() of the pipe
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
        worker.join(10)
        pytest.fail(f"hung for {seconds} s on a named pipe")
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, bundle dir, posts file): one tiny text-only run and its bundle, copied by each test that changes
    them (``run_copy`` / ``bundle_copy``)."""
    base = tmp_path_factory.mktemp("safe-files")
    run, bundle = base / "run", base / "bundle"
    assert main(["train", *TEXT_ONLY, "--data-root", str(base / "data"), "--out", str(run)]) == 0
    assert main(["export", "--run", str(run), "--out", str(bundle), "--variant", "finetune-t"]) == 0
    posts = base / "posts.jsonl"
    posts.write_text("".join(json.dumps({"id": f"p{i}", "text": f"shocking secret news {i}"}) + "\n"
                             for i in range(5)))
    return run, bundle, posts


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained[0], dst, symlinks=True)
    return dst


@pytest.fixture
def bundle_copy(trained, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(trained[1], dst, symlinks=True)
    return dst


def _predict_bundle(bundle, posts, *extra):
    return main(["predict", "--bundle", str(bundle), "--input", str(posts), "--no-progress", *extra])


def _edit_json(path, **changes):
    doc = json.loads(path.read_text())
    target = doc["config"] if "config" in doc and set(changes) - {"variant", "format_version"} else doc
    target.update(changes)
    path.write_text(json.dumps(doc))


# ------------------------------------------------------------------------------------------ nothing runs
@pytest.mark.parametrize("with_code_file", [True, False])
def test_a_bundle_tokenizer_naming_custom_code_is_refused_and_nothing_runs(bundle_copy, trained, tmp_path, capsys,
                                                                            with_code_file):
    marker = tmp_path / "ran"
    tok = bundle_copy / "tokenizer"
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    if with_code_file:
        (tok / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass EvilTokenizer: pass\n")
    _edit_json(bundle_copy / "config.json", text_model="bert-base-uncased")
    (bundle_copy / "text_model").mkdir()
    capsys.readouterr()
    assert _bounded(lambda: _predict_bundle(bundle_copy, trained[2])) == 2
    line = one_line_error(capsys)
    assert str(tok) in line and ("holds no code" in line if with_code_file else "custom code" in line)
    assert not marker.exists()


def test_every_hugging_face_load_refuses_remote_code():
    """Every from_pretrained / from_config call in the package names trust_remote_code=False (a grep, so a new call
    without it fails here)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    calls = []
    for path in [*root.joinpath("cmc_fast").glob("*.py"), *root.joinpath("data_pipeline").rglob("*.py")]:
        text = path.read_text()
        for found in re.finditer(r"Auto\w+\.from_pretrained\((?:[^()]|\([^()]*\))*\)", text):
            calls.append((path.name, found.group(0)))
    assert len(calls) >= 3
    assert all("trust_remote_code=False" in call for _, call in calls), calls


# ------------------------------------------------------------------------------------------ bundle files
def _vocab(bundle):
    return bundle / "tokenizer" / "vocab.json"


@pytest.mark.parametrize("damage, reason", [
    ("fifo", "a named pipe"), ("dev_zero", "a character device"), ("missing", "cannot read"),
    ("loop", "cannot read"), ("pickle", "not valid UTF-8"), ("not_list", "expected a JSON list of strings"),
    ("no_specials", "lacks the special token"), ("deep", "nested too deeply"),
])
def test_a_tampered_bundle_vocabulary_is_one_line_within_bounded_time(bundle_copy, trained, capsys, damage, reason):
    vocab = _vocab(bundle_copy)
    vocab.unlink()
    if damage == "fifo":
        os.mkfifo(vocab)
    elif damage == "dev_zero":
        vocab.symlink_to("/dev/zero")
    elif damage == "loop":
        vocab.symlink_to(vocab)
    elif damage == "pickle":
        torch.save({"a": 1}, vocab)
    elif damage == "not_list":
        vocab.write_text('{"[PAD]": 0}')
    elif damage == "no_specials":
        vocab.write_text('["a", "b"]')
    elif damage == "deep":
        vocab.write_text("[" * 100_000 + "]" * 100_000)
    capsys.readouterr()
    assert _bounded(lambda: _predict_bundle(bundle_copy, trained[2]), fifos=[vocab]) == 2
    line = one_line_error(capsys)
    assert str(vocab) in line and reason in line, line


@pytest.mark.parametrize("key, value", [("image_size", [20000, 20000]), ("tiny_text_dim", 20000),
                                        ("max_len", 1_000_000_000), ("mm_dim", 1_000_000), ("nce_k", -3),
                                        ("image_model", "alexnet"), ("threads", 0)])
def test_a_bundle_config_out_of_bounds_is_refused_before_anything_is_built(bundle_copy, trained, capsys, monkeypatch,
                                                                          key, value):
    from cmc_fast import bundle as bundle_module

    def built(*args, **kwargs):
        raise AssertionError("a network was built from an unchecked config")

    monkeypatch.setattr(bundle_module, "build_parts", built)
    _edit_json(bundle_copy / "config.json", **{key: value})
    capsys.readouterr()
    assert _predict_bundle(bundle_copy, trained[2]) == 2
    line = one_line_error(capsys)
    assert str(bundle_copy / "config.json") in line and f"--{key.replace('_', '-')}" in line, line


def _rewrite_weights(bundle, change):
    path = bundle / "model.safetensors"
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path))


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


@pytest.mark.parametrize("damage, reason", [
    ("truncated", "truncated or damaged"), ("header_only", "exceeds the file"),
    ("huge_header", "exceeds the file"), ("wrong_shape", "has shape"), ("missing", "missing text."),
    ("extra", "unexpected block.x"), ("fifo", "a named pipe"),
])
def test_a_tampered_safetensors_file_is_one_line(bundle_copy, trained, capsys, damage, reason):
    path = bundle_copy / "model.safetensors"
    if damage == "truncated":
        _truncate(path, lambda n: n - 100)
    elif damage == "header_only":
        _truncate(path, lambda n: 200)
    elif damage == "huge_header":
        data = bytearray(path.read_bytes())
        data[:8] = (1 << 62).to_bytes(8, "little")
        path.write_bytes(bytes(data))
    elif damage == "wrong_shape":
        _rewrite_weights(bundle_copy, lambda w: w.update({k: torch.zeros(3, 3) for k in list(w)[:1]}))
    elif damage == "missing":
        _rewrite_weights(bundle_copy, lambda w: w.pop(sorted(w)[0]))
    elif damage == "extra":
        _rewrite_weights(bundle_copy, lambda w: w.update({"block.x": torch.zeros(2)}))
    elif damage == "fifo":
        path.unlink()
        os.mkfifo(path)
    capsys.readouterr()
    assert _bounded(lambda: _predict_bundle(bundle_copy, trained[2]), fifos=[path]) == 2
    line = one_line_error(capsys)
    assert str(path) in line and reason in line, line


# ------------------------------------------------------------------------------------------ predict --out
def test_predict_out_equal_to_its_input_is_refused_and_the_input_kept(trained, tmp_path, capsys):
    posts = tmp_path / "posts.jsonl"
    shutil.copy(trained[2], posts)
    before = posts.read_bytes()
    for out in (posts, tmp_path / "." / "posts.jsonl", tmp_path / "alias.jsonl"):
        if out.name == "alias.jsonl":
            out.symlink_to(posts)
        capsys.readouterr()
        assert _predict_bundle(trained[1], posts, "--out", str(out)) == 2
        assert "which this command reads" in one_line_error(capsys)
        assert posts.read_bytes() == before


def test_predict_out_naming_a_file_of_its_model_is_refused(run_copy, trained, capsys):
    target = run_copy / "checkpoints" / "finetune-t.best-text.pt"
    before = target.read_bytes()
    assert main(["predict", "--run", str(run_copy), "--variant", "finetune-t", "--input", str(trained[2]),
                 "--out", str(target)]) == 2
    assert "which this command reads" in one_line_error(capsys) and target.read_bytes() == before


@pytest.mark.parametrize("where, reason", [("folder", "is a folder"), ("under_file", "is not a folder")])
def test_predict_out_naming_a_folder_or_a_path_under_a_file_is_one_line(trained, tmp_path, capsys, where, reason):
    out = tmp_path if where == "folder" else trained[2] / "out.jsonl"
    assert _predict_bundle(trained[1], trained[2], "--out", str(out)) == 2
    assert reason in one_line_error(capsys)


def test_predict_out_held_by_another_predict_is_refused(trained, tmp_path, capsys):
    from cmc_fast.data_pipeline import safe_io  # new in this change: the old code fails here

    out = tmp_path / "scores.jsonl"
    with safe_io.replacing_output(out, "--out") as held:
        held.write("theirs\n")
        capsys.readouterr()
        assert _predict_bundle(trained[1], trained[2], "--out", str(out)) == 2
        assert "being written by another cmc-fast process" in one_line_error(capsys)
    assert out.read_text() == "theirs\n"  # the holder's output, whole
    assert _predict_bundle(trained[1], trained[2], "--out", str(out)) == 0  # released: the next one runs
    assert len(out.read_text().splitlines()) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.jsonl"]  # no lock or temporary left behind


def test_a_failed_predict_leaves_its_out_as_it_was(bundle_copy, trained, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    out.write_text("yesterday's scores\n")
    _vocab(bundle_copy).write_text("[]")
    assert _predict_bundle(bundle_copy, trained[2], "--out", str(out)) == 2
    assert out.read_text() == "yesterday's scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "scores.jsonl"]


def test_predict_out_replaces_a_symlink_without_writing_through_it(trained, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    out = tmp_path / "scores.jsonl"
    out.symlink_to(victim)
    assert _predict_bundle(trained[1], trained[2], "--out", str(out)) == 0
    assert victim.read_text() == "mine\n" and not out.is_symlink() and len(out.read_text().splitlines()) == 5


# ------------------------------------------------------------------------------------------ run folders
def _set_run_config(run, **changes):
    path = run / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_evaluate_never_writes_into_the_data_root_its_config_names(run_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("CMC_FAST_CACHE", str(tmp_path / "cache"))
    users = tmp_path / "my photos"
    (users / "images").mkdir(parents=True)
    (users / "images" / "train_000000.jpg").write_bytes(b"my holiday")
    before = _tree(users)
    _set_run_config(run_copy, data_root=str(users))
    assert main(["evaluate", "--run", str(run_copy)]) == 0
    assert _tree(users) == before
    assert (tmp_path / "cache" / "synthetic").is_dir()  # regenerated where the tool keeps its own data


def test_evaluate_never_follows_a_symlinked_log(run_copy, tmp_path, capsys):
    elsewhere = tmp_path / "someone-elses.log"
    elsewhere.write_text("theirs\n")
    (run_copy / "log.txt").unlink()
    (run_copy / "log.txt").symlink_to(elsewhere)
    assert main(["evaluate", "--run", str(run_copy)]) == 2
    assert "is a symbolic link" in one_line_error(capsys)
    assert elsewhere.read_text() == "theirs\n"


def test_cleanup_removes_only_the_tools_own_temporaries(run_copy, tmp_path):
    elsewhere = tmp_path / "uploads"
    shutil.move(run_copy / "checkpoints", elsewhere)
    (run_copy / "checkpoints").symlink_to(elsewhere)
    users = [run_copy / "my notes.tmp", run_copy / ".config.json.abc123.tmp", elsewhere / "upload.tmp"]
    for path in users:
        path.write_text("keep me")
    child = subprocess.Popen(["true"])  # a PID that is gone: the writer of a temporary left behind
    child.wait()
    ours = run_copy / f".metrics.json.cmc-fast-{child.pid}.k2j4.tmp"
    ours.write_text("half")
    assert main(["evaluate", "--run", str(run_copy)]) == 0
    assert all(p.read_text() == "keep me" for p in users) and not ours.exists()


@pytest.mark.parametrize("lock, reason", [
    ("fifo", "lock file"), ("dev_zero", "lock file"), ('{"pid": 1180591620717411303424, "host": "%s"}', "lock file"),
    ('{"pid": 2147483648, "host": "%s"}', "lock file"), ("[" * 50_000, "lock file")])
def test_a_hostile_lock_file_is_one_line_within_bounded_time(run_copy, capsys, lock, reason):
    import socket

    path = run_copy / LOCK_NAME
    if lock == "fifo":
        os.mkfifo(path)
    elif lock == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.write_text(lock.replace("%s", socket.gethostname()))
    assert _bounded(lambda: main(["evaluate", "--run", str(run_copy)]), fifos=[path]) == 2
    assert reason in one_line_error(capsys)


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_named_pipe_for_a_checkpoint_is_refused_without_hanging(run_copy, trained, capsys, command):
    path = run_copy / "checkpoints" / "finetune-t.best-text.pt"
    path.unlink()
    os.mkfifo(path)
    argv = (["evaluate", "--run", str(run_copy)] if command == "evaluate" else
            ["predict", "--run", str(run_copy), "--variant", "finetune-t", "--input", str(trained[2])])
    assert _bounded(lambda: main(argv), fifos=[path]) == 2
    line = one_line_error(capsys)
    assert str(path) in line and "a named pipe" in line
    assert not (run_copy / LOCK_NAME).exists()  # released with the error


def test_a_named_pipe_as_log_is_refused_without_hanging(run_copy, capsys):
    (run_copy / "log.txt").unlink()
    os.mkfifo(run_copy / "log.txt")
    assert _bounded(lambda: main(["evaluate", "--run", str(run_copy)]), fifos=[run_copy / "log.txt"]) == 2
    assert "a named pipe" in one_line_error(capsys)


def test_a_named_pipe_as_run_config_is_refused_without_hanging(run_copy, capsys):
    (run_copy / "config.json").unlink()
    os.mkfifo(run_copy / "config.json")
    assert _bounded(lambda: main(["evaluate", "--run", str(run_copy)]), fifos=[run_copy / "config.json"]) == 2
    assert "a named pipe" in one_line_error(capsys)


def test_a_named_pipe_in_the_token_cache_is_recomputed_without_hanging(tmp_path):
    tok = VocabTokenizer.build(["alpha beta gamma", "beta delta"])
    texts = ["alpha beta", "gamma delta epsilon"]
    entry = token_cache.cache_path(texts, tok, 8, tmp_path)
    os.mkfifo(entry)
    ids, mask = _bounded(lambda: token_cache.cached_encode(texts, tok, 8, tmp_path), fifos=[entry])
    want_ids, want_mask = encode_texts(texts, tok, 8)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("key, value, flag", [("image_size", [20000, 20000], "--image-size"),
                                              ("tiny_text_dim", 20000, "--tiny-text-dim"),
                                              ("max_len", 10**9, "--max-len"), ("mm_dim", 10**6, "--mm-dim"),
                                              ("nce_k", 0, "--nce-k")])
def test_a_loaded_config_is_validated_like_a_typed_one(key, value, flag):
    with pytest.raises(UsageError, match=f"run.json: {flag}"):
        Config.from_dict({"dataset": "synthetic", key: value}, source="run.json")


def test_a_run_config_out_of_bounds_is_refused_by_evaluate(run_copy, capsys):
    _set_run_config(run_copy, image_size=[20000, 20000])
    assert main(["evaluate", "--run", str(run_copy)]) == 2
    assert "--image-size" in one_line_error(capsys)


@pytest.mark.parametrize("argv, flag", [(["--image-size", "20000,20000"], "--image-size"),
                                        (["--tiny-text-dim", "20000"], "--tiny-text-dim"),
                                        (["--threads", "10000"], "--threads")])
def test_train_refuses_sizes_beyond_the_machine(tmp_path, capsys, argv, flag):
    assert main(["train", *TEXT_ONLY, *argv, "--out", str(tmp_path / "run")]) == 2
    assert flag in one_line_error(capsys)
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_saved_thread_count_above_this_machines_cores_is_lowered_not_refused():
    cfg = Config.from_dict({"dataset": "synthetic", "threads": 10_000})
    assert 1 <= cfg.threads <= os.cpu_count()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_data_root_that_is_a_pipe_or_device_is_one_line(tmp_path, capsys, kind):
    root = tmp_path / "root"
    if kind == "fifo":
        os.mkfifo(root)
    else:
        root.symlink_to("/dev/zero")
    argv = ["train", *TEXT_ONLY, "--dataset", "manifest", "--data-root", str(root), "--out", str(tmp_path / "r")]
    assert _bounded(lambda: main(argv), fifos=[root]) == 2
    assert "--data-root" in one_line_error(capsys)


# ------------------------------------------------------------------------------------------ the reader
def test_safe_io_reads_regular_files_only_within_their_bound(tmp_path):
    from cmc_fast.data_pipeline import safe_io  # new in this change: the old code fails here

    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert safe_io.read_json(good) == {"a": [1, 2]}
    with pytest.raises(safe_io.FileRefused, match="over the byte limit of 4"):
        safe_io.read_json(good, limit=4)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, reason in ((fifo, "a named pipe"), ("/dev/zero", "a character device"), (tmp_path, "a directory"),
                         (tmp_path / "none", "FileNotFoundError")):
        with pytest.raises(safe_io.FileRefused, match=reason):
            _bounded(lambda p=path: safe_io.read_bytes(p, 1 << 20), fifos=[fifo])
    huge = tmp_path / "huge.json"
    huge.write_text("1" * 5000)
    with pytest.raises(safe_io.FileRefused, match=f"{huge}: invalid JSON"):
        safe_io.read_json(huge)


def test_safe_io_appends_never_through_a_link(tmp_path):
    from cmc_fast.data_pipeline import safe_io  # new in this change: the old code fails here

    target = tmp_path / "target"
    target.write_text("x")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(safe_io.FileRefused, match="symbolic link"):
        safe_io.open_append(tmp_path / "link")
    with safe_io.open_append(tmp_path / "log") as f:
        f.write("line\n")
    assert (tmp_path / "log").read_text() == "line\n" and target.read_text() == "x"


# ------------------------------------------------------------------------------------------ malformed lines
def _hostile_lines(image=None):
    good = {"text": "shocking secret news", "label": 1}
    lines = [json.dumps({"id": "first", **good}),
             "[" * 100_000 + "]" * 100_000,  # nested past the parser's recursion limit
             '{"id": ' + "7" * 5000 + ', "text": "x", "label": 1}',  # an integer of 5000 digits
             '{"id": "\\ud800", "text": "lone surrogate", "label": 0}',
             json.dumps({"id": "last", **good, "label": 0})]
    return "\n".join(lines) + "\n"


def test_predict_skips_hostile_lines_by_number_and_scores_the_rest(trained, tmp_path, capsys):
    posts = tmp_path / "posts.jsonl"
    posts.write_text(_hostile_lines())
    out = tmp_path / "scores.jsonl"
    assert _predict_bundle(trained[1], posts, "--out", str(out)) == 1  # 1: some lines skipped
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert all(f"posts.jsonl:{n}: skipped" in err for n in (2, 3, 4)), err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["first", "last"]


def test_predict_reads_a_csv_field_over_the_default_limit(trained, tmp_path):
    import csv

    raised = csv.field_size_limit(128 << 10)  # as in a fresh process (the dataset readers raise it when imported)
    try:
        _predict_big_csv_field(trained, tmp_path)
    finally:
        csv.field_size_limit(raised)


def _predict_big_csv_field(trained, tmp_path):
    posts = tmp_path / "posts.csv"
    posts.write_text("id,text\nbig," + "news " * 40_000 + "\nsmall,real news\n")  # a 200 KB field
    out = tmp_path / "scores.jsonl"
    assert _predict_bundle(trained[1], posts, "--out", str(out)) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["big", "small"]


def test_train_skips_hostile_manifest_lines_and_writes_its_report(tmp_path, capsys):
    rows = [json.dumps({"id": f"p{i}", "text": f"{'shocking secret' if i % 2 else 'official report'} {i}",
                        "label": i % 2, "split": "test" if i % 5 == 0 else "train"}) for i in range(60)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(_hostile_lines() + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", *TEXT_ONLY, "--dataset", "manifest", "--data-root", str(manifest), "--out", str(out),
                 "--val-split", "random"]) == 0
    skipped = json.loads((out / "skipped.json").read_text())
    # line 3 (a 5000-digit id) is a usable post: numbers are kept as written, never converted
    assert sorted(s["source"].rsplit(":", 1)[1] for s in skipped) == ["2", "4"]


@pytest.mark.parametrize("value", ["1e-400", "-0", "１", "١", "0.5", "true", " 1.00"])
def test_labels_are_parsed_strictly(value):
    from cmc_fast.data_pipeline.readers import parse_label

    assert parse_label(value) is None


def test_json_number_labels_are_read_as_written(tmp_path):
    from cmc_fast.data_pipeline.registry import load_dataset

    rows = ['{"id": "a", "text": "t", "label": 1e-400}', '{"id": "b", "text": "t", "label": -0}',
            '{"id": "c", "text": "t", "label": 1.0}', '{"id": "d", "text": "t", "label": 0}']
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    ds = load_dataset("manifest", str(tmp_path / "m.jsonl"))
    assert [(r.id, r.label) for r in ds.train] == [("c", 1), ("d", 0)]
    assert sorted(s.id for s in ds.skipped) == ["a", "b"]


@pytest.mark.parametrize("image", ["../outside.jpg", "/etc/shadow", "img/../../outside.jpg"])
def test_manifest_images_outside_its_folder_are_refused_unless_allowed(tmp_path, monkeypatch, image):
    from cmc_fast.data_pipeline.registry import load_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "m.jsonl").write_text(json.dumps({"id": "a", "text": "t", "image": image, "label": 1}) + "\n"
                                    + json.dumps({"id": "b", "text": "t", "image": "img/ok.jpg", "label": 0}) + "\n")
    ds = load_dataset("manifest", str(folder / "m.jsonl"))
    assert [r.id for r in ds.train] == ["b"] and "outside the manifest's folder" in ds.skipped[0].reason
    monkeypatch.setenv("CMC_FAST_IMAGES_ANYWHERE", "1")
    assert [r.id for r in load_dataset("manifest", str(folder / "m.jsonl")).train] == ["a", "b"]



def test_train_on_a_manifest_all_of_whose_images_leave_its_folder_says_why_nothing_is_left(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"id": f"p{i}", "text": "t", "image": f"/elsewhere/{i}.jpg", "label": i % 2, "split": split}
            for i, split in enumerate(["train"] * 4 + ["test"] * 2)]
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", *TINY, "--dataset", "manifest", "--data-root", str(folder / "m.jsonl"),
                 "--out", str(tmp_path / "run")]) == 2
    line = one_line_error(capsys)
    assert "no training posts" in line and "all 6 were skipped" in line and "CMC_FAST_IMAGES_ANYWHERE=1" in line
    assert not (tmp_path / "run").exists()

def test_predict_refuses_an_image_outside_the_input_folder(trained, tmp_path, capsys):
    posts = tmp_path / "in" / "posts.jsonl"
    posts.parent.mkdir()
    posts.write_text(json.dumps({"id": "x", "text": "news", "image": "/etc/shadow"}) + "\n")
    assert _predict_bundle(trained[1], posts) == 1
    assert "'/etc/shadow' leaves the manifest's folder" in capsys.readouterr().err


def test_a_named_pipe_for_the_last_checkpoint_is_refused_by_resume_without_hanging(run_copy, capsys):
    path = run_copy / "checkpoints" / "finetune-t.last.pt"
    path.unlink()
    os.mkfifo(path)
    assert _bounded(lambda: main(["train", "--resume", str(run_copy)]), fifos=[path]) == 2
    line = one_line_error(capsys)
    assert str(path) in line and "a named pipe" in line
    assert not (run_copy / LOCK_NAME).exists()  # the run is not left locked


def test_a_line_over_the_limit_is_skipped_unread_in_manifests_and_predict(trained, tmp_path, monkeypatch, capsys):
    from cmc_fast.data_pipeline import safe_io
    from cmc_fast.data_pipeline.registry import load_dataset

    monkeypatch.setattr(safe_io, "LINE_LIMIT", 1000)
    monkeypatch.setattr("cmc_fast.predict.MAX_LINE_BYTES", 1000)
    long_line = json.dumps({"id": "long", "text": "news " * 1000, "label": 1})
    rows = [json.dumps({"id": "a", "text": "short", "label": 0}), long_line,
            json.dumps({"id": "b", "text": "short", "label": 1})]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    ds = load_dataset("manifest", str(manifest))
    assert [r.id for r in ds.train] == ["a", "b"]
    assert [(s.id, s.reason) for s in ds.skipped] == [("m.jsonl:2", "line too long: over 1000 bytes")]
    out = tmp_path / "scores.jsonl"
    assert _predict_bundle(trained[1], manifest, "--out", str(out)) == 1
    assert "m.jsonl:2: skipped: line over 1000 bytes" in capsys.readouterr().err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]
