"""`data check`: the image findings on files built in tmp_path, exit codes, JSON, and the real Weibo split."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cmc_fast.data_pipeline.check import add_arguments, check_dataset, main, run, sniff
from PIL import Image, ImageFile


def image_bytes(fmt: str, seed: int = 0, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_manifest(root, rows: list[dict]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


@pytest.fixture
def bad_images(tmp_path):
    """A manifest whose images are: fine, truncated, empty, PNG and GIF named .jpg, HTML named .jpg, missing."""
    img = tmp_path / "ds" / "img"
    img.mkdir(parents=True)
    good = image_bytes("JPEG", 1)
    files = {"good.jpg": good, "trunc.jpg": good[: len(good) // 2], "empty.jpg": b"", "png.jpg": image_bytes("PNG", 2),
             "gif.jpg": image_bytes("GIF", 3), "html.jpg": b"<html><body>404 Not Found</body></html>"}
    for name, data in files.items():
        (img / name).write_bytes(data)
    rows = [{"id": "g1", "text": "good fake", "image": "img/good.jpg", "label": 1},
            {"id": "g2", "text": "good real", "image": ["img/missing.jpg", "img/good.jpg"], "label": 0},
            {"id": "t1", "text": "", "image": "img/trunc.jpg", "label": 1},
            {"id": "e1", "text": "empty", "image": "img/empty.jpg", "label": 0},
            {"id": "p1", "text": "png", "image": "img/png.jpg", "label": 1, "split": "test"},
            {"id": "f1", "text": "gif", "image": "img/gif.jpg", "label": 0, "split": "test"},
            {"id": "h1", "text": "html", "image": "img/html.jpg", "label": 0, "split": "test"},
            {"id": "g1", "text": "duplicate id", "label": 1, "split": "test"},
            {"id": "x1", "text": "bad label", "label": "maybe"}]
    root = write_manifest(tmp_path / "ds", rows)
    return root, {k: str(img / k) for k in [*files, "missing.jpg"]}


def test_sniff():
    assert [sniff(image_bytes(f)[:16]) for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP")] == \
        ["JPEG", "PNG", "GIF", "WEBP", "BMP"]
    assert sniff(b"<html>") is None and sniff(b"") is None


def test_check_reports_every_bad_image_exactly(bad_images):
    root, p = bad_images
    rep = check_dataset("manifest", root)
    im = rep["images"]
    assert (im["referenced"], im["found"], im["missing"], im["empty"]) == (7, 6, 1, 1)
    assert im["missing_paths"] == [p["missing.jpg"]]
    assert im["empty_paths"] == [p["empty.jpg"]]
    unreadable = {u["path"]: u["error"] for u in im["unreadable_list"]}
    assert set(unreadable) == {p["trunc.jpg"], p["html.jpg"]}
    assert "truncated" in unreadable[p["trunc.jpg"]]
    assert "cannot identify image file" in unreadable[p["html.jpg"]]
    assert im["extension_mismatch_list"] == [
        {"path": p["png.jpg"], "extension": ".jpg", "format": "PNG"},
        {"path": p["gif.jpg"], "extension": ".jpg", "format": "GIF"},
        {"path": p["html.jpg"], "extension": ".jpg", "format": "unknown", "starts_with": repr(b"<html><b")},
    ]
    assert rep["splits"]["train"] == {"posts": 4, "fake": 2, "real": 2, "with_image": 4, "no_image": 0,
                                      "with_usable_image": 2, "with_usable_image_fake": 1,
                                      "with_usable_image_real": 1, "empty_text": 1}
    assert rep["splits"]["test"]["with_usable_image"] == 2  # the PNG and the GIF decode
    no_image = {d["id"]: d["reason"] for d in rep["posts_without_usable_image"]}
    assert no_image == {"t1": "no listed image is usable", "e1": "no listed image is usable",
                        "h1": "no listed image is usable", "g1": "no local image file"}
    assert rep["posts"] == {"parsed": 9, "kept": 8, "dropped": 1, "dropped_by_reason": {"label outside {0,1}": 1}}
    assert rep["dropped"] == [{"id": "x1", "reason": "label outside {0,1}: 'maybe' (expected 0/1 or fake/real; "
                                                    "1 = fake)", "source": os.path.join(root, "manifest.jsonl") + ":9"}]
    assert [d["id"] for d in rep["empty_texts"]] == ["t1"]
    assert list(rep["duplicate_ids"]) == ["g1"] and rep["ids_in_train_and_test"] == ["g1"]
    assert rep["usable"] and rep["usable_for"] == {"text": True, "image": True}


def test_truncated_jpeg_is_caught_even_by_a_lenient_decoder(bad_images, monkeypatch):
    root, p = bad_images
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    unreadable = {u["path"]: u["error"] for u in check_dataset("manifest", root)["images"]["unreadable_list"]}
    assert unreadable[p["trunc.jpg"]] == "truncated JPEG: no end-of-image marker in its last 1024 bytes"


def test_exit_codes_and_json(bad_images, tmp_path, capsys):
    root, _ = bad_images
    assert main(["--dataset", "manifest", "--data-root", root, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["usable"] and rep["images"]["unreadable"] == 2

    assert main(["--dataset", "manifest", "--data-root", root]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "dropped      1  label outside {0,1}" in out and "result: USABLE" in out

    one_class = write_manifest(tmp_path / "one", [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    assert main(["--dataset", "manifest", "--data-root", one_class, "--json", "--no-decode"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert problems[0] == "the train split has no real posts" and problems[1].startswith("no test split")

    nothing = write_manifest(tmp_path / "none", [{"text": "a", "label": 7}])
    assert main(["--dataset", "manifest", "--data-root", nothing]) == 1
    assert "no posts were kept" in capsys.readouterr().out

    text_only = write_manifest(tmp_path / "txt", [{"text": "a", "label": 1}, {"text": "b", "label": 0},
                                                  {"text": "c", "label": 0, "split": "test"}])
    assert main(["--dataset", "manifest", "--data-root", text_only]) == 0
    assert main(["--dataset", "manifest", "--data-root", text_only, "--require-images"]) == 1
    capsys.readouterr()

    assert main(["--dataset", "weibbo", "--data-root", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown dataset 'weibbo'; choose one of: fakenewsnet, gossipcop, manifest, politifact, synthetic" in err
    assert main(["--dataset", "weibo", "--data-root", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--dataset", "weibo", "--data-root", str(tmp_path)]) == 2
    assert "tweets not found" in capsys.readouterr().err
    assert main(["--dataset", "weibo"]) == 2
    assert "--data-root is required for weibo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--data-root", root])
    assert exc.value.code == 2


def test_add_arguments_works_as_a_subcommand(bad_images, capsys):
    root, _ = bad_images
    parser = argparse.ArgumentParser(prog="cmc-fast")
    data = parser.add_subparsers(dest="command").add_parser("data").add_subparsers(dest="action")
    add_arguments(data.add_parser("check"))
    args = parser.parse_args(["data", "check", "--dataset", "manifest", "--data-root", root, "--image-backend", "pil"])
    assert run(args) == 0
    assert "images: 7 referenced, 6 found, 1 missing, 1 empty, 2 unreadable" in capsys.readouterr().out


def test_module_entry_point(bad_images):
    root, _ = bad_images
    proc = subprocess.run([sys.executable, "-m", "cmc_fast.data_pipeline.check", "--dataset", "nope",
                           "--data-root", root], capture_output=True, text=True,
                          cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert proc.returncode == 2 and "unknown dataset 'nope'" in proc.stderr


@pytest.mark.realdata
def test_real_weibo_check(shared_data, capsys):
    assert main(["--dataset", "weibo", "--data-root", os.path.join(shared_data, "weibo"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["posts"] == {"parsed": 9527, "kept": 9527, "dropped": 0, "dropped_by_reason": {}}
    assert {s: (rep["splits"][s]["fake"], rep["splits"][s]["real"]) for s in ("train", "test")} == \
        {"train": (3748, 3783), "test": (1000, 996)}
    im = rep["images"]
    assert (im["referenced"], im["found"], im["missing"], im["empty"], im["unreadable"], im["extension_mismatch"]) \
        == (266, 266, 0, 0, 0, 0)
    assert (rep["splits"]["train"]["with_usable_image"], rep["splits"]["test"]["with_usable_image"]) == (164, 19)
    assert len(rep["posts_without_usable_image"]) == 9344
    assert len(rep["empty_texts"]) == 116 and rep["duplicate_ids"] == {}
    # one rumour reposted 348 times inside train; the published test split holds other stories
    assert rep["near_duplicates"]["largest_train_group"] == 348
    assert rep["near_duplicates"]["test_posts_with_near_copy_in_train"] == 0
    assert rep["usable_for"] == {"text": True, "image": True}
    assert rep["seconds"]["load"] >= 0  # reported; how fast it is belongs to bench/, not to a test


def test_near_copies_across_train_and_test_are_reported(tmp_path, capsys):
    story = "市民注意：明天起全市自来水停供三天，请大家提前储水，转发扩散让更多人知道"
    rows = [{"text": story, "label": 1}, {"text": "转发求证：" + story, "label": 1},
            {"text": "今天天气晴朗，气温二十度，适合出门散步和运动", "label": 0},
            {"text": story + " http://t.cn/abc", "label": 1, "split": "test"},
            {"text": "本市地铁三号线周末正常运营，请乘客合理安排出行", "label": 0, "split": "test"}]
    root = write_manifest(tmp_path / "leak", rows)
    assert main(["--dataset", "manifest", "--data-root", root, "--json", "--no-decode"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["near_duplicates"] == {"train_groups": 2, "train_posts_with_near_duplicates": 2,
                                      "largest_train_group": 2, "test_posts_with_near_copy_in_train": 1}
    assert "1 test posts have a near-copy in train (the test split partly measures memorisation)" in rep["warnings"]


def test_no_test_split_is_named_as_such_by_check_and_train(tmp_path, capsys):
    from cmc_fast.cli import main as cli_main

    img = tmp_path / "ds" / "a.jpg"
    img.parent.mkdir(parents=True)
    img.write_bytes(image_bytes("JPEG", 4))
    root = write_manifest(tmp_path / "ds", [{"id": f"p{i}", "text": f"post {i}", "image": "a.jpg", "label": i % 2}
                                            for i in range(12)])
    rep = check_dataset("manifest", root)
    assert not rep["usable"] and rep["problems"][0].startswith("no test split: all 12 posts are training posts")
    assert not any("image variants cannot train" in w for w in rep["warnings"] + rep["problems"])  # images are fine
    assert cli_main(["train", "--dataset", "manifest", "--data-root", root, "--text-model", "tiny",
                     "--image-model", "tiny", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no test split under" in err and '"split": "test"' in err and "test.jsonl" in err
    assert not (tmp_path / "run").exists()
