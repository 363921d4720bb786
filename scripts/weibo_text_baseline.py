"""Text-only finetune-t on the real Weibo split, a model trained from scratch on a CPU, over several seeds, against
the character TF-IDF + logistic-regression baseline of ../shared/data/README.md (test accuracy 0.804).

    python scripts/weibo_text_baseline.py [--seeds 0 1 2] [--parallel 2] [--recipe tiny-mlm] [-- extra train flags]

Each seed is one ``cmc-fast train --dataset weibo --variant finetune-t`` run: its epoch is selected on the grouped
validation split carved from train (near-duplicate reposts kept on one side; the seed also picks the split), and
the test split is scored once. With ``--parallel N`` N runs share the machine, one torch thread each.
Writes bench/results/weibo-finetune-t-<recipe>-cpu.{json,md}: per-seed accuracy, P/R/F1, validation
accuracy, selected epoch and wall time, and mean +- std over the seeds.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TFIDF_LR = 0.804  # ../shared/data/README.md: char 1-3-gram TF-IDF + LR (C=10), trained on all of train
# The recipe, chosen on grouped validation accuracy only (bench/results/weibo-finetune-t-*-cpu.md says how).
_TINY = ["--text-model", "tiny", "--tiny-text-dim", "64", "--tiny-text-layers", "2", "--max-len", "160",
         "--text-lr", "1e-3", "--epochs", "8", "--batch-size", "32"]
RECIPE = {
    "tiny-mlm": [*_TINY, "--text-pretrain-epochs", "10"],  # highest mean grouped-validation accuracy
    "tiny": _TINY,
    "ngram": ["--text-model", "ngram", "--tiny-text-dim", "64", "--max-len", "160", "--text-lr", "1e-3",
              "--epochs", "8", "--batch-size", "32", "--group-sampling", "1"],
}


def run_one(seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    out = Path(args.out) / f"seed{seed}"
    cmd = ["cmc-fast", "train", "--dataset", "weibo", "--data-root", args.data_root, "--variant", "finetune-t",
           "--no-progress", "--seed", str(seed), "--out", str(out), *RECIPE[args.recipe], *extra]
    if args.parallel > 1:  # one thread per run: two 2-thread runs on two cores stall each other's OpenMP
        cmd += ["--threads", "1"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    res = metrics["results"]["finetune-t"]
    history = metrics["history"]["finetune-t"]
    best = max(history, key=lambda h: h["val_accuracy"]["text"])
    return {"seed": seed, "test": res["test"], "val_accuracy": res["val_accuracy"], "epoch": best["epoch"],
            "wall_s": round(wall, 1), "run_dir": str(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--recipe", choices=list(RECIPE), default="tiny-mlm")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "weibo"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "weibo-text"))
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if not Path(args.data_root).is_dir():
        ap.error(f"--data-root: not a directory: {args.data_root}")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        rows = list(pool.map(lambda s: run_one(s, args, extra), args.seeds))
    accs = [r["test"]["accuracy"] for r in rows]
    summary = {
        "task": "Weibo (att-RNN split) finetune-t, text model trained from scratch",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
        "recipe": RECIPE[args.recipe] + extra, "parallel_runs": args.parallel,
        "baseline_tfidf_lr": TFIDF_LR, "runs": rows,
        "test_accuracy_mean": statistics.mean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "seeds_beating_baseline": sum(a > TFIDF_LR for a in accs), "wall_s": round(time.perf_counter() - t0, 1),
    }
    dest = ROOT / "bench" / "results" / f"weibo-finetune-t-{args.recipe}-cpu"
    dest.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# {summary['task']}", "",
             f"Machine: {summary['machine']}; {args.parallel} run(s) at a time.",
             f"Recipe: `{' '.join(summary['recipe'])}`.",
             "Each seed selects its epoch on its own grouped validation split; test scored once.", "",
             "| seed | test acc | fake P | fake R | fake F1 | real P | real R | real F1 | val acc | epoch | wall s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["test"]
        prf = " | ".join(f"{t[f'{c}_{m}']:.3f}" for c in ("fake", "real") for m in ("precision", "recall", "f1"))
        lines.append(f"| {r['seed']} | {t['accuracy']:.4f} | {prf} | {r['val_accuracy']:.4f} | {r['epoch']} | "
                     f"{r['wall_s']} |")
    lines += ["", f"Mean test accuracy {summary['test_accuracy_mean']:.4f} +- {summary['test_accuracy_std']:.4f} "
              f"over {len(rows)} seeds; {summary['seeds_beating_baseline']} of {len(rows)} beat char TF-IDF + LR "
              f"({TFIDF_LR})."]
    dest.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
