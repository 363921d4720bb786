"""Scoring a file of posts with a detector (``cmc-fast predict --run DIR|--bundle DIR --input FILE [--variant cmc]
[--out FILE.jsonl]``).

The input is the manifest format: JSONL (one object a line) or CSV, with ``text``, ``image`` (a path relative to
the input file, or absolute inside its folder; one leaving the folder is a bad line unless
``CMC_FAST_IMAGES_ANYWHERE=1``; absent or empty: no image) and an optional ``id`` (default ``<file>:<line>``).
Labels, when present, are ignored. Posts stream through in batches (``--batch-size``), so memory stays bounded
whatever the input's size. One JSON line per scored post::

    {"id", "p_fake", "label": "fake"|"real", "p_fake_text", "p_fake_image", "model", "image_error"?}

``model`` names what gave ``p_fake``: the variant, or its text branch (cmc: ``cmc-t``) for a post whose image is
missing or does not decode (``image_error`` says why, and a stderr line with its line number). A branch's
p(fake) is null where it is absent or was not trained. A line that cannot be used (not UTF-8, not JSON, not an
object, no text field, empty text, or a post the variant cannot score) is reported on stderr with its line
number and reason, and the rest go on.

Exit status: 0 every post was scored, 1 some lines were reported and skipped, 2 a usage error or a bad file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from cmc_fast.data_pipeline import safe_io
from cmc_fast.data_pipeline.readers.common import outside_reason, unencodable_key
from cmc_fast.detector import Detector

TEXT_KEYS = ("text", "content")
MAX_LINE_BYTES = safe_io.LINE_LIMIT  # one post's line (JSONL) or field (CSV); a longer one is reported
IMAGE_KEYS = ("image", "image_path")


@dataclass
class Post:
    line: int
    id: str
    text: str
    image: str | None  # an absolute path, or None


@dataclass
class BadLine:
    line: int
    reason: str
    id: str = ""


# ------------------------------------------------------------------------------------------ reading
def _post(obj: object, line: int, name: str, base: str) -> Post | BadLine:
    """One parsed row as a post, or why it is not one."""
    if not isinstance(obj, dict):
        return BadLine(line, f"expected a JSON object, got {type(obj).__name__}")
    bad_key = unencodable_key(obj, ("id", *TEXT_KEYS, *IMAGE_KEYS))
    if bad_key:  # a lone surrogate ("\ud800") parses but cannot be written out as UTF-8
        return BadLine(line, f"{bad_key}: not valid Unicode (a lone surrogate escape)")
    raw_id = obj.get("id")
    if isinstance(raw_id, dict | list):
        return BadLine(line, f"id: expected a string or a number, got {type(raw_id).__name__}")
    post_id = str(raw_id).strip() if raw_id not in (None, "") else f"{name}:{line}"
    text_key = next((k for k in TEXT_KEYS if k in obj), None)
    if text_key is None:
        return BadLine(line, "missing field: text", post_id)
    text = obj[text_key]
    if not isinstance(text, str):
        return BadLine(line, f"text: expected a string, got {type(text).__name__}", post_id)
    if not text.strip():
        return BadLine(line, "empty text", post_id)
    image = next((obj[k] for k in IMAGE_KEYS if k in obj), None)
    if image is not None and not isinstance(image, str):
        return BadLine(line, f"image: expected a path, got {type(image).__name__}", post_id)
    outside = outside_reason([image], base) if image else None
    if outside:
        return BadLine(line, outside, post_id)
    path = os.path.join(base, image) if image else None
    return Post(line, post_id, text.strip(), path)


def _jsonl(stream: io.BufferedReader, name: str, base: str) -> Iterator[Post | BadLine]:
    for number, raw in safe_io.bounded_lines(stream, MAX_LINE_BYTES):
        if raw is None:
            yield BadLine(number, f"line over {MAX_LINE_BYTES} bytes")
            continue
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
        except UnicodeDecodeError as exc:
            yield BadLine(number, f"not valid UTF-8 (byte {exc.start})")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield BadLine(number, f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            yield BadLine(number, "invalid JSON: nested too deeply")
            continue
        except ValueError as exc:  # an integer of more digits than Python converts
            yield BadLine(number, f"invalid JSON: {' '.join(str(exc).split())[:120]}")
            continue
        yield _post(obj, number, name, base)


def _csv(stream: io.BufferedReader, name: str, base: str) -> Iterator[Post | BadLine]:
    """CSV rows (a quoted field may span lines); a row touching a line that is not UTF-8 is reported."""
    bad_lines: set[int] = set()

    def decoded() -> Iterator[str]:
        for number, raw in safe_io.bounded_lines(stream, MAX_LINE_BYTES):
            if raw is None:  # over MAX_LINE_BYTES: reported as not readable, its row left empty
                bad_lines.add(number)
                yield "\n"
                continue
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                bad_lines.add(number)
                yield raw.decode("utf-8", errors="replace")

    # csv's field limit is process-wide (128 KiB by default; the dataset readers raise it): at least one line's
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    reader = csv.reader(decoded())
    try:
        header = next(reader, None)
    except csv.Error as exc:
        yield BadLine(1, f"malformed CSV header: {exc}")
        return
    if header is None:
        return
    header = [h.strip().lstrip("\ufeff").lower() for h in header]
    first = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a field over MAX_LINE_BYTES, a NUL: the rest of the file cannot be framed
            yield BadLine(first, f"malformed CSV: {exc}; the rows after it are not read")
            return
        lines = range(first, reader.line_num + 1)
        first = reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if bad_lines.intersection(lines):
            yield BadLine(lines[0], "not valid UTF-8")
        elif len(row) != len(header):
            yield BadLine(lines[0], f"expected {len(header)} fields, got {len(row)}")
        else:
            yield _post(dict(zip(header, row)), lines[0], name, base)


def read_posts(path: Path, stream: io.BufferedReader) -> Iterator[Post | BadLine]:
    """Posts and bad lines of the input, one at a time."""
    base = str(path.resolve().parent)
    reader = _csv if path.suffix.lower() == ".csv" else _jsonl
    return reader(stream, path.name, base)


# ------------------------------------------------------------------------------------------ scoring
def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def score_batch(detector: Detector, posts: list[Post]) -> tuple[list[tuple[Post, dict]], list[BadLine]]:
    """Each scored post with its output line, and the posts the variant could not score."""
    pred = detector.predict([p.text for p in posts], [p.image for p in posts], batch_size=len(posts))
    out, failed = [], []
    for i, post in enumerate(posts):
        if pred.label[i] < 0:
            failed.append(BadLine(post.line, f"image not usable ({pred.image_error[i]}) and {detector.variant} has "
                                             f"no trained text branch to score the text alone", post.id))
            continue
        line = {"id": post.id, "p_fake": _num(pred.p_fake[i]), "label": "fake" if pred.label[i] == 1 else "real",
                "p_fake_text": _num(pred.p_fake_text[i]), "p_fake_image": _num(pred.p_fake_image[i]),
                "model": pred.scored_by[i]}
        if pred.image_error[i] is not None and detector.uses_images:
            line["image_error"] = pred.image_error[i]
        out.append((post, line))
    return out, failed


@dataclass
class Summary:
    posts: int = 0
    failed: int = 0
    text_only: int = 0  # scored by the text branch because the image was not usable
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.posts / self.seconds if self.seconds > 0 else 0.0
        return (f"posts: {self.posts} scored ({self.text_only} by the text branch alone), failed: {self.failed}, "
                f"{rate:.1f} posts/s")


def predict_file(detector: Detector, path: Path, out, *, batch_size: int = 64, progress: bool = True,
                 report=None) -> Summary:
    """Score every post of ``path`` and write one JSON line each to ``out``; bad lines go to ``report``
    (default stderr). Holds one batch of posts at a time."""
    report = report or sys.stderr
    summary, batch, t0 = Summary(), [], time.perf_counter()
    name = path.name

    def flush() -> None:
        scored, failed = score_batch(detector, batch)
        for post, line in scored:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            if "image_error" in line:  # scored, but not as the variant would with its image: say so
                print(f"{name}:{post.line}: image not usable ({line['image_error']}); scored by {line['model']}",
                      file=report)
        summary.posts += len(scored)
        summary.text_only += sum(line["model"] != detector.variant for _, line in scored)
        for bad in failed:
            _report(report, name, bad, summary)
        batch.clear()

    with safe_io.open_regular(path, allow_empty=True) as stream, tqdm(
            total=os.fstat(stream.fileno()).st_size, unit="B", unit_scale=True, desc="predict", disable=not progress,
            dynamic_ncols=True) as bar:
        for item in read_posts(path, stream):
            bar.update(stream.tell() - bar.n)  # bytes read so far (redrawn at tqdm's own pace)
            if isinstance(item, BadLine):
                _report(report, name, item, summary)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    summary.seconds = time.perf_counter() - t0
    return summary


def _report(stream, name: str, bad: BadLine, summary: Summary) -> None:
    summary.failed += 1
    post = f" (id {bad.id})" if bad.id else ""
    print(f"{name}:{bad.line}: skipped{post}: {bad.reason}", file=stream)
