"""Readable reports: the results table in the paper's Table 2/3 form, as Markdown and for the terminal."""

from __future__ import annotations

from cmc_fast.config import VARIANTS

_HEAD = ["Variant", "Accuracy", "Fake P", "Fake R", "Fake F1", "Real P", "Real R", "Real F1", "n test", "val acc",
         "time s"]
# the text-only row on all posts sits under finetune-t
_ORDER = [*VARIANTS[:1], "finetune-t (all posts)", *VARIANTS[1:]]
_KEYS = ["accuracy", "fake_precision", "fake_recall", "fake_f1", "real_precision", "real_recall", "real_f1"]


def _rows(results: dict) -> list[list[str]]:
    rows = []
    for variant in sorted(results, key=lambda v: _ORDER.index(v) if v in _ORDER else 99):
        r = results[variant]
        test = r.get("test", {})
        rows.append([variant] + [f"{test.get(k, float('nan')):.3f}" for k in _KEYS]
                    + [str(test.get("n", "")), f"{r.get('val_accuracy', float('nan')):.3f}",
                       f"{r.get('train_seconds', float('nan')):.1f}"])
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


def plot_history(history: dict[str, list[dict]], path) -> bool:
    """Per-stage training loss and validation accuracy by epoch, as a PNG. False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    stages = [s for s, h in history.items() if h]
    if not stages:
        return False
    fig, axes = plt.subplots(2, len(stages), figsize=(3.6 * len(stages), 5.5), squeeze=False)
    for col, stage in enumerate(stages):
        epochs = [h["epoch"] for h in history[stage]]
        axes[0][col].plot(epochs, [h["train_loss"] for h in history[stage]], marker="o")
        axes[0][col].set_title(stage)
        axes[0][col].set_ylabel("train loss" if col == 0 else "")
        for head in history[stage][0]["val_accuracy"]:
            axes[1][col].plot(epochs, [h["val_accuracy"][head] for h in history[stage]], marker="o", label=head)
        axes[1][col].set_xlabel("epoch")
        axes[1][col].set_ylabel("val accuracy" if col == 0 else "")
        axes[1][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


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
    for variant in sorted(results, key=lambda v: _ORDER.index(v) if v in _ORDER else 99):
        by_posts.setdefault(results[variant].get("posts", "the test split"), []).append(variant)
    return [f"- {', '.join(variants)}: scored on {posts}" for posts, variants in by_posts.items()]


def shared_loss_line(config: dict) -> str:
    if config.get("shared_loss") == "fused+distill":
        return ("cmc-shared loss: fused+distill (CE_fused + CE_T + alpha L_{V->T} + CE_V + beta L_{T->V}; not the "
                "paper's baseline).")
    return ("cmc-shared loss: fused (the paper's CMC-shared baseline: BLOCK over both encoders, trained in one stage "
            "on the fused cross-entropy, no distillation).")


def markdown_report(config: dict, results: dict, data_summary: dict, notes: list[str],
                    timings: dict[str, dict] | None = None) -> str:
    parts = [
        f"# CMC run: {config.get('dataset')}",
        "",
        "Test metrics of each variant, scored once on the test split with the checkpoint chosen on the "
        "validation split (carved from the training set, seed "
        f"{config.get('seed')}). Fake = positive class.",
        "",
        markdown_table(results),
        "",
        "Posts each row was scored on:",
        "",
        *posts_lines(results),
        "",
        shared_loss_line(config),
        "",
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
