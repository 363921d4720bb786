"""Readable reports: the results table in the paper's Table 2/3 form, as Markdown and for the terminal."""

from __future__ import annotations

from cmc_fast.metrics import confusion, roc_curve
from cmc_fast.variants import REPORT_ORDER

_HEAD = ["Variant", "Accuracy", "Fake P", "Fake R", "Fake F1", "Real P", "Real R", "Real F1", "n test", "val acc",
         "time s"]
_KEYS = ["accuracy", "fake_precision", "fake_recall", "fake_f1", "real_precision", "real_recall", "real_f1"]


def _rows(results: dict) -> list[list[str]]:
    rows = []
    for variant in _ordered(results):
        r = results[variant]
        test = r.get("test", {})
        rows.append([variant] + [f"{test.get(k, float('nan')):.3f}" for k in _KEYS]
                    + [str(test.get("n", "")), f"{r.get('val_accuracy', float('nan')):.3f}",
                       "-" if r.get("train_seconds") is None else f"{r['train_seconds']:.1f}"])
    return rows


def markdown_table(results: dict) -> str:
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "|".join(["---"] + ["---:"] * (len(_HEAD) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    return "\n".join(lines)


def text_table(results: dict) -> str:
    rows = [_HEAD] + _rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def plot_history(history: dict[str, list[dict]], path, chosen: dict[str, dict[str, tuple]] | None = None) -> bool:
    """Training loss and validation accuracy by epoch, a column per stage named by the variants it trained
    (``chosen``: stage -> variant -> (epoch of the checkpoint it kept, head)), that epoch marked with a star.
    False when matplotlib is absent."""
    plt = _pyplot()
    if plt is None:
        return False
    stages = [s for s, h in history.items() if h]
    if not stages:
        return False
    chosen = chosen or {}
    fig, axes = plt.subplots(2, len(stages), figsize=(3.8 * len(stages), 5.5), squeeze=False)
    for col, stage in enumerate(stages):
        epochs = [h["epoch"] for h in history[stage]]
        variants = chosen.get(stage) or {head: (None, head) for head in history[stage][0]["val_accuracy"]}
        axes[0][col].plot(epochs, [h["train_loss"] for h in history[stage]], marker="o")
        names = ", ".join(variants)
        axes[0][col].set_title(names if names == stage else f"{names}\n({stage})", fontsize=9)
        axes[0][col].set_ylabel("train loss" if col == 0 else "")
        for variant, (best, head) in variants.items():
            acc = [h["val_accuracy"][head] for h in history[stage]]
            line, = axes[1][col].plot(epochs, acc, marker="o", label=variant)
            if best in epochs:
                axes[1][col].plot([best], [acc[epochs.index(best)]], marker="*", markersize=15, linestyle="none",
                                  color=line.get_color(), label=f"{variant}: chosen, epoch {best}")
        axes[1][col].set_xlabel("epoch")
        axes[1][col].set_ylabel("val accuracy" if col == 0 else "")
        axes[1][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def pr_curve(p_fake, label) -> tuple[list[float], list[float], float]:
    """(recalls, precisions, average precision) of the fake class over every distinct threshold."""
    order = sorted(range(len(p_fake)), key=lambda i: -float(p_fake[i]))
    pos = sum(int(y) == 1 for y in label)
    recall, precision, tp, ap, prev_r = [0.0], [1.0], 0, 0.0, 0.0
    for k, i in enumerate(order):
        tp += int(label[i]) == 1
        if k + 1 == len(order) or float(p_fake[order[k + 1]]) != float(p_fake[i]):
            r, p = (tp / pos if pos else 0.0), tp / (k + 1)
            ap += (r - prev_r) * p
            recall.append(r)
            precision.append(p)
            prev_r = r
    return recall, precision, ap


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _ordered(scores: dict) -> list[str]:
    return sorted(scores, key=lambda v: REPORT_ORDER.index(v) if v in REPORT_ORDER else 99)


def plot_confusion(scores: dict[str, dict], path) -> bool:
    """One 2x2 confusion matrix (rows true, columns predicted; fake first) per variant, as a PNG."""
    plt = _pyplot()
    if plt is None or not scores:
        return False
    variants = _ordered(scores)
    fig, axes = plt.subplots(1, len(variants), figsize=(2.6 * len(variants), 2.9), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        s = scores[variant]
        c = confusion(s["pred"], s["label"])
        cells = [[c["tp"], c["fn"]], [c["fp"], c["tn"]]]  # rows true fake/real, columns predicted fake/real
        ax.imshow(cells, cmap="Blues", vmin=0, vmax=max(1, max(map(max, cells))))
        for r in range(2):
            for c in range(2):
                dark = cells[r][c] > max(map(max, cells)) / 2
                ax.text(c, r, str(cells[r][c]), ha="center", va="center", fontsize=11,
                        color="white" if dark else "black")
        ax.set_xticks([0, 1], ["fake", "real"])
        ax.set_yticks([0, 1], ["fake", "real"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true" if ax is axes[0][0] else "")
        ax.set_title(variant, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_roc_pr(scores: dict[str, dict], roc_path, pr_path) -> bool:
    """Every variant's ROC curve (with its AUC) and precision-recall curve of the fake class (with its average
    precision), one PNG each."""
    plt = _pyplot()
    if plt is None or not scores:
        return False
    for path, curve, (xl, yl), name in ((roc_path, roc_curve, ("false-positive rate", "true-positive rate"), "AUC"),
                                        (pr_path, pr_curve, ("recall (fake)", "precision (fake)"), "AP")):
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for variant in _ordered(scores):
            x, y, area = curve(scores[variant]["p_fake"].tolist(), scores[variant]["label"].tolist())
            ax.plot(x, y, label=f"{variant} ({name} {area:.3f})", drawstyle="steps-post" if curve is pr_curve
                    else "default")
        if curve is roc_curve:
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return True


def plot_test_figures(scores: dict[str, dict], run_dir) -> list[str]:
    """confusion.png, roc.png and pr.png in ``run_dir`` from each variant's test scores; the names written
    (none without matplotlib)."""
    from pathlib import Path

    run_dir = Path(run_dir)
    written = []
    if plot_confusion(scores, run_dir / "confusion.png"):
        written.append("confusion.png")
    if plot_roc_pr(scores, run_dir / "roc.png", run_dir / "pr.png"):
        written += ["roc.png", "pr.png"]
    return written


def figure_lines(figures: list[str]) -> list[str]:
    titles = {"curves.png": "Training curves", "confusion.png": "Confusion matrices (test)",
              "roc.png": "ROC curves (test, fake = positive)", "pr.png": "Precision-recall curves (test, fake)"}
    return [line for name in figures for line in (f"![{titles.get(name, name)}]({name})", "")]


def timing_table(timings: dict[str, dict]) -> str:
    lines = ["| stage | steps | first step s | steady step ms | compile s (est.) | stage s |",
             "|---|---:|---:|---:|---:|---:|"]
    for stage, t in timings.items():
        lines.append(f"| {stage} | {t['steps']} | {t['first_step_s']:.3f} | {t['steady_step_s'] * 1e3:.1f} | "
                     f"{t['compile_s_est']:.1f} | {t['train_seconds']:.1f} |")
    return "\n".join(lines)


def posts_lines(results: dict) -> list[str]:
    """Which test posts each row was scored on, one line per distinct set."""
    by_posts: dict[str, list[str]] = {}
    for variant in _ordered(results):
        by_posts.setdefault(results[variant].get("posts", "the test split"), []).append(variant)
    return [f"- {', '.join(variants)}: scored on {posts}" for posts, variants in by_posts.items()]


def shared_loss_line(config: dict) -> str:
    if config.get("shared_loss") == "fused+distill":
        return ("cmc-shared loss: fused+distill (CE_fused + CE_T + alpha L_{V->T} + CE_V + beta L_{T->V}; not the "
                "paper's baseline).")
    return ("cmc-shared loss: fused (the paper's CMC-shared baseline: BLOCK over both encoders, trained in one stage "
            "on the fused cross-entropy, no distillation).")


def baseline_lines(results: dict) -> list[str]:
    return [f"The baseline row: TF-IDF ({r['model']}) + logistic regression, fitted on the same fit split and "
            "scored on the same test posts: a text row far below it did not learn the task." for v, r in
            results.items() if r.get("stage") == "baseline"]


def selection_sentence(config: dict, results: dict) -> str:
    """How each row's checkpoint was kept: chosen on the validation split by ``--select-metric``, or, for rows whose
    validation split was under ``--select-min-val`` posts, the last epoch of its stage."""
    metric, seed = config.get("select_metric", "accuracy"), config.get("seed")
    last = {v: r["selection"]["val_posts"] for v, r in results.items() if r.get("selection", {}).get("rule") == "last"}
    if not last:
        return (f"Test metrics of each variant, scored once on the test split with the checkpoint chosen on the "
                f"validation split by {metric} (carved from the training set, seed {seed}). Fake = positive class.")
    chosen = [v for v, r in results.items() if r.get("selection", {}).get("rule") not in (None, "last")]
    kept = ", ".join(f"{v} ({n} posts)" for v, n in last.items())
    return ("Test metrics of each variant, scored once on the test split. The validation split (carved from the "
            f"training set, seed {seed}) is under --select-min-val {config.get('select_min_val')} posts for "
            f"{kept}: too few to choose an epoch on, so {'that row keeps' if len(last) == 1 else 'those rows keep'} "
            "the last epoch of its stage"
            + (f"; {', '.join(chosen)} kept the checkpoint chosen on it by {metric}" if chosen else "")
            + ". Fake = positive class.")


def markdown_report(config: dict, results: dict, data_summary: dict, notes: list[str],
                    timings: dict[str, dict] | None = None, figures: list[str] | None = None,
                    recipe: str | None = None) -> str:
    parts = [
        f"# CMC run: {config.get('dataset')}",
        "",
        selection_sentence(config, results),
        "",
        markdown_table(results),
        "",
        *baseline_lines(results),
        *([recipe, ""] if recipe else []),
        "Posts each row was scored on:",
        "",
        *posts_lines(results),
        "",
        shared_loss_line(config),
        "",
        *(["## Figures", "", *figure_lines(figures)] if figures else []),
        "## Training time",
        "",
        timing_table(timings or {}),
        "",
        "Per-epoch losses and validation accuracies: `curves.png` and `metrics.json` (`history`).",
        "",
        "## Data",
        "",
        "```",
        *[f"{k}: {v}" for k, v in data_summary.items()],
        "```",
        "",
        "## Configuration",
        "",
        "```",
        *[f"{k} = {v}" for k, v in config.items()],
        "```",
    ]
    if notes:
        parts += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(parts) + "\n"
