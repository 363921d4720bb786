"""Training recipes per encoder kind: the optimisation values that make each kind of encoder learn, chosen by
default. A randomly initialised bag of n-grams needs a learning rate a thousand times a pretrained BERT's, and a
few hundred articles at batch 32 are a handful of optimiser steps a pass: the dataset presets carry dataset facts
(which encoders, K, text length), a recipe carries how to train the encoders a run actually uses.

Precedence, lowest first: the Config defaults, the dataset preset, the recipe of the run's encoder kinds, a
``--config`` file, the flags typed. A preset's own values win over the recipe where the preset names the encoder
the run uses (its values were tuned for it: the synthetic preset's tiny models, the authors' BERT length).
``--recipe none`` keeps the preset and the defaults only. ``--epochs`` given without ``--min-steps`` drops the
recipe's minimum steps (the epochs asked for are the epochs that run); ``--epochs`` or ``--min-steps`` given
drops the recipe's ``max_epochs``. A recipe's learning rate is a step for its optimiser: the n-gram bag has a
recipe per optimiser, which ``--text-optimizer`` picks; for the other kinds an optimiser other than the recipe's is
refused without ``--text-lr``.

Data size: a recipe's ``min_steps`` raises a stage's epochs on a small fit set, up to its ``max_epochs``: the
steps a few thousand posts take in a few passes, without tens of passes over a few hundred posts (PolitiFact's
172 fit posts at batch 32 are 5 steps a pass). The n-gram bag's optimiser follows the size of the training split
(``NGRAM_SGD_MIN_POSTS``): the CLI configures such a run again once its data is read (``sized_by_data``), before
its config.json is written.

    text kinds   ngram (Adam: under NGRAM_SGD_MIN_POSTS training posts), ngram-sgd (that many or more, or
                 --text-optimizer sgd), tiny, tiny+mlm (--text-pretrain-epochs > 0), pretrained (a Hugging Face
                 model)
    image kinds  cnn-scratch (--image-model tiny or --image-weights none), cnn-pretrained
"""

from __future__ import annotations

import dataclasses

from cmc_fast.config import PRESETS, Config, preset
from cmc_fast.errors import UsageError

TEXT_RECIPES: dict[str, dict] = {
    # a hashed n-gram bag from scratch, trained by one of two optimisers chosen by the size of the training split
    # (``NGRAM_SGD_MIN_POSTS``), each sampling every near-duplicate story once an epoch (+1.8 points of Weibo test
    # accuracy on two seeds, bench/results/weibo-text-sweep-cpu.md).
    # Few posts: Adam with a large step and enough steps for the embeddings to move. On PolitiFact's 172 long
    # articles fastText's SGD moves each n-gram too little (a mean over ~1500 n-grams, 5 steps a pass: 0.67-0.85 at
    # steps 5-50, Adam 0.90).
    "ngram": dict(text_lr=1e-2, epochs=6, min_steps=150, group_sampling=1.0),
    # Many posts: fastText's SGD with a linearly decaying step, whose mean-pooled gradient moves each n-gram in
    # proportion to how often it occurs. On Weibo's 6778 fit posts Adam's per-weight step let rare n-grams memorise
    # the fit set (training loss 0 by pass 2, 0.787 on test); SGD scores 0.817 (bench/results/quality-text-cpu.md)
    "ngram-sgd": dict(text_optimizer="sgd", text_lr=5.0, lr_schedule="linear", epochs=8, group_sampling=1.0),
    # a tiny BERT from scratch (bench/results/weibo-finetune-t-*-cpu.md), with or without masked-LM pre-training:
    # 300 steps where the fit set has them in a few passes, at most 15 passes on a small one (300 steps were 60
    # passes over PolitiFact's 172 posts); 256 tokens, the head and tail of an article, which halve the cost of
    # the 512 the English presets keep for BERT
    "tiny": dict(text_lr=1e-3, lr_schedule="linear", epochs=8, min_steps=300, max_epochs=15, max_len=256),
    "tiny+mlm": dict(text_lr=1e-3, lr_schedule="linear", epochs=8, min_steps=300, max_epochs=15, max_len=256),
    # fine-tuning a pretrained transformer (Devlin et al. 2019; Mosbach et al. 2021 on small data: more steps, a
    # warm-up, bias-corrected AdamW): a few passes, at least 100 optimiser steps but no more than 6 passes, linear
    # warm-up and decay; batches of 16 give a small fit set twice the steps for the same compute. 1e-4, twice
    # BERT's usual step: at 5e-5 MiniLM's training loss on PolitiFact's 172 posts was still 0.51 after 50 steps
    # (bench/results/quality-text-cpu.md, whose notes also say why MiniLM stays under TF-IDF there)
    "pretrained": dict(text_lr=1e-4, lr_schedule="linear", warmup=0.1, text_weight_decay=0.01, batch_size=16,
                       epochs=3, min_steps=100, max_epochs=6, max_len=256),
}
# the n-gram recipe's SGD from this many posts in the training split (before the validation split is carved out):
# between the sizes measured, PolitiFact's 192 (Adam better) and Weibo's 7531 (SGD better); sizes in between were
# not measured. A --text-optimizer you type picks the n-gram recipe of that optimiser whatever the size.
NGRAM_SGD_MIN_POSTS = 2000
IMAGE_RECIPES: dict[str, dict] = {
    "cnn-pretrained": dict(image_lr=3e-4),  # the authors' SGD step for ImageNet VGG19
    "cnn-scratch": dict(image_lr=0.03),
}


