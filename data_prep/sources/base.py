"""What every dataset source yields: one Example per sample, in a deterministic order."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Protocol

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_key(source_id: str) -> str:
    """WebDataset keys end at the first dot and become file names: keep [A-Za-z0-9_-] only."""
    return _UNSAFE.sub("_", str(source_id))


@dataclass
class Example:
    key: str
    """Unique sample key within the dataset (safe for tar member names)."""
    split: str
    image: Optional[str]
    """Absolute path of the image file, or None for a text-only sample."""
    fields: Dict[str, Any] = field(default_factory=dict)
    """Text fields and metadata, stored as the sample's .json."""
    more_images: List[str] = field(default_factory=list)
    """Absolute paths of a multi-image sample's further images, in the order of their ``<image>`` tags."""

    @property
    def images(self) -> List[str]:
        """Every image of the sample, in order ([] for a text-only sample)."""
        return [self.image, *self.more_images] if self.image is not None else []


class Source(Protocol):
    name: str

    def examples(self) -> Iterator[Example]:
        """All examples, grouped by split, in a stable order (the sharding plan depends on it)."""

    def describe(self) -> Dict[str, Any]:
        """Where the data came from, for the manifest."""
