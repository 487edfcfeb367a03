"""ScienceQA: problems.json + pid_splits.json + images/{split}/{pid}/image.png, and captions.json when present.

captions.json is the ScienceQA repository's caption file (``{"captions": {pid: text}}``, made by its
tools/generate_caption.py); the official MemVP evaluation puts the caption into the test context. Each
sample then stores its caption ("" for a pid without one) in the ``caption`` field.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Optional, Sequence

from data_prep.sources.base import Example, safe_key

CAPTIONS = "captions.json"
_KEPT_FIELDS = ("question", "choices", "answer", "hint", "subject", "topic", "category", "grade", "lecture", "solution")


class ScienceQASource:
    name = "scienceqa"

    def __init__(self, root: str, splits: Optional[Sequence[str]] = None, captions: Optional[str] = None):
        """``captions``: the captions.json to use; default ``root/captions.json`` if it exists (else none)."""
        self.root = root
        for required in ("problems.json", "pid_splits.json"):
            if not os.path.isfile(os.path.join(root, required)):
                raise FileNotFoundError(f"ScienceQA root {root} has no {required}")
        if captions is not None and not os.path.isfile(captions):
            raise FileNotFoundError(f"captions file not found: {captions}")
        default = os.path.join(root, CAPTIONS)
        self.captions = captions or (default if os.path.isfile(default) else None)
        self.splits = list(splits) if splits else ["train", "val", "test"]

    def describe(self):
        return {"type": self.name, "root": os.path.abspath(self.root), "splits": self.splits,
                "captions": os.path.abspath(self.captions) if self.captions else None}

    def _read_captions(self) -> Optional[Dict[str, str]]:
        if self.captions is None:
            return None
        with open(self.captions) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("captions"), dict):
            raise ValueError(f"{self.captions}: expected {{\"captions\": {{pid: caption}}}}")
        return data["captions"]

    def examples(self) -> Iterator[Example]:
        with open(os.path.join(self.root, "problems.json")) as f:
            problems = json.load(f)
        with open(os.path.join(self.root, "pid_splits.json")) as f:
            pid_splits = json.load(f)
        captions = self._read_captions()
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
                if captions is not None:
                    fields["caption"] = captions.get(str(pid), "")
                yield Example(key=safe_key(pid), split=split, image=image, fields=fields)
