"""``cmc-fast data check``: is a dataset usable, and what is wrong with it.

Loads the dataset with its reader, then reports counts per split and label; posts parsed, kept, dropped
and why (with ``file:line``); posts with no local image; every referenced image file checked — missing
on disk, empty, unreadable (each one decoded with ``decode_uint8``) or not what its extension says
(magic bytes sniffed: PNG or GIF data named .jpg, an HTML page saved as .jpg); empty texts; duplicate
ids (and ids in both train and test). A human-readable table by default, JSON with ``--json``.

Exit status: 0 usable; 1 not usable (no posts, empty train split, a class missing from train; with
``--require-images`` also: no decodable image for a class of the train split or for the test split);
2 usage error (unknown dataset, missing path, a root without the layout's files).

The lead wires ``add_arguments`` / ``run`` into ``cmc-fast data check``; ``python -m cmc_fast.data_pipeline.check``
runs it stand-alone.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence

from .image_files import DEFAULT_LIMITS, Admission, Limits, open_image
from .images import decode_encoded
from .jpeg import sniff as sniff_kind
from .readers.manifest import NO_TEST_SPLIT_HELP
from .records import FAKE, DatasetSplits, Record
from .registry import DATASETS, load_dataset

DECODE_SIZE = (64, 64)  # decoding proves readability; the resize target only has to be cheap
BATCH = 32
BATCH_BYTES = 256 << 20  # encoded bytes held at once, waiting for a decode
_EXT_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".gif": "GIF",
               ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def sniff(head: bytes) -> str | None:
    """Image format from the first bytes of a file (``jpeg.sniff``), ``None`` when unknown."""
    kind = sniff_kind(head)
    if kind in ("empty", "unknown"):
        return None
    return "JPEG" if kind.startswith("jpeg") else kind.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, metavar="NAME",
                        help="dataset reader: " + ", ".join(sorted(DATASETS)))
    parser.add_argument("--data-root", default=None, metavar="PATH",
                        help="the dataset's directory (or manifest file); not needed for synthetic")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--image-backend", default=None, metavar="NAME",
                        help="decoder to check images with (pil, torchvision, dali, auto; default: the decoder's)")
    parser.add_argument("--no-decode", action="store_true",
                        help="check images by existence and magic bytes only, without decoding them")
    parser.add_argument("--require-images", action="store_true",
                        help="also exit 1 when image variants cannot train (no decodable image for a train class "
                             "or for the test split)")
    parser.add_argument("--max-image-bytes", type=int, default=DEFAULT_LIMITS.max_bytes, metavar="N",
                        help="image files larger than N bytes are reported, not read (default 64 MiB, as train)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_LIMITS.max_pixels, metavar="N",
                        help="images whose header declares more than N pixels are reported, not decoded "
                             "(default 40 million, as train)")
    parser.add_argument("--show", type=int, default=5, metavar="N",
                        help="examples listed per problem in the table (default 5; --json lists all)")


def check_images(paths: Sequence[str], backend: str | None = None, decode: bool = True,
                 limits: Limits | None = None) -> dict:
    """Existence, size, magic bytes and (``decode``) a full decode of each path. Returns per-path findings.
    Every file goes through the image-limits gate as training's do (``image_files.open_image``: regular files
    within ``limits`` only, one bounded read each, then the header and a JPEG's scans), so both refuse the same
    files for the same reasons."""
    limits = limits or DEFAULT_LIMITS
    found = {"missing": [], "empty": [], "unreadable": [], "extension_mismatch": []}
    pending: list[tuple[str, Admission]] = []  # read, waiting to be decoded: at most BATCH files or BATCH_BYTES
    for path in paths:
        image = open_image(path, limits)
        if image.data is None:
            _file_finding(found, path, image.problem)
            continue
        truncated = _format_findings(found, path, image.data)
        if not decode:
            if image.problem:
                found["unreadable"].append({"path": path, "error": image.problem.removeprefix(f"{path}: ")})
            continue
        if truncated:  # already reported: a decode could only repeat it
            continue
        pending.append((path, image))
        if len(pending) >= BATCH or sum(len(im.data) for _, im in pending) >= BATCH_BYTES:
            _decode_findings(found, pending, backend, limits)
            pending = []
    if pending:
        _decode_findings(found, pending, backend, limits)
    return {"checked": len(paths), "missing": found["missing"], "empty": found["empty"],
            "unreadable": found["unreadable"], "extension_mismatch": found["extension_mismatch"], "decoded": decode}


def _file_finding(found: dict, path: str, err: str) -> None:
    if not os.path.lexists(path):
        found["missing"].append(path)
    elif err.endswith("empty file (0 bytes)"):
        found["empty"].append(path)
    else:  # not a regular file, over the byte limit, no permission
        found["unreadable"].append({"path": path, "error": err.removeprefix(f"{path}: ")})


def _format_findings(found: dict, path: str, data: bytes) -> bool:
    """Magic bytes against the extension; a JPEG without its end marker (returns whether it was one)."""
    head = data[:16]
    fmt = sniff(head)
    ext = os.path.splitext(path)[1].lower()
    expected = _EXT_FORMAT.get(ext)
    if fmt is None:
        found["extension_mismatch"].append({"path": path, "extension": ext, "format": "unknown",
                                            "starts_with": repr(bytes(head[:8]))})
    elif expected is not None and fmt != expected:
        found["extension_mismatch"].append({"path": path, "extension": ext, "format": fmt})
    # a lenient decoder (LOAD_TRUNCATED_IMAGES, DALI) may fill in a truncated JPEG: flagged whatever it decodes to
    if head.startswith(b"\xff\xd8\xff") and b"\xff\xd9" not in data[max(16, len(data) - 1024):]:
        found["unreadable"].append({"path": path,
                                    "error": "truncated JPEG: no end-of-image marker in its last 1024 bytes"})
        return True
    return False


def _decode_findings(found: dict, batch: list[tuple[str, Admission]], backend: str | None, limits: Limits) -> None:
    """What the gate refused, and what the decoder could not decode of the rest, in the batch's order."""
    admitted = [k for k, (_, image) in enumerate(batch) if not image.problem]
    with warnings.catch_warnings():  # torch's one-time note about read-only numpy arrays is not a finding
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        result = decode_encoded([batch[k][1].data for k in admitted], DECODE_SIZE, backend=backend or "pil",
                                names=[batch[k][0] for k in admitted], limits=limits)
    errors = {k: batch[k][1].problem for k in range(len(batch)) if batch[k][1].problem}
    errors.update({admitted[pos]: err for pos, err in result.errors.items()})
    for k, err in sorted(errors.items()):
        path = batch[k][0]
        found["unreadable"].append({"path": path, "error": err.removeprefix(f"{path}: ")})


