"""Merge a GPU check's rows into ``bench/results/<device>.{json,md}`` (through ``cmc_fast.benchmark.write_results``,
the writer bench/conftest.py uses: a row of the same group and provider is replaced, the others kept)::

    python scripts/gpu_results.py OUT/gpu-results.json [--results bench/results]

A dry run's file (the CPU, the interpreter) is refused: those are not GPU figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmc_fast.benchmark import read_results, write_results

ROOT = Path(__file__).resolve().parent.parent


def convert(path: Path, results: Path, *, allow_dry_run: bool = False) -> tuple[Path, Path]:
    payload = read_results(path)
    if payload.get("dry_run") and not allow_dry_run:
        raise SystemExit(f"{path}: a --dry-run file (CPU, interpreter): not GPU figures, not written")
    rows = [dict(r, source=f"scripts/gpu_check.py, section {r.get('section')}") for r in payload["rows"]]
    return write_results(rows, results, device=payload["device"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_json", type=Path, help="gpu-results.json of a GPU run")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where the tables go")
    parser.add_argument("--allow-dry-run", action="store_true", help="accept a --dry-run file (tests only)")
    args = parser.parse_args(argv)
    if not args.results_json.is_file():
        parser.error(f"{args.results_json}: no such file")
    for path in convert(args.results_json, args.results, allow_dry_run=args.allow_dry_run):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