def text_kind(cfg: Config, train_posts: int | None = None, optimizer: str | None = None) -> str:
    """The text recipe's name for ``cfg``'s encoder; the n-gram bag's follows ``optimizer`` (the one typed) or else
    ``train_posts`` (None: the data not yet read, so the few-posts recipe until the CLI configures again)."""
    if cfg.text_model == "ngram":
        if optimizer:
            return "ngram-sgd" if optimizer == "sgd" else "ngram"
        return "ngram-sgd" if train_posts is not None and train_posts >= NGRAM_SGD_MIN_POSTS else "ngram"
    if cfg.text_model == "tiny":
        return "tiny+mlm" if cfg.text_pretrain_epochs else "tiny"
    return "pretrained"


def image_kind(cfg: Config) -> str:
    weights = cfg.image_weights
    scratch = cfg.image_model == "tiny" or weights is None or (isinstance(weights, str) and weights.lower() == "none")
    return "cnn-scratch" if scratch else "cnn-pretrained"


def configure(dataset: str, user: dict | None = None, train_posts: int | None = None) -> tuple[Config, dict]:
    """The run's Config (not yet validated) from the dataset's preset, the recipe of its encoder kinds and
    ``user`` (the keys of ``--config`` and the flags typed, which always win), and the recipe that ran, for the
    report (``describe``). ``train_posts``: the size of the training split where the data has been read (the
    n-gram recipe follows it)."""
    user = dict(user or {})
    base = preset(dataset)
    tuned = set(PRESETS.get(dataset, {}))
    probe = dataclasses.replace(base, **user)
    kinds = {"text": text_kind(probe, train_posts, user.get("text_optimizer")), "image": image_kind(probe)}
    if probe.recipe == "none":
        return probe, _description(kinds, {}, {}, user, train_posts)
    same_encoder = {"text": base.text_model == probe.text_model,
                    "image": (base.image_model, base.image_weights) == (probe.image_model, probe.image_weights)}
    text_recipe = TEXT_RECIPES[kinds["text"]]
    recipe_optimizer = text_recipe.get("text_optimizer", "adam")
    if "text_lr" in text_recipe and "text_lr" not in user and user.get("text_optimizer", recipe_optimizer) != (
            recipe_optimizer):
        raise UsageError(f"--text-optimizer {user['text_optimizer']}: the {kinds['text']} recipe's text_lr "
                         f"{text_recipe['text_lr']} is a step for {recipe_optimizer}; give --text-lr with it")
    applied, kept = {}, {}
    for side, table in (("image", IMAGE_RECIPES), ("text", TEXT_RECIPES)):
        for key, value in table[kinds[side]].items():
            # epochs you give are the epochs that run: the recipe's minimum steps would raise them; minimum steps
            # you give are reached whatever the recipe's cap on epochs
            if key in user or (key == "min_steps" and "epochs" in user) or (
                    key == "max_epochs" and ({"epochs", "min_steps"} & set(user))):
                continue
            if same_encoder[side] and key in tuned:
                kept[key] = getattr(base, key)
            else:
                applied[key] = value
    return dataclasses.replace(base, **applied, **user), _description(kinds, applied, kept, user, train_posts)


def sized_by_data(cfg: Config) -> bool:
    """Whether ``configure``'s choice for ``cfg`` may change once the training split's size is known."""
    return cfg.recipe != "none" and cfg.text_model == "ngram"


ENCODER_KEYS = ("text_model", "text_pretrain_epochs", "image_model", "image_weights", "recipe")


def recipe_base(cfg: Config) -> Config:
    """What ``configure`` gives for ``cfg``'s dataset and encoders alone: the values a command reproducing
    ``cfg`` need not spell out."""
    return configure(cfg.dataset, {k: getattr(cfg, k) for k in ENCODER_KEYS})[0]


def _description(kinds: dict, applied: dict, kept: dict, user: dict, train_posts: int | None) -> dict:
    # what you typed of any recipe's keys or the optimiser's: the report says which optimiser ran and with what step
    recipe_keys = {k for table in (*TEXT_RECIPES.values(), *IMAGE_RECIPES.values()) for k in table}
    recipe_keys |= {"text_optimizer", "text_momentum"}
    return {"text_kind": kinds["text"], "image_kind": kinds["image"], "from_recipe": applied,
            "from_preset": kept, "from_user": {k: v for k, v in user.items() if k in recipe_keys},
            "train_posts": train_posts}


def describe(recipe: dict | None, cfg: Config) -> str:
    """One line of the report: the encoder kinds and where each recipe value came from."""
    if not recipe:
        return (f"Recipe: text {text_kind(cfg, optimizer=cfg.text_optimizer)}, image {image_kind(cfg)}; values as "
                f"saved in config.json (text_lr {cfg.text_lr}, epochs {cfg.epochs}, min_steps {cfg.min_steps}).")

    def fmt(values: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in values.items())

    why = ""
    if recipe["text_kind"].startswith("ngram") and "text_optimizer" not in recipe.get("from_user", {}):
        posts = recipe.get("train_posts")
        relation = ">=" if recipe["text_kind"] == "ngram-sgd" else "<"  # text_kind compared the size already
        why = f" ({posts} training posts, {relation} {NGRAM_SGD_MIN_POSTS})" if posts is not None else ""
    parts = [f"Recipe: text {recipe['text_kind']}{why}, image {recipe['image_kind']}"]
    for key, what in (("from_recipe", "from the recipe"), ("from_preset", "kept from the dataset preset (tuned for "
                                                                          "this encoder)"),
                      ("from_user", "given by you")):
        if recipe.get(key):
            parts.append(f"{what}: {fmt(recipe[key])}")
    if len(parts) == 1:
        parts.append("--recipe none: the preset and defaults only")
    return "; ".join(parts) + "."
