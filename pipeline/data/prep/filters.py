"""Row filters for the shard job, and the fixed vocabulary of failure reasons.

Every input row ends either in a shard or in the failure table with one of :data:`REASONS`; the checks here
are pure functions of one row so that any worker gives the same verdict.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

REASONS: dict[str, str] = {
    "bad_uid": "uid missing, not a string, or not [A-Za-z0-9_-]{1,128} (it becomes the tar key)",
    "duplicate_uid": "uid already seen earlier in the input (first occurrence kept)",
    "excluded_uid": "uid not in filters.include_uids",
    "malformed_row": "a required column is missing or has the wrong type",
    "caption_missing": "no caption (null / missing .txt)",
    "caption_empty": "caption is empty or whitespace",
    "caption_not_utf8": "caption bytes are not valid UTF-8",
    "caption_too_short": "caption shorter than filters.min_caption_chars",
    "caption_too_long": "caption longer than filters.max_caption_chars",
    "low_clip_score": "clip score column below filters.min_clip_score",
    "syn_missing": "no synthetic captions for the uid while syn.required is set",
    "missing_url": "no url / path in the row",
    "not_in_img2dataset": "the img2dataset output has no successful sample for the row's uid (or url)",
    "fetch_failed": "download or read failed after retries (HTTP error, timeout, S3 error, missing file)",
    "too_large": "image bytes over fetch.max_bytes",
    "empty_file": "zero-byte image",
    "decode_error": "not an image in an allowed format, truncated or corrupt",
    "decompression_bomb": "more pixels than image.max_pixels",
    "too_small": "shorter side below filters.min_image_size",
    "bad_aspect_ratio": "long/short side ratio above filters.max_aspect_ratio",
    "dense_label_mismatch": "the image needs an EXIF rotation that its copied source.extras would not follow",
    "duplicate_image": "same image bytes (sha256) as an earlier sample of the same shard",
    "unreadable_input": "input that cannot be read: a whole file (counted as one row) or a row range (each row)",
}

_UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class FilterConfig:
    require_caption: bool = True
    """Rows without a usable caption fail (caption_missing / caption_empty); false keeps them with an empty txt."""
    min_caption_chars: int = 0
    """Captions shorter than this (after stripping) fail as caption_too_short."""
    max_caption_chars: int = 0
    """Captions longer than this fail as caption_too_long (0: no limit)."""
    min_image_size: int = 0
    """Images whose shorter side (before resizing) is below this fail as too_small."""
    max_aspect_ratio: float = 0.0
    """Images with long/short side ratio above this fail as bad_aspect_ratio (0: no limit)."""
    clip_score_column: str = "clip_l14_similarity_score"
    """Parquet column holding an image-text score; used by min_clip_score when the column exists."""
    min_clip_score: float | None = None
    """Rows whose clip_score_column is below this (or null) fail as low_clip_score; files without the
    column are not filtered."""
    dedupe_uid: bool = True
    """Drop rows whose uid appeared earlier in the whole input (planned once, before sharding)."""
    dedupe_image: bool = True
    """Drop samples whose image bytes equal an earlier sample's in the same shard; duplicates across shards
    are listed in manifest.json and duplicate_images.txt (a uid list the loader can exclude)."""
    include_uids: str = ""
    """Optional uid list file (one uid per line, local or URL): other rows fail as excluded_uid."""

    def __post_init__(self) -> None:
        for name in ("min_caption_chars", "max_caption_chars", "min_image_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_aspect_ratio and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be 0 (off) or >= 1, got {self.max_aspect_ratio}")
        if self.max_caption_chars and self.max_caption_chars < self.min_caption_chars:
            raise ValueError("max_caption_chars must be >= min_caption_chars (or 0)")


def normalise_uid(value: Any) -> str | None:
    """The uid as a tar-safe string, or None (-> bad_uid). Integers are accepted and written in decimal."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if _UID_RE.match(value) else None


def check_caption(value: Any, cfg: FilterConfig) -> tuple[str, str | None]:
    """``(caption, failure reason or None)``; bytes are decoded as strict UTF-8."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return "", "caption_not_utf8"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", ("caption_missing" if cfg.require_caption else None)
    if not isinstance(value, str):
        return "", "malformed_row"
    text = value.replace("\x00", "").strip()
    if not text:
        return "", ("caption_empty" if cfg.require_caption else None)
    if len(text) < cfg.min_caption_chars:
        return text, "caption_too_short"
    if cfg.max_caption_chars and len(text) > cfg.max_caption_chars:
        return text, "caption_too_long"
    return text, None


def check_score(scores: dict[str, float | None], cfg: FilterConfig) -> str | None:
    if cfg.min_clip_score is None or cfg.clip_score_column not in scores:
        return None
    score = scores[cfg.clip_score_column]
    if score is None or math.isnan(score) or score < cfg.min_clip_score:
        return "low_clip_score"
    return None


def check_image_size(width: int, height: int, cfg: FilterConfig) -> str | None:
    if cfg.min_image_size and min(width, height) < cfg.min_image_size:
        return "too_small"
    if cfg.max_aspect_ratio and max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        return "bad_aspect_ratio"
    return None
