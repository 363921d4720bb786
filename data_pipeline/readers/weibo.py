"""The att-RNN (Jin et al., MM 2017) Weibo rumor layout.

::

    ROOT/tweets/{train,test}_{rumor,nonrumor}.txt
    ROOT/rumor_images/, ROOT/nonrumor_images/     images named by the last path part of their URL

Each post is three lines: 15 ``|``-separated metadata fields (tweet id first); the image URLs, ``|``-separated,
ending with the placeholder ``null``; the text (may be empty). A file may start with a UTF-8 BOM.
Rumor = fake (label 1).

Streaming, one line at a time. ``Record.image_paths`` lists, in URL order, the URLs' files that exist in
either image folder; posts with none are kept with ``image_paths=[]`` (text-only variants use them;
``drop_posts_without_images`` removes them for image variants). A post that cannot be parsed (too few
metadata fields, a file ending mid-post, bytes that are not UTF-8) goes to ``skipped`` with its
``file:line``, and the reader resynchronises on the next metadata line.
"""

from __future__ import annotations

import os

from ..records import FAKE, REAL, DatasetSplits, Record, Skipped
from .common import read_lines, require_dir, utf8_error, warn, where

N_FIELDS = 15
FILES = (("train", "rumor", FAKE), ("train", "nonrumor", REAL), ("test", "rumor", FAKE), ("test", "nonrumor", REAL))
LAYOUT = ("the att-RNN Weibo layout: tweets/{train,test}_{rumor,nonrumor}.txt and rumor_images/, "
          "nonrumor_images/")


def _url_like(line: str) -> bool:
    parts = [p.strip() for p in line.split("|")]
    return all(p in ("", "null") or "://" in p or p.lower().startswith("www.") for p in parts)


def _meta_like(line: str) -> bool:
    fields = line.split("|")
    return len(fields) >= N_FIELDS and fields[0].strip() != "" and not _url_like(line)


def _id_first(line: str) -> bool:
    """A (possibly broken) metadata line: a tweet id, then a '|'."""
    head, sep, _ = line.partition("|")
    return bool(sep) and head.strip().isdigit()