def _split_stats(records: list[Record], bad_paths: set[str]) -> dict:
    fake = sum(r.label == FAKE for r in records)
    with_image = [r for r in records if r.image_paths]
    usable = [r for r in with_image if any(p not in bad_paths for p in r.image_paths)]
    return {
        "posts": len(records), "fake": fake, "real": len(records) - fake,
        "with_image": len(with_image), "no_image": len(records) - len(with_image),
        "with_usable_image": len(usable),
        "with_usable_image_fake": sum(r.label == FAKE for r in usable),
        "with_usable_image_real": sum(r.label != FAKE for r in usable),
        "empty_text": sum(not r.text.strip() for r in records),
    }


def _near_duplicates(train: list[Record], test: list[Record]) -> dict:
    """Reposts (character 3-gram Jaccard >= 0.5, ``near_duplicates.near_duplicate_groups``) inside train and
    across train and test; empty texts are left out."""
    from .near_duplicates import group_summary, near_duplicate_groups

    tr = [r.text for r in train if r.text.strip()]
    te = [r.text for r in test if r.text.strip()]
    groups = near_duplicate_groups(tr + te)
    stats, in_train = group_summary(groups[:len(tr)]), set(groups[:len(tr)])
    return {"train_groups": stats["groups"], "train_posts_with_near_duplicates": stats["posts_with_near_duplicates"],
            "largest_train_group": stats["largest_group"],
            "test_posts_with_near_copy_in_train": sum(g in in_train for g in groups[len(tr):])}


