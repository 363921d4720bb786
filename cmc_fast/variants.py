"""The variants of a run, defined once: what ``--variant`` accepts, the stage whose head scores each one, the
networks a detector loads for it, and the order of the results table.

    finetune-t       the text network alone, fine-tuned                 stage finetune-t, head text
    finetune-t-all   finetune-t trained and scored on every post        stage finetune-t-all (comes with finetune-t
                     when some posts have no image; row "finetune-t (all posts)")
    finetune-v       the image network alone                            stage finetune-v, head image
    cmc-t / cmc-v    stage 1's text / image network (mutual NCE)        stage stage1, heads text / image
    cmc-shared       both encoders and BLOCK trained in one stage       stage cmc-shared, head fused
    cmc              stage 1's networks frozen, BLOCK on their features stage stage2 after stage1, head fused
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Part:
    """Where a network of a trained variant is read from: ``stage``'s best checkpoint of ``head``, module
    ``module`` in it."""

    stage: str
    head: str
    module: str


@dataclass(frozen=True)
class Variant:
    name: str  # as --variant, checkpoints and bundles name it
    row: str  # its row in the results table
    stages: tuple[str, ...]  # the stages that train it, in order; the last one's ``head`` scores it
    head: str
    parts: MappingProxyType  # part ("text", "image", "block") -> Part: the networks a detector loads
    uses_images: bool  # trained on the posts with an image (cmc-t too: stage 1 trains both networks)
    selectable: bool = True  # a --variant choice (finetune-t-all comes with finetune-t)
    text_branch: str | None = None  # what a post scored by its text branch alone is reported as

    @property
    def stage(self) -> str:
        return self.stages[-1]


def _variant(name: str, stages: tuple[str, ...], head: str, parts: dict[str, tuple[str, str, str]], *,
             row: str | None = None, text_only: bool = False, selectable: bool = True,
             text_branch: str | None = None) -> Variant:
    return Variant(name, row or name, stages, head, MappingProxyType({k: Part(*v) for k, v in parts.items()}),
                   not text_only, selectable, text_branch)


_STAGE1_NETS = {"text": ("stage1", "text", "text"), "image": ("stage1", "image", "image")}

# in the results table's order
VARIANTS: MappingProxyType = MappingProxyType({v.name: v for v in (
    _variant("finetune-t", ("finetune-t",), "text", {"text": ("finetune-t", "text", "net")}, text_only=True),
    _variant("finetune-t-all", ("finetune-t-all",), "text", {"text": ("finetune-t-all", "text", "net")},
             row="finetune-t (all posts)", text_only=True, selectable=False),
    _variant("finetune-v", ("finetune-v",), "image", {"image": ("finetune-v", "image", "net")}),
    _variant("cmc-t", ("stage1",), "text", {"text": _STAGE1_NETS["text"]}),
    _variant("cmc-v", ("stage1",), "image", {"image": _STAGE1_NETS["image"]}),
    _variant("cmc-shared", ("cmc-shared",), "fused",
             {part: ("cmc-shared", "fused", part) for part in ("text", "image", "block")},
             text_branch="cmc-shared text branch"),
    _variant("cmc", ("stage1", "stage2"), "fused", {**_STAGE1_NETS, "block": ("stage2", "fused", "block")},
             text_branch="cmc-t"),
)})
CHOICES: tuple[str, ...] = tuple(name for name, v in VARIANTS.items() if v.selectable)  # --variant's names
BASELINE_ROW = "baseline: tf-idf + logistic regression"
ALL_POSTS_ROW = VARIANTS["finetune-t-all"].row
REPORT_ORDER: tuple[str, ...] = (*(v.row for v in VARIANTS.values()), BASELINE_ROW)
# build_stage's stage names, each with the variant a run of it trains
STAGE_VARIANT: MappingProxyType = MappingProxyType(
    {stage: next(v.name for v in VARIANTS.values() if v.selectable and v.stage == stage)
     for stage in dict.fromkeys(v.stage for v in VARIANTS.values() if v.selectable)})


def by_row(name: str) -> Variant | None:
    """The variant of a name or a table row (``finetune-t (all posts)``), or None."""
    return VARIANTS.get(name) or next((v for v in VARIANTS.values() if v.row == name), None)


def rows_of(stage: str) -> dict[str, str]:
    """head -> row, for every variant ``stage`` scores."""
    return {v.head: v.row for v in VARIANTS.values() if v.stage == stage}
