"""Readable reports: the results table in the paper's Table 2/3 form, as Markdown and for the terminal."""

from __future__ import annotations

from cmc_fast.config import VARIANTS

_HEAD = ["Variant", "Accuracy", "Fake P", "Fake R", "Fake F1", "Real P", "Real R", "Real F1", "n test", "val acc",
         "time s"]
_KEYS = ["accuracy", "fake_precision", "fake_recall", "fake_f1", "real_precision", "real_recall", "real_f1"]


def _rows(results: dict) -> list[list[str]]:
    rows = []
    for variant in sorted(results, key=lambda v: VARIANTS.index(v) if v in VARIANTS else 99):
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


def markdown_report(config: dict, results: dict, data_summary: dict, notes: list[str]) -> str:
    parts = [
        f"# CMC run: {config.get('dataset')}",
        "",
        "Test metrics of each variant, scored once on the test split with the checkpoint chosen on the "
        "validation split (carved from the training set, seed "
        f"{config.get('seed')}). Fake = positive class.",
        "",
        markdown_table(results),
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
