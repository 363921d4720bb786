"""Text and image encoders. Each returns pooled features [B, out_dim]; heads live in the trainer.

Pretrained weights are only ever read from local files or caches: nothing here downloads. A missing
checkpoint raises ``UsageError`` naming what is missing and the two ways to provide it.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from cmc_fast.errors import UsageError


def _transformers_major() -> int:
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


_TRANSFORMERS_TAKES_4D_MASK = _transformers_major() >= 5


# ------------------------------------------------------------------------------------------- text
class TextEncoder(nn.Module):
    """A Hugging Face encoder. ``pooling``: "pooler" (BERT's pooled output, as the paper), "mean" (masked mean of
    the last hidden states: what a sentence-transformers checkpoint such as all-MiniLM-L6-v2 was trained for, and
    the better choice for a randomly initialised model) or "cls" (the first token's last hidden state).
    ``pooling_source`` says where the choice came from, for the report."""

    def __init__(self, model: nn.Module, pooling: str = "pooler", pooling_source: str = ""):
        super().__init__()
        self.model, self.pooling, self.pooling_source = model, pooling, pooling_source
        self.out_dim = int(model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=self._attention_bias(attention_mask))
        if self.pooling == "pooler" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def _attention_bias(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """For SDPA attention, the 4D boolean mask [B, 1, 1, L] (True: attend) that transformers would build,
        passed ready-made: given the 2D mask, transformers checks ``mask.all()`` on the host every forward to
        skip it, a device sync per step on a GPU. transformers 4 accepts only 2D/3D masks: it gets the 2D one."""
        if (not _TRANSFORMERS_TAKES_4D_MASK or attention_mask.dim() != 2
                or getattr(self.model.config, "_attn_implementation", None) != "sdpa"):
            return attention_mask
        return attention_mask.bool()[:, None, None, :]


def tiny_text_encoder(vocab_size: int, max_len: int, dim: int = 64, layers: int = 2,
                      dropout: float = 0.1) -> TextEncoder:
    """A small BERT, randomly initialised, for tests, the synthetic job and from-scratch baselines."""
    from transformers import BertConfig, BertModel

    heads = max(1, dim // 32)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=dim * 2, max_position_embeddings=max(max_len, 8), hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, pad_token_id=0)
    return TextEncoder(BertModel(cfg, add_pooling_layer=False), pooling="mean")


class NgramEncoder(nn.Module):
    """fastText-style bag of token n-grams (Joulin et al. 2017): unigram embeddings plus hashed bigram and
    trigram buckets, mean-pooled over the real tokens. A strong from-scratch baseline for short posts (it is
    what character n-gram TF-IDF + logistic regression is to a linear model), and cheap on a CPU."""

    def __init__(self, vocab_size: int, dim: int = 128, buckets: int = 1 << 16, dropout: float = 0.3):
        super().__init__()
        self.vocab_size, self.buckets = vocab_size, buckets
        self.embed = nn.EmbeddingBag(vocab_size + buckets, dim, mode="sum")
        self.dropout = nn.Dropout(dropout)
        self.out_dim = dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids, mask = input_ids, attention_mask.bool()
        # hashed n-grams of consecutive real tokens, offset past the unigram rows
        bi = (ids[:, :-1] * 1000003 + ids[:, 1:]) % self.buckets + self.vocab_size
        tri = (ids[:, :-2] * 1000003 * 1000003 + ids[:, 1:-1] * 1000003 + ids[:, 2:]) % self.buckets + self.vocab_size
        grams = torch.cat([ids, bi, tri], dim=1)
        keep = torch.cat([mask, mask[:, :-1] & mask[:, 1:], mask[:, :-2] & mask[:, 1:-1] & mask[:, 2:]], dim=1)
        weights = keep.float() / keep.sum(1, keepdim=True).clamp_min(1).float()
        return self.dropout(self.embed(grams, per_sample_weights=weights))


def _missing_text_model(name: str, why: str) -> UsageError:
    return UsageError(
        f"--text-model: no local checkpoint for {name!r} ({why}). Provide it one of two ways: pass a local "
        f"directory holding config.json, the weights and the tokenizer (--text-model /path/to/{Path(name).name}), "
        f"or put the hub id in the Hugging Face cache on a machine with network (huggingface-cli download {name}) "
        f"and copy the cache to $HF_HOME here. Use --text-model tiny for a small randomly initialised BERT.")


@contextlib.contextmanager
def _quiet_hub_loading():
    """transformers' "Loading weights" bar off while a model loads (it prints off a terminal too)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _checkpoint_file(source: str, relative: str) -> Path | None:
    """``relative`` inside a local checkpoint directory or a cached hub id's snapshot, where present."""
    if Path(source).is_dir():
        path = Path(source) / relative
        return path if os.path.lexists(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, relative)
    except Exception:  # noqa: BLE001 - a malformed id, or no huggingface_hub: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def declared_pooling(source: str) -> tuple[str, str] | None:
    """The pooling a sentence-transformers checkpoint declares, as (pooling, why): its modules.json names a Pooling
    module whose config.json asks for the mean (``pooling_mode_mean_tokens``) or the first token
    (``pooling_mode_cls_token``). None where it declares none, or another mode (max, ...), which is not built here.
    Both files are read as bounded JSON; a Pooling path leaving the checkpoint is refused."""
    from cmc_fast.data_pipeline import safe_io

    modules_file = _checkpoint_file(source, "modules.json")
    if modules_file is None:
        return None
    try:
        modules = safe_io.read_json(modules_file)
        pooling = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")),
                       None) if isinstance(modules, list) else None
        if pooling is None:
            return None
        folder = Path(str(pooling.get("path", "")))
        if folder.is_absolute() or ".." in folder.parts:
            raise safe_io.FileRefused(f"{modules_file}: the Pooling module's path {str(folder)!r} leaves the "
                                      "checkpoint")
        config_file = _checkpoint_file(source, str(folder / "config.json"))
        conf = safe_io.read_json(config_file) if config_file is not None else {}
    except safe_io.FileRefused as exc:
        raise UsageError(f"--text-model: {exc}") from None
    if not isinstance(conf, dict):
        raise UsageError(f"--text-model: {config_file}: expected a JSON object of pooling settings")
    for key, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls")):
        if conf.get(key) is True:
            return mode, f"declared by {config_file}"
    return None


