"""``cmc-fast tsne --run DIR [--split test]``: the paper's Fig. 2, features of the fine-tuned models against CMC's.

For the posts of a split whose image decodes (at most ``--max-points``, a seeded sample), each model's pooled text
and image features (what its heads and BLOCK read) are embedded in 2-D by t-SNE and drawn coloured by label:

    columns   fine-tuned (finetune-t's text network, finetune-v's image network) | CMC (stage 1's two networks)
    rows      text features | image features | both modalities in one space

The last row places text and image features in one t-SNE, each modality's features L2-normalised; for CMC they
first go through stage 1's projections into the space the cross-modal NCE aligns (``embed_t``, ``embed_v``, the
paper's phi1 / phi2). The fine-tuned networks have no such space: their features are embedded as they are (both
rows need equal widths; with different widths that panel is left out and says so).

Writes ``tsne.png`` and ``tsne.json`` (ids, labels and every panel's 2-D points) under ``--out`` (default the run
directory). Needs scikit-learn and matplotlib: ``pip install 'cmc-fast[plots]'``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmc_fast.checkpoint import load_checkpoint, write_json
from cmc_fast.checkpoint_manager import CheckpointManager
from cmc_fast.config import read_run_config
from cmc_fast.detector import Detector
from cmc_fast.errors import UsageError

MODELS = {"fine-tuned": ("finetune-t", "finetune-v"), "CMC": ("cmc-t", "cmc-v")}
ROWS = ("text", "image", "shared")
_MISSING = ("cmc-fast tsne needs scikit-learn (TSNE) and matplotlib: pip install 'cmc-fast[plots]' "
            "(or pip install scikit-learn matplotlib)")


def require_plots():
    """scikit-learn's TSNE and pyplot, or a UsageError saying how to install them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.manifold import TSNE
    except ImportError as exc:
        raise UsageError(f"{_MISSING} ({exc})") from None
    return TSNE, plt


def split_posts(cfg, split: str, max_points: int, seed: int) -> list:
    """The run's records of ``split`` (train: the published training split, validation included), a seeded
    sample of at most ``max_points`` in their original order."""
    from cmc_fast.data_pipeline.registry import load_dataset

    try:
        ds = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed, n_train=cfg.synthetic_train,
                          n_test=cfg.synthetic_test)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--run: the run's data cannot be read ({exc})") from None
    records = ds.test if split == "test" else ds.train
    if len(records) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(records), max_points, replace=False))
        records = [records[i] for i in keep]
    return records


def _projections(run_dir: Path) -> tuple[dict, dict] | None:
    """Stage 1's NCE projections (embed_t from the text head's best checkpoint, embed_v from the image head's)."""
    out = []
    for head, name in (("text", "embed_t"), ("image", "embed_v")):
        path = CheckpointManager(run_dir / "checkpoints", "stage1").best_path(head)
        if not os.path.lexists(path):
            return None
        distiller = load_checkpoint(path)["modules"].get("distiller", {})
        if f"{name}.weight" not in distiller:
            return None
        out.append({"weight": distiller[f"{name}.weight"], "bias": distiller[f"{name}.bias"]})
    return out[0], out[1]


def model_features(run_dir: Path, model: str, records: list, device: str) -> dict[str, np.ndarray] | None:
    """{"text", "image", "ok"} for one column (None when the run lacks its variants); features of the posts
    whose image decoded."""
    text_variant, image_variant = MODELS[model]
    try:
        text_det = Detector.from_run(run_dir, text_variant, device=device)
        image_det = Detector.from_run(run_dir, image_variant, device=device)
    except UsageError:
        return None
    texts, images = [r.text for r in records], [r.image_paths[0] if r.image_paths else None for r in records]
    _, v_feat, ok = image_det.features(texts, images)
    t_feat, _, _ = text_det.features(texts, images)
    if v_feat is None:
        return None
    text, image = t_feat[torch.from_numpy(ok)], v_feat
    proj = _projections(run_dir) if model == "CMC" else None
    if proj is not None:  # the space the NCE aligns
        text, image = F.linear(text, **proj[0]), F.linear(image, **proj[1])
    text, image = F.normalize(text, dim=1), F.normalize(image, dim=1)
    width = max(text.shape[1], image.shape[1])  # the fine-tuned networks share no space: embedded as they are,
    text, image = F.pad(text, (0, width - text.shape[1])), F.pad(image, (0, width - image.shape[1]))  # zero-padded
    shared = torch.cat([text, image]).numpy()
    return {"text": t_feat[torch.from_numpy(ok)].numpy(), "image": v_feat.numpy(), "shared": shared, "ok": ok}


def embed(TSNE, feats: np.ndarray, seed: int) -> np.ndarray:
    perplexity = float(min(30.0, max(2.0, (len(feats) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)


def draw(plt, panels: dict, labels: np.ndarray, path: Path, title: str) -> None:
    models = [m for m in MODELS if m in panels]
    fig, axes = plt.subplots(len(ROWS), len(models), figsize=(4.2 * len(models), 3.8 * len(ROWS)), squeeze=False)
    colours = {1: ("tab:red", "fake"), 0: ("tab:blue", "real")}
    for col, model in enumerate(models):
        for row, kind in enumerate(ROWS):
            ax, points = axes[row][col], panels[model].get(kind)
            ax.set_title(f"{model}: {'text + image (o text, ^ image)' if kind == 'shared' else kind} features",
                         fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            pts, n = np.asarray(points), len(labels)
            groups = [(pts[:n], "o"), (pts[n:], "^")] if kind == "shared" else [(pts, "o")]
            for part, marker in groups:
                for value, (colour, name) in colours.items():
                    sel = labels == value
                    ax.scatter(part[sel, 0], part[sel, 1], s=9, c=colour, marker=marker, alpha=0.7,
                               label=name if marker == "o" else None)
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_tsne(run_dir: str | Path, split: str = "test", out: str | Path | None = None, *, max_points: int = 1000,
              seed: int = 0, device: str = "auto") -> tuple[Path, Path]:
    """Write ``tsne.png`` and ``tsne.json`` for the run; returns their paths."""
    TSNE, plt = require_plots()
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, "--run")
    records = split_posts(cfg, split, max_points, seed)
    panels, ok = {}, None
    for model in MODELS:
        feats = model_features(run_dir, model, records, device)
        if feats is None:
            continue
        if ok is not None and not np.array_equal(ok, feats["ok"]):
            raise RuntimeError("the fine-tuned and CMC image networks decoded different posts")  # same files
        ok = feats["ok"]
        panels[model] = {k: None if feats[k] is None else embed(TSNE, feats[k], seed).tolist() for k in ROWS}
    if not panels:
        raise UsageError(f"--run: {run_dir} has neither finetune-t + finetune-v nor cmc-t + cmc-v checkpoints to "
                         f"draw (train with --variant all)")
    kept = [r for r, good in zip(records, ok) if good]
    if len(kept) < 5:
        raise UsageError(f"--split {split}: only {len(kept)} posts with a decodable image; t-SNE needs at least 5")
    labels = np.array([r.label for r in kept])
    out_dir = Path(out) if out else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    png, js = out_dir / "tsne.png", out_dir / "tsne.json"
    draw(plt, panels, labels, png, f"t-SNE of {split} features, {cfg.dataset} ({len(kept)} posts with an image)")
    write_json({"split": split, "posts": len(kept), "ids": [r.id for r in kept], "labels": labels.tolist(),
                "rows": list(ROWS), "shared_rows": "text points first, then image points (same order as ids)",
                "panels": panels}, js)
    return png, js
