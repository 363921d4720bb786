"""Readers for the real dataset layouts. Each returns ``DatasetSplits``; see each module's docstring for
the layout it expects and what it does with bad input (``skipped`` with ``file:line`` and a reason)."""

from __future__ import annotations

from .common import DatasetWarning, drop_posts_without_images, has_local_image, parse_label
from .fakenewsnet import read_fakenewsnet
from .manifest import read_manifest
from .spotfake import read_spotfake
from .weibo import read_weibo

__all__ = ["DatasetWarning", "drop_posts_without_images", "has_local_image", "parse_label", "read_fakenewsnet",
           "read_manifest", "read_spotfake", "read_weibo"]