def load_text_model(name: str, pooling: str = "auto") -> tuple[TextEncoder, object]:
    """(encoder, tokenizer) from a local directory or a hub id already in the local cache. Offline only.
    ``pooling`` "auto": the checkpoint's declared pooling (``declared_pooling``), else BERT's pooler output."""
    from transformers import AutoModel, AutoTokenizer

    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.is_dir():
        raise _missing_text_model(name, f"directory {local} does not exist")
    # a hub id whose config.json is not in the local cache: transformers would answer with a hub-connection error
    if not local.is_dir() and _checkpoint_file(name, "config.json") is None:
        if "/" in name:
            raise _missing_text_model(name, "not in the local Hugging Face cache, and nothing is downloaded")
        close = difflib.get_close_matches(name, ("tiny", "ngram"), n=1)
        raise UsageError(f"--text-model {name}: unknown model{f' (did you mean {close[0]}?)' if close else ''}; "
                         "choose tiny (a small BERT trained from scratch), ngram (a bag of n-grams), a local "
                         "directory holding config.json, the weights and the tokenizer, or a hub id already in the "
                         "local Hugging Face cache (nothing is downloaded)")
    source = str(local) if local.is_dir() else name
    try:
        # a local directory is a file the user supplies: no code of its own runs, a .bin loads pickle-free
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        # float32 whatever the checkpoint's dtype (transformers 5 would keep an fp16/bf16 checkpoint's): the heads
        # are float32, and --amp, not the file, decides the compute dtype
        with _quiet_hub_loading():
            model, loading = AutoModel.from_pretrained(source, local_files_only=True, dtype=torch.float32,
                                                       trust_remote_code=False, weights_only=True,
                                                       output_loading_info=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:  # a weights file that is not plain tensors
        from cmc_fast.checkpoint import load_error_reason

        raise UsageError(f"--text-model: {source}: its weights cannot be loaded ({load_error_reason(exc)})") from None
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _missing_text_model(name, first[:200]) from None
    if pooling != "auto":
        chosen = (pooling, "as configured: --text-pooling, or the run's config.json")
    elif getattr(model, "pooler", None) is None or any(k.startswith("pooler.") for k in loading["missing_keys"]):
        # DistilBERT has none; a BERT saved without one gets a randomly initialised pooler from transformers
        chosen = declared_pooling(source) or ("mean", "the checkpoint has no trained pooler layer")
    else:
        chosen = declared_pooling(source) or ("pooler", "BERT's pooled output: the checkpoint declares no pooling")
    return TextEncoder(model, pooling=chosen[0], pooling_source=chosen[1]), tokenizer


# ------------------------------------------------------------------------------------------ image
class TinyCNN(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width // 2, width, width * 2):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


class TorchvisionEncoder(nn.Module):
    """VGG19 (flattened pool5, the authors' feature) or ResNet-50 (global-average-pooled)."""

    def __init__(self, name: str, image_size: tuple[int, int]):
        super().__init__()
        import torchvision

        self.name = name
        if name == "vgg19":
            self.net = torchvision.models.vgg19(weights=None).features
            self.out_dim = 512 * (image_size[0] // 32) * (image_size[1] // 32)
        elif name == "resnet50":
            net = torchvision.models.resnet50(weights=None)
            net.fc = nn.Identity()
            self.net, self.out_dim = net, 2048
        else:
            raise UsageError(f"--image-model: unknown model {name!r}; choose one of tiny, vgg19, resnet50")
        if self.out_dim == 0:
            raise UsageError(f"--image-size {image_size} is too small for vgg19 (needs H, W >= 32)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


_TORCHVISION_WEIGHTS = {"vgg19": "VGG19_Weights.IMAGENET1K_V1", "resnet50": "ResNet50_Weights.IMAGENET1K_V1"}


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet checkpoint of ``name`` ($TORCH_HOME/hub/checkpoints/...)."""
    import torchvision

    url = torchvision.models.get_weight(_TORCHVISION_WEIGHTS[name]).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_weights(path: Path) -> dict:
    """A state dict read pickle-free; anything else (junk, a pickle of Python objects) is our one-line error,
    never torch's advice to retry with weights_only=False."""
    from cmc_fast.checkpoint import load_error_reason

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, the answer names it
        raise UsageError(f"--image-weights: {path} is not a PyTorch weights file ({load_error_reason(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--image-weights: {path} is not a state dict of tensors")
    return state


def build_image_encoder(name: str, weights: str | None, image_size: tuple[int, int]) -> nn.Module:
    if name == "tiny":
        if weights not in (None, "", "none"):
            raise UsageError("--image-weights: the tiny CNN has no pretrained weights; pass --image-weights none")
        return TinyCNN()
    encoder = TorchvisionEncoder(name, image_size)
    if weights in (None, "", "none"):
        return encoder
    path = imagenet_weights_path(name) if weights == "imagenet" else Path(weights).expanduser()
    if not path.is_file():
        raise UsageError(
            f"--image-weights: {name} ImageNet weights not found at {path}. Provide them one of two ways: copy "
            f"torchvision's file {path.name} into {path.parent} (TORCH_HOME), or pass --image-weights "
            f"/path/to/file.pth; --image-weights none trains from random init.")
    state = _load_weights(path)
    # torchvision checkpoints hold the whole classifier; keep the convolutional trunk we use.
    if name == "vgg19":
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        missing, _ = encoder.net.load_state_dict(state, strict=False)
    else:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, _ = encoder.net.load_state_dict(state, strict=False)
    if missing:
        raise UsageError(f"--image-weights: {path} is not a {name} checkpoint (missing {missing[:3]}...)")
    return encoder