def image_name(url: str) -> str:
    """The file name an att-RNN image is stored under: the URL's last path part, query removed."""
    return url.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _image_index(root: str) -> dict[str, dict[str, str]]:
    """folder kind ("rumor"/"nonrumor") -> file name -> path, from one directory listing each."""
    index: dict[str, dict[str, str]] = {}
    for kind in ("rumor", "nonrumor"):
        folder = os.path.join(root, f"{kind}_images")
        try:
            index[kind] = {e.name: e.path for e in os.scandir(folder) if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            index[kind] = {}
    return index


def read_file(path: str, split: str, label: int, index: dict[str, dict[str, str]],
              skipped: list[Skipped], stats: dict[str, int]) -> list[Record]:
    """Parse one tweets file; unparseable posts are appended to ``skipped``."""
    kinds = ("rumor", "nonrumor") if label == FAKE else ("nonrumor", "rumor")  # own folder first
    records: list[Record] = []
    # which line comes next: meta, urls, text of a post; skip_urls, skip_text of a post whose metadata line
    # was broken (its URL and text lines are consumed when they look the part, so a stray line is reported
    # as a post of its own rather than swallowed)
    state = "meta"
    post_id, start, urls_line, bad = "", 0, "", None
    last_had_newline = True

    def fail(pid: str, line: int, reason: str) -> None:
        skipped.append(Skipped(pid, reason, where(path, line)))

    for number, raw, had_newline in read_lines(path):
        last_had_newline = had_newline
        err = utf8_error(raw)
        line = raw.decode("utf-8", errors="replace")
        if state == "skip_urls":
            if _url_like(line):
                state = "skip_text"
                continue
            state = "meta"
            if not (_meta_like(line) or _id_first(line)):
                continue  # the broken post's URL line is gone: this was its text
        elif state == "skip_text":
            state = "meta"
            if not (_meta_like(line) or _id_first(line)):
                continue
        if state == "meta":
            fields = line.split("|")
            if len(fields) < N_FIELDS:
                if line.strip() == "" and not err:
                    continue  # blank line between posts (or at the end): nothing lost
                hint = " (an image-URL line: the metadata line is missing?)" if _url_like(line) else ""
                pid = fields[0].strip() if fields[0].strip().isdigit() else ""
                fail(pid, number, f"too few metadata fields: {len(fields)} of {N_FIELDS}{hint}")
                state = "skip_text" if hint else "skip_urls"
                continue
            post_id, start, bad = fields[0].strip(), number, (number, f"{err} of its metadata line") if err else None
            state = "urls"
        elif state == "urls":
            if _meta_like(line):
                fail(post_id, start, f"post ends early: line {number} is a metadata line, expected image URLs")
                post_id, start = line.split("|")[0].strip(), number
                bad = (number, f"{err} of its metadata line") if err else None
                continue  # this line starts the next post; state stays "urls"
            urls_line = line
            if err and bad is None:
                bad = (number, f"{err} of its image-URL line")
            state = "text"
        else:  # text
            if _meta_like(line):  # the post lost its text line: this line starts the next post
                fail(post_id, start, f"post ends early: line {number} is a metadata line, expected the text")
                post_id, start, state = line.split("|")[0].strip(), number, "urls"
                bad = (number, f"{err} of its metadata line") if err else None
                continue
            if err and bad is None:
                bad = (number, f"{err} of its text line")
            state = "meta"
            if bad is not None:
                fail(post_id, bad[0], bad[1])
                continue
            records.append(_record(post_id, line, urls_line, label, split, where(path, start), index, kinds, stats))
    if state == "urls":
        fail(post_id, start, "post ends early: the file ends before its image-URL line")
    elif state == "text":
        if not last_had_newline:  # the file ends on the URL line itself: its text line is missing
            fail(post_id, start, "post ends early: the file ends before its text line")
        elif bad is not None:
            fail(post_id, bad[0], bad[1])
        else:  # URL line then a final empty text line without its own newline
            records.append(_record(post_id, "", urls_line, label, split, where(path, start), index, kinds, stats))
    return records


def _record(post_id: str, text: str, urls_line: str, label: int, split: str, source: str,
            index: dict[str, dict[str, str]], kinds: tuple[str, str], stats: dict[str, int]) -> Record:
    paths: list[str] = []
    for url in urls_line.split("|"):
        url = url.strip()
        if url in ("", "null"):
            continue
        stats["urls"] += 1
        name = image_name(url)
        path = index[kinds[0]].get(name) or index[kinds[1]].get(name)
        if path is None:
            stats["urls_missing"] += 1
        elif path not in paths:
            paths.append(path)
    return Record(id=post_id, text=text.strip(), image_paths=paths, label=label, split=split, source=source)


def read_weibo(root: str | os.PathLike | None, **_: object) -> DatasetSplits:
    root = require_dir(root, "weibo", LAYOUT)
    tweets = os.path.join(root, "tweets")
    if not os.path.isdir(tweets):
        raise FileNotFoundError(f"weibo: {tweets} not found (expected {LAYOUT})")
    missing = [f"{split}_{kind}.txt" for split, kind, _ in FILES
               if not os.path.isfile(os.path.join(tweets, f"{split}_{kind}.txt"))]
    if missing:
        raise FileNotFoundError(f"weibo: {tweets} lacks {', '.join(missing)} (expected {LAYOUT})")
    index = _image_index(root)
    absent = [f"{k}_images/" for k in ("rumor", "nonrumor") if not os.path.isdir(os.path.join(root, f"{k}_images"))]
    if absent:
        warn(f"weibo: {root} has no {' or '.join(absent)}; posts of those folders have no local image")
    out: dict[str, list[Record]] = {"train": [], "test": []}
    skipped: list[Skipped] = []
    stats = {"urls": 0, "urls_missing": 0}
    for split, kind, label in FILES:
        out[split] += read_file(os.path.join(tweets, f"{split}_{kind}.txt"), split, label, index, skipped, stats)
    splits = DatasetSplits("weibo", out["train"], out["test"], skipped, root)
    no_image = sum(not r.image_paths for r in out["train"] + out["test"])
    if no_image:
        warn(f"weibo: {no_image} of {len(out['train']) + len(out['test'])} posts have no local image "
             f"({stats['urls_missing']} of {stats['urls']} image URLs have no file in rumor_images/ or "
             f"nonrumor_images/); kept for text-only variants")
    return splits
