"""ScienceQA: problems.json + pid_splits.json + images/{split}/{pid}/image.png."""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Sequence

from data_prep.sources.base import Example, safe_key

_KEPT_FIELDS = ("question", "choices", "answer", "hint", "subject", "topic", "category", "grade", "lecture", "solution")


class ScienceQASource:
    name = "scienceqa"

    def __init__(self, root: str, splits: Optional[Sequence[str]] = None):
        self.root = root
        for required in ("problems.json", "pid_splits.json"):
            if not os.path.isfile(os.path.join(root, required)):
                raise FileNotFoundError(f"ScienceQA root {root} has no {required}")
        self.splits = list(splits) if splits else ["train", "val", "test"]

    def describe(self):
        return {"type": self.name, "root": os.path.abspath(self.root), "splits": self.splits}

    def examples(self) -> Iterator[Example]:
        with open(os.path.join(self.root, "problems.json")) as f:
            problems = json.load(f)
        with open(os.path.join(self.root, "pid_splits.json")) as f:
            pid_splits = json.load(f)
        for split in self.splits:
            if split not in pid_splits:
                raise KeyError(f"pid_splits.json has no split '{split}' (has {sorted(pid_splits)})")
            for pid in pid_splits[split]:
                problem = problems[str(pid)]
                image = None
                if problem.get("image"):
                    image = os.path.join(self.root, "images", split, str(pid), problem["image"])
                fields = {name: problem.get(name) for name in _KEPT_FIELDS}
                fields.update(source_id=str(pid), split=split)
                yield Example(key=safe_key(pid), split=split, image=image, fields=fields)