def check_dataset(name: str, root: str | None, *, backend: str | None = None, decode: bool = True,
                  require_images: bool = False, limits: Limits | None = None, **options: object) -> dict:
    """Load ``name`` from ``root`` and build the report (a JSON-able dict). Raises what the loader raises
    (ValueError, FileNotFoundError) for an unknown dataset or a root without the layout."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits: DatasetSplits = load_dataset(name, root, **options)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    t_load = time.perf_counter() - t0
    records = splits.train + splits.test
    paths = list(dict.fromkeys(p for r in records for p in r.image_paths))
    images = check_images(paths, backend=backend, decode=decode, limits=limits)
    bad = set(images["missing"]) | set(images["empty"]) | {u["path"] for u in images["unreadable"]}

    by_reason = collections.Counter(s.reason.split(":", 1)[0] for s in splits.skipped)
    ids = collections.defaultdict(list)
    for r in records:
        ids[r.id].append(r)
    duplicates = {i: [f"{r.split} {r.source}" for r in rs] for i, rs in ids.items() if len(rs) > 1}
    in_both = sorted(i for i, rs in ids.items() if {r.split for r in rs} >= {"train", "test"})
    train_texts = {r.text for r in splits.train if r.text.strip()}
    same_text = sum(1 for r in splits.test if r.text.strip() and r.text in train_texts)
    near = _near_duplicates(splits.train, splits.test)

    stats = {"train": _split_stats(splits.train, bad), "test": _split_stats(splits.test, bad)}
    problems, warn = [], []
    if not records:
        problems.append("no posts were kept")
    elif not splits.train:
        problems.append("the train split is empty")
    else:
        for label, word in ((FAKE, "fake"), (1 - FAKE, "real")):
            if not any(r.label == label for r in splits.train):
                problems.append(f"the train split has no {word} posts")
    if records and not splits.test:
        problems.append(f"no test split: all {len(records)} posts are training posts, so no final evaluation is "
                        f"possible and train refuses; {NO_TEST_SPLIT_HELP}")
    elif splits.test and len({r.label for r in splits.test}) < 2:
        warn.append("the test split has one class only")
    image_ok = (stats["train"]["with_usable_image_fake"] > 0 and stats["train"]["with_usable_image_real"] > 0
                and stats["test"]["with_usable_image"] > 0)
    if records and splits.test and not image_ok:  # (no test split: said above, not as missing images)
        msg = "image variants cannot train: no decodable image for a train class or for the test split"
        (problems if require_images else warn).append(msg)
    if splits.skipped:
        warn.append(f"{len(splits.skipped)} posts dropped (see 'dropped')")
    for key, what in (("missing", "missing on disk"), ("empty", "empty (0 bytes)"), ("unreadable", "unreadable"),
                      ("extension_mismatch", "not what their extension says")):
        if images[key]:
            warn.append(f"{len(images[key])} images {what}")
    if duplicates:
        warn.append(f"{len(duplicates)} duplicate ids ({len(in_both)} in both train and test)")
    if same_text:
        warn.append(f"{same_text} test posts have a text identical to a train post's")
    if near["test_posts_with_near_copy_in_train"]:
        warn.append(f"{near['test_posts_with_near_copy_in_train']} test posts have a near-copy in train "
                    "(the test split partly measures memorisation)")

    no_image = [{"id": r.id, "split": r.split, "source": r.source,
                 "reason": "no local image file" if not r.image_paths else "no listed image is usable"}
                for r in records if not r.image_paths or all(p in bad for p in r.image_paths)]
    return {
        "dataset": name, "root": splits.root or (root or ""), "usable": not problems,
        "usable_for": {"text": not problems, "image": not problems and image_ok},
        "problems": problems, "warnings": warn, "reader_notes": notes,
        "splits": stats,
        "posts": {"parsed": len(records) + len(splits.skipped), "kept": len(records), "dropped": len(splits.skipped),
                  "dropped_by_reason": dict(by_reason.most_common())},
        "dropped": [{"id": s.id, "reason": s.reason, "source": s.source} for s in splits.skipped],
        "images": {"referenced": len(paths), "found": len(paths) - len(images["missing"]),
                   "missing": len(images["missing"]), "empty": len(images["empty"]),
                   "unreadable": len(images["unreadable"]), "extension_mismatch": len(images["extension_mismatch"]),
                   "decoded": images["decoded"],
                   "missing_paths": images["missing"], "empty_paths": images["empty"],
                   "unreadable_list": images["unreadable"], "extension_mismatch_list": images["extension_mismatch"]},
        "posts_without_usable_image": no_image,
        "empty_texts": [{"id": r.id, "split": r.split, "source": r.source} for r in records if not r.text.strip()],
        "duplicate_ids": duplicates, "ids_in_train_and_test": in_both,
        "test_texts_also_in_train": same_text, "near_duplicates": near,
        "seconds": {"load": round(t_load, 3), "total": round(time.perf_counter() - t0, 3)},
    }


def format_report(rep: dict, show: int = 5) -> str:
    out = [f"data check: {rep['dataset']} at {rep['root']}  ({rep['seconds']['total']:.2f} s)", ""]
    cols = ("posts", "fake", "real", "with_image", "no_image", "with_usable_image", "empty_text")
    heads = ("posts", "fake", "real", "with image", "no image", "usable image", "empty text")
    out.append(f"{'split':<6}" + "".join(f"{h:>14}" for h in heads))
    for split in ("train", "test"):
        s = rep["splits"][split]
        out.append(f"{split:<6}" + "".join(f"{s[c]:>14}" for c in cols))
    p = rep["posts"]
    out += ["", f"posts: parsed {p['parsed']}, kept {p['kept']}, dropped {p['dropped']}"]
    for reason, n in p["dropped_by_reason"].items():
        out.append(f"  dropped {n:>6}  {reason}")
        for d in [d for d in rep["dropped"] if d["reason"].split(":", 1)[0] == reason][:show]:
            out.append(f"      {d['source']}  id={d['id'] or '?'}  {d['reason']}")
    im = rep["images"]
    out.append(f"images: {im['referenced']} referenced, {im['found']} found, {im['missing']} missing, "
               f"{im['empty']} empty, {im['unreadable']} unreadable, {im['extension_mismatch']} not what their "
               f"extension says" + ("" if im["decoded"] else " (not decoded: --no-decode)"))
    for path in im["missing_paths"][:show]:
        out.append(f"      missing     {path}")
    for path in im["empty_paths"][:show]:
        out.append(f"      empty       {path}")
    for u in im["unreadable_list"][:show]:
        out.append(f"      unreadable  {u['path']}: {u['error']}")
    for m in im["extension_mismatch_list"][:show]:
        out.append(f"      mismatch    {m['path']}: {m['format']} data named {m['extension'] or '(no extension)'}")
    n_no = len(rep["posts_without_usable_image"])
    out.append(f"posts without a usable local image: {n_no}")
    for d in rep["posts_without_usable_image"][:show]:
        out.append(f"      {d['source']}  id={d['id']}  {d['reason']}")
    out.append(f"empty texts: {len(rep['empty_texts'])}")
    for d in rep["empty_texts"][:show]:
        out.append(f"      {d['source']}  id={d['id']}")
    out.append(f"duplicate ids: {len(rep['duplicate_ids'])} ({len(rep['ids_in_train_and_test'])} in both train "
               f"and test); test texts also in train: {rep['test_texts_also_in_train']}")
    for i, where in list(rep["duplicate_ids"].items())[:show]:
        out.append(f"      {i}: {'; '.join(where)}")
    nd = rep["near_duplicates"]
    out.append(f"near-duplicates (3-gram Jaccard >= 0.5, non-empty texts): {nd['train_posts_with_near_duplicates']} "
               f"train posts have one in train (largest group {nd['largest_train_group']}); "
               f"{nd['test_posts_with_near_copy_in_train']} test posts have one in train")
    for title, items in (("reader notes", rep["reader_notes"]), ("warnings", rep["warnings"]),
                         ("PROBLEMS", rep["problems"])):
        if items:
            out.append(f"{title}:")
            out += [f"  - {x}" for x in items]
    usable = [k for k, v in rep["usable_for"].items() if v]
    verdict = (f"USABLE for {' and '.join(usable)} variants" if rep["usable"] else "NOT USABLE")
    out.append(f"result: {verdict} (exit {0 if rep['usable'] else 1})")
    return "\n".join(out)


def _usage_error(message: str) -> int:
    print(f"cmc-fast data check: {message}", file=sys.stderr)
    return 2


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(args.max_image_bytes, args.max_image_pixels)  # ValueError naming the flag: a usage error


def run(args: argparse.Namespace) -> int:
    if args.dataset not in DATASETS:
        return _usage_error(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(sorted(DATASETS))}")
    if args.data_root is None and args.dataset != "synthetic":
        return _usage_error(f"--data-root is required for {args.dataset}")
    if args.data_root is not None and not os.path.exists(args.data_root):
        return _usage_error(f"--data-root {args.data_root} does not exist")
    try:
        limits = _limits(args)
        rep = check_dataset(args.dataset, args.data_root, backend=args.image_backend, decode=not args.no_decode,
                            require_images=args.require_images, limits=limits)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        return _usage_error(str(exc).replace("\n", " "))
    if args.json:
        print(json.dumps(rep, ensure_ascii=False, indent=1))
    else:
        print(format_report(rep, show=args.show))
    return 0 if rep["usable"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmc_fast.data_pipeline.check",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
