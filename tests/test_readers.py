"""Dataset readers: small layouts built in tmp_path with every kind of bad input, and the real files in
../shared/data (skipped where absent)."""

from __future__ import annotations

import io
import json
import os
import warnings

import pytest
from cmc_fast.data_pipeline.readers import DatasetWarning, drop_posts_without_images, parse_label
from cmc_fast.data_pipeline.records import Record, Skipped
from cmc_fast.data_pipeline.registry import DATASETS, load_dataset
from PIL import Image

META_TAIL = "null|null|null|1452440393000|true|122|15|56|null|0|null|null|null|微博 weibo.com"  # 14 fields
BOM = b"\xef\xbb\xbf"


def meta(pid: int | str) -> str:
    return f"{pid}|{META_TAIL}"


def jpeg(color=(200, 30, 30), size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def load_quiet(name: str, root, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        return load_dataset(name, str(root), **options)


def make_weibo(root, files: dict[str, bytes], images: dict[str, bytes] | None = None) -> str:
    tweets = root / "tweets"
    tweets.mkdir(parents=True)
    for split in ("train", "test"):
        for kind in ("rumor", "nonrumor"):
            (tweets / f"{split}_{kind}.txt").write_bytes(files.get(f"{split}_{kind}", b""))
    for folder in ("rumor_images", "nonrumor_images"):
        (root / folder).mkdir()
    for rel, data in (images or {}).items():
        (root / rel).write_bytes(data)
    return str(tweets)


def lines(*rows: str, end: str = "\n") -> bytes:
    return ("\n".join(rows) + end).encode("utf-8")


# --------------------------------------------------------------------------------------------- weibo


def test_weibo_bom_empty_text_null_placeholders_and_images(tmp_path):
    tweets = make_weibo(tmp_path, {
        "train_rumor": BOM + lines(
            meta(1001), "http://ww1.sinaimg.cn/large/aaa.jpg|http://ww2.sinaimg.cn/large/bbb.jpg|null", "谣言一",
            meta(1002), "null", "",
            meta(1003), "http://ww1.sinaimg.cn/large/ccc.jpg|null", "text c"),
        "train_nonrumor": lines(
            meta(2001), "http://ww1.sinaimg.cn/large/ddd.jpg?x=1|null", "real d",
            meta(2002), "http://ww1.sinaimg.cn/large/aaa.jpg|http://ww1.sinaimg.cn/large/ddd.jpg|null", "both"),
        "test_rumor": BOM + lines(meta(3001), "null", "no trailing newline", end=""),
        "test_nonrumor": lines(meta(4001), "null"),  # the last post's empty text line has no newline of its own
    }, images={"rumor_images/aaa.jpg": jpeg(), "rumor_images/bbb.jpg": jpeg(), "nonrumor_images/ddd.jpg": jpeg()})
    d = load_quiet("weibo", tmp_path)
    ri, ni = str(tmp_path / "rumor_images"), str(tmp_path / "nonrumor_images")
    src = lambda f, n: f"{os.path.join(tweets, f)}:{n}"
    assert d.skipped == []
    assert d.train == [
        Record("1001", "谣言一", [f"{ri}/aaa.jpg", f"{ri}/bbb.jpg"], 1, "train", src("train_rumor.txt", 1)),
        Record("1002", "", [], 1, "train", src("train_rumor.txt", 4)),
        Record("1003", "text c", [], 1, "train", src("train_rumor.txt", 7)),
        Record("2001", "real d", [f"{ni}/ddd.jpg"], 0, "train", src("train_nonrumor.txt", 1)),
        Record("2002", "both", [f"{ri}/aaa.jpg", f"{ni}/ddd.jpg"], 0, "train", src("train_nonrumor.txt", 4)),
    ]
    assert d.test == [
        Record("3001", "no trailing newline", [], 1, "test", src("test_rumor.txt", 1)),
        Record("4001", "", [], 0, "test", src("test_nonrumor.txt", 1)),
    ]
    dropped = drop_posts_without_images(d)
    assert [r.id for r in dropped.train] == ["1001", "2001", "2002"] and dropped.test == []
    assert [(s.id, s.reason) for s in dropped.skipped][:2] == [("1002", "no local image: no image listed"),
                                                             ("1003", "no local image: no image listed")]


def test_weibo_broken_posts_are_skipped_with_file_line_and_reason(tmp_path):
    bad_text = meta(1003).encode() + b"\nnull\nabc\xffdef\n"
    tweets = make_weibo(tmp_path, {
        "train_rumor": lines(meta(1001), "null", "ok 1")            # lines 1-3
        + lines("1002|only|three", "null", "lost text")              # 4-6: too few fields
        + bad_text                                                   # 7-9: bad byte in the text
        + lines(meta(1004), "null", "ok 4")                          # 10-12
        + lines(meta(1005), meta(1006), "null", "ok 6")              # 13: URL and text lines missing
        + lines(meta(1007), "null", meta(1008), "null", "ok 8")      # 17: text line missing
        + lines("1009|x", "1010|y", "null", "z")                     # 22, 23: two broken metadata lines
        + lines(meta(1011)),                                         # 26: the file ends mid-post
    })
    d = load_quiet("weibo", tmp_path)
    p = os.path.join(tweets, "train_rumor.txt")
    assert [r.id for r in d.train] == ["1001", "1004", "1006", "1008"]
    assert [r.source for r in d.train] == [f"{p}:1", f"{p}:10", f"{p}:14", f"{p}:19"]
    assert d.skipped == [
        Skipped("1002", "too few metadata fields: 3 of 15", f"{p}:4"),
        Skipped("1003", "invalid UTF-8: byte 0xff at byte 4 of its text line", f"{p}:9"),
        Skipped("1005", "post ends early: line 14 is a metadata line, expected image URLs", f"{p}:13"),
        Skipped("1007", "post ends early: line 19 is a metadata line, expected the text", f"{p}:17"),
        Skipped("1009", "too few metadata fields: 2 of 15", f"{p}:22"),
        Skipped("1010", "too few metadata fields: 2 of 15", f"{p}:23"),
        Skipped("1011", "post ends early: the file ends before its image-URL line", f"{p}:26"),
    ]


def test_weibo_missing_root_or_files_raise_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_dataset("weibo", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="--data-root is required"):
        load_dataset("weibo", None)
    (tmp_path / "tweets").mkdir()
    (tmp_path / "tweets" / "train_rumor.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="lacks train_nonrumor.txt, test_rumor.txt, test_nonrumor.txt"):
        load_dataset("weibo", str(tmp_path))


# ------------------------------------------------------------------------------ politifact / gossipcop CSV


def test_spotfake_csv_bad_rows_are_reported(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "b.png").write_bytes(jpeg())  # beside the CSV, named without extension in the cell
    rows = (b"id,Content,Image_Name,Labels\n"
            b"p1,first post,a.jpg,1\n"
            b'p2,"multi\nline",b,fake\n'
            b"p3,bad label,a.jpg,2\n"
            b"p4,bad \xff byte,a.jpg,0\n"
            b"p5,too few\n"
            b"p6,real one,,real\n"
            b"p7,gone,missing.jpg,0\n")
    (tmp_path / "politifact_train.csv").write_bytes(rows)
    (tmp_path / "politifact_test.csv").write_bytes(b"id,text,image,label\nt1,test fake,a.jpg,1\nt2,test real,,0\n")
    (tmp_path / "gossipcop_train.csv").write_bytes(b"id,text,image,label\ng1,not read by politifact,,1\n")
    d = load_quiet("politifact", tmp_path)
    p = str(tmp_path / "politifact_train.csv")
    assert [(r.id, r.text, r.label, r.split, r.source) for r in d.train] == [
        ("p1", "first post", 1, "train", f"{p}:2"), ("p2", "multi\nline", 1, "train", f"{p}:3"),
        ("p6", "real one", 0, "train", f"{p}:8"), ("p7", "gone", 0, "train", f"{p}:9")]
    assert [r.image_paths for r in d.train] == [[str(tmp_path / "images" / "a.jpg")], [str(tmp_path / "b.png")], [],
                                                [str(tmp_path / "images" / "missing.jpg")]]
    assert [(r.id, r.split) for r in d.test] == [("t1", "test"), ("t2", "test")]
    assert d.skipped == [
        Skipped("p3", "label outside {0,1}: '2' (expected 0/1 or fake/real; 1 = fake)", f"{p}:5"),
        Skipped("p4", "invalid UTF-8: byte 0xff at character 5 of column 'Content'", f"{p}:6"),
        Skipped("p5", "too few fields: 2 of 4 columns", f"{p}:7"),
    ]


def test_spotfake_csv_missing_column_names_what_is_missing(tmp_path):
    (tmp_path / "data.csv").write_bytes(b"id,content,image\nx1,hello,a.jpg\nx2,world,b.jpg\n")
    d = load_quiet("gossipcop", tmp_path)
    reason = ("missing column: label (looked for label, labels, class, target, is_fake, fake, or a file name ending "
              "in _fake/_real); header has: id, content, image")
    p = str(tmp_path / "data.csv")
    assert d.train == [] and d.test == []
    assert d.skipped == [Skipped("x1", reason, f"{p}:2"), Skipped("x2", reason, f"{p}:3")]


def test_spotfake_csv_without_image_column_warns_and_splits_seeded(tmp_path):
    rows = "title,text,label\n" + "".join(f"t{i},body {i},{i % 2}\n" for i in range(20))
    (tmp_path / "politifact.csv").write_text(rows)
    with pytest.warns(DatasetWarning) as caught:
        d = load_dataset("politifact", str(tmp_path))
    messages = " | ".join(str(w.message) for w in caught)
    assert "has no image column" in messages and "no published test split" in messages
    assert (len(d.train), len(d.test)) == (16, 4)
    assert sorted(r.label for r in d.test) == [0, 0, 1, 1]
    assert d.train[0].text == "t0\nbody 0"
    again = load_quiet("politifact", tmp_path)
    assert [r.id for r in again.test] == [r.id for r in d.test]  # deterministic


def test_gossipcop_fakenewsnet_article_layout_with_local_images(tmp_path):
    for label, n in (("fake", 5), ("real", 5)):
        for i in range(n):
            art = tmp_path / "gossipcop" / label / f"gossipcop-{label}{i}"
            art.mkdir(parents=True)
            doc = {"title": f"{label} {i}", "text": "body", "top_img": "http://x.com/img/top.jpg?w=3"}
            (art / "news content.json").write_text(json.dumps(doc))
            (art / "a_other.png").write_bytes(jpeg())
            (art / "top.jpg").write_bytes(jpeg())
    broken = tmp_path / "gossipcop" / "fake" / "gossipcop-broken"
    broken.mkdir()
    (broken / "news content.json").write_text('{"title": "x",\n "text": }')
    d = load_quiet("gossipcop", tmp_path)
    assert len(d.train) + len(d.test) == 10 and len(d.test) == 2
    r = next(r for r in d.train + d.test if r.id == "gossipcop-fake0")
    assert [os.path.basename(p) for p in r.image_paths] == ["top.jpg", "a_other.png"]
    assert r.text == "fake 0\nbody" and r.label == 1
    assert d.skipped == [Skipped("gossipcop-broken", "invalid JSON: Expecting value at column 10",
                                 f"{broken / 'news content.json'}:2")]


def test_spotfake_empty_root_explains_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no CSV and no"):
        load_dataset("politifact", str(tmp_path))


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("CMC_FAST_IMAGES_ANYWHERE", "1")  # the opt-in that keeps the absolute /abs/b.jpg
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg())
    rows = [json.dumps({"id": "m1", "text": "one", "image": "img/a.jpg", "label": 1}),
            json.dumps({"text": "two", "image": ["img/a.jpg", "/abs/b.jpg"], "label": "real", "split": "test"}),
            json.dumps({"id": "m3", "text": "three", "label": 2}),
            json.dumps({"id": "m4", "text": "four"}),
            '{"id": "m5", "text": broken',
            json.dumps({"id": "m7", "text": "seven", "label": "fake", "split": "val"}),
            json.dumps({"id": "m8", "content": "eight", "label": 0})]
    data = ("\n".join(rows[:5]) + "\n").encode() + b'{"id": "m6", "text": "caf\xe9", "label": 0}\n' \
        + ("\n".join(rows[5:]) + "\n").encode()
    (tmp_path / "manifest.jsonl").write_bytes(data)
    d = load_quiet("manifest", tmp_path)
    p = str(tmp_path / "manifest.jsonl")
    assert d.train == [Record("m1", "one", [str(tmp_path / "img" / "a.jpg")], 1, "train", f"{p}:1"),
                       Record("m8", "eight", [], 0, "train", f"{p}:8")]
    assert d.test == [Record("manifest.jsonl:2", "two", [str(tmp_path / "img" / "a.jpg"), "/abs/b.jpg"], 0, "test",
                             f"{p}:2")]
    assert d.skipped == [
        Skipped("m3", "label outside {0,1}: 2 (expected 0/1 or fake/real; 1 = fake)", f"{p}:3"),
        Skipped("m4", "missing field: label", f"{p}:4"),
        Skipped("manifest.jsonl:5", "invalid JSON: Expecting value at column 22", f"{p}:5"),
        Skipped("m6", "invalid UTF-8: byte 0xe9 at byte 26", f"{p}:6"),
        Skipped("m7", "unknown split: 'val' (expected train or test)", f"{p}:7"),
    ]


def test_manifest_csv_default_split_and_missing_column(tmp_path):
    (tmp_path / "mine.csv").write_text("text,image,label,split\nhello,a.jpg,1,\nbye,,0,test\n")
    d = load_quiet("manifest", tmp_path / "mine.csv")
    assert [(r.text, r.split, r.image_paths) for r in d.train] == [("hello", "train", [str(tmp_path / "a.jpg")])]
    assert [(r.text, r.split) for r in d.test] == [("bye", "test")]
    (tmp_path / "nolabel.csv").write_text("text,image\nhello,a.jpg\n")
    d = load_quiet("manifest", tmp_path / "nolabel.csv")
    assert d.skipped[0].reason.startswith("missing column: label (looked for label, labels")
    assert d.skipped[0].source == f"{tmp_path / 'nolabel.csv'}:2"
    with pytest.raises(ValueError, match="several candidate files"):
        load_dataset("manifest", str(tmp_path))


def test_parse_label_accepts_and_refuses():
    assert [parse_label(v) for v in (1, 0, "1", " 0 ", "1.0", 1.0, "FAKE", "real", "rumor", "non-rumor")] == \
        [1, 0, 1, 0, 1, 1, 1, 0, 1, 0]
    assert [parse_label(v) for v in (2, -1, "2", "true", True, None, "", "0.5")] == [None] * 8


def test_every_reader_is_registered():
    assert {"synthetic", "weibo", "politifact", "gossipcop", "fakenewsnet", "manifest"} <= set(DATASETS)


# ------------------------------------------------------------------------------------------ fakenewsnet


def test_fakenewsnet_small_layout(tmp_path):
    base = tmp_path / "PolitiFact"
    for folder, n in (("FakeNewsContent", 10), ("RealNewsContent", 10)):
        (base / folder).mkdir(parents=True)
        for i in range(1, n + 1):
            doc = {"title": f"t{i}", "text": f"{folder} {i}", "top_img": "http://x/y.jpg"}
            (base / folder / f"PolitiFact_{folder[:4]}_{i}-Webpage.json").write_text(json.dumps(doc))
    (base / "FakeNewsContent" / "PolitiFact_Fake_99-Webpage.json").write_bytes(b'{"title": "x\xff"}')
    d = load_quiet("fakenewsnet", tmp_path)
    assert (len(d.train), len(d.test)) == (16, 4)
    assert all(r.image_paths == [] for r in d.train + d.test)
    assert next(r for r in d.train + d.test if r.id == "PolitiFact_Fake_1").text == "t1\nFakeNewsContent 1"
    assert d.skipped == [Skipped("PolitiFact_Fake_99", "invalid UTF-8: byte 0xff at byte 13",
                                 f"{base / 'FakeNewsContent' / 'PolitiFact_Fake_99-Webpage.json'}:1")]


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_weibo_split(shared_data):
    with pytest.warns(DatasetWarning, match="9344 of 9527 posts have no local image"):
        d = load_dataset("weibo", os.path.join(shared_data, "weibo"))
    assert d.skipped == []
    counts = {(s, lab): sum(r.label == lab for r in getattr(d, s)) for s in ("train", "test") for lab in (1, 0)}
    assert counts == {("train", 1): 3748, ("train", 0): 3783, ("test", 1): 1000, ("test", 0): 996}
    with_image = {(s, lab): sum(bool(r.image_paths) and r.label == lab for r in getattr(d, s))
                  for s in ("train", "test") for lab in (1, 0)}
    assert with_image == {("train", 1): 37, ("train", 0): 127, ("test", 1): 12, ("test", 0): 7}
    assert len({p for r in d.train + d.test for p in r.image_paths}) == 266
    assert all(os.path.isfile(p) for r in d.train + d.test for p in r.image_paths)
    empty = {(s, lab): sum(not r.text and r.label == lab for r in getattr(d, s)) for s in ("train", "test")
             for lab in (1, 0)}
    assert empty == {("train", 1): 50, ("train", 0): 0, ("test", 1): 66, ("test", 0): 0}
    first_test_rumor = next(r for r in d.test if r.label == 1)
    assert first_test_rumor.id == "3596676713278888"  # the BOM is not part of the id
    assert first_test_rumor.source.endswith("test_rumor.txt:1")
    assert len({r.id for r in d.train + d.test}) == 9527


@pytest.mark.realdata
def test_real_fakenewsnet_politifact(shared_data):
    d = load_quiet("fakenewsnet", os.path.join(shared_data, "fakenewsnet_v1"))
    assert d.skipped == []
    assert sum(r.label == 1 for r in d.train + d.test) == 120 and sum(r.label == 0 for r in d.train + d.test) == 120
    assert (len(d.train), len(d.test)) == (192, 48)
    assert sum(r.label for r in d.test) == 24
    same = load_quiet("fakenewsnet", os.path.join(shared_data, "fakenewsnet_v1", "PolitiFact"))
    assert [r.id for r in same.test] == [r.id for r in d.test]
    assert all(r.text for r in d.train + d.test)


def test_manifest_folder_of_train_and_test_files(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": f"x {i}", "label": i % 2,
                                                              "image": "a.jpg"}) + "\n" for i in range(5)))
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "h1", "text": "held out", "label": 1, "split": "train"})
                                         + "\n")  # the file decides the split
    d = load_quiet("manifest", str(tmp_path))
    assert [r.id for r in d.train] == [f"t{i}" for i in range(5)] and [r.id for r in d.test] == ["h1"]
    assert d.train[0].image_paths == [str(tmp_path / "a.jpg")] and d.test[0].split == "test"
    (tmp_path / "extra.jsonl").write_text("")
    with pytest.raises(ValueError, match="keep only train.jsonl and test.jsonl"):
        load_dataset("manifest", str(tmp_path))
