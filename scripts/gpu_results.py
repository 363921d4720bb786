"""Turn a GPU run's ``gpu-results.jsonl`` (scripts/gpu_check.py) into the tables of ``bench/results/``.

    python scripts/gpu_results.py /work/.device/.../gpu-results.jsonl [--results bench/results]

Writes, beside the CPU figures and in their form (``bench/conftest.py``'s payload and Markdown):
``<device>.json`` and ``<device>.md`` with every timing row (kernel time, wall time, first call, peak memory,
floors; BLOCK's ``auto`` row with the path the dispatch picked), merged with the rows already there (a row of the
same group and provider is replaced: the check uses bench/'s group and provider names), and
``<device>-gpu-check.md``: the run's whole summary (environment, correctness per autotune config, the dispatch's
picks, what stopped or is owed). A dry run's file (CPU, reference kernels) is refused: those are not GPU figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ROW_KEYS = ("group", "provider", "mean_s", "median_s", "min_s", "rounds", "floor_s", "measured_over_floor")
_DROP = ("schema", "section", "name", "status", "kind", "dry_run", "elapsed_s")


def _gpu_check():
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _markdown(payload: dict) -> str:
    """bench/conftest.py's table (imported from there: one definition of the form)."""
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "bench" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown(payload)


def slug(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()


def bench_rows(lines: list[dict], date: str) -> list[dict]:
    """The timing lines as bench rows: the row keys first, every other measured field kept as extra."""
    rows = []
    for line in lines:
        if line.get("kind") != "bench" or line.get("status") != "ok":
            continue
        missing = [k for k in _ROW_KEYS if k not in line]
        if missing:
            raise ValueError(f"{line.get('section')}/{line.get('name')}: a bench line without {missing}")
        row = {k: line[k] for k in _ROW_KEYS}
        row.update({k: v for k, v in line.items() if k not in _ROW_KEYS and k not in _DROP})
        row["date"] = date
        row["source"] = f"scripts/gpu_check.py, section {line['section']}"
        rows.append(row)
    return rows


def _shown(row: dict) -> dict:
    """The row as the Markdown table shows it: BLOCK's ``auto`` provider names the path the dispatch picked
    (``auto -> fused``), which bench/conftest.py's table has no column for; the JSON keeps ``provider`` and
    ``path`` apart, as bench/bench_block.py records them."""
    if row.get("path") and row["provider"] == "auto":
        return dict(row, provider=f"auto -> {row['path']}")
    return row


def convert(jsonl: Path, results: Path, *, allow_dry_run: bool = False) -> list[Path]:
    """Writes the three files; returns their paths."""
    gc = _gpu_check()
    lines = gc.read_lines(jsonl)
    if not lines:
        raise SystemExit(f"{jsonl}: no result lines")
    env = next((x for x in lines if x.get("kind") == "env"), None)
    if env is None:
        raise SystemExit(f"{jsonl}: no environment line (the run stopped before its first section?)")
    if any(x.get("dry_run") for x in lines) and not allow_dry_run:
        raise SystemExit(f"{jsonl}: a --dry-run file (CPU, reference kernels): not GPU figures, not written")
    device, date = env["device"], env.get("date", "")
    results.mkdir(parents=True, exist_ok=True)
    json_path = results / f"{slug(device)}.json"
    fresh = bench_rows(lines, date)
    keys = {(r["group"], r["provider"]) for r in fresh}
    try:
        kept = [r for r in json.loads(json_path.read_text())["rows"] if (r["group"], r["provider"]) not in keys]
    except (OSError, ValueError, KeyError):
        kept = []
    payload = {"device": device, "torch": env.get("torch"), "date": date, "triton_interpret": "0",
               "rows": kept + fresh}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path = results / f"{slug(device)}.md"
    md_path.write_text(_markdown(dict(payload, rows=[_shown(r) for r in payload["rows"]])))
    check_path = results / f"{slug(device)}-gpu-check.md"
    check_path.write_text(gc.summary_markdown(lines))
    return [json_path, md_path, check_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", type=Path, help="gpu-results.jsonl from a GPU run")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where the tables go")
    parser.add_argument("--allow-dry-run", action="store_true", help="accept a --dry-run file (tests only)")
    args = parser.parse_args(argv)
    if not args.jsonl.is_file():
        parser.error(f"{args.jsonl}: no such file")
    for path in convert(args.jsonl, args.results, allow_dry_run=args.allow_dry_run):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
