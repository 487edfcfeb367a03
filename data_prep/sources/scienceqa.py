"""ScienceQA: problems.json + pid_splits.json + images/{split}/{pid}/image.png, and captions.json when present.

captions.json is the ScienceQA repository's caption file (``{"captions": {pid: text}}``, made by its
tools/generate_caption.py); the official MemVP evaluation puts the caption into the test context. Each
sample then stores its caption ("" for a pid without one) in the ``caption`` field.
"""

from __future__ import annotations

import os
import json
from typing import Any, Dict, Iterator, List, Optional, Sequence

from data_prep.sources.base import Example, safe_key
from data_prep.sources.records import AnnotationError, Field, check_fields, is_index, is_text, is_text_list, load_json

CAPTIONS = "captions.json"
_KEPT_FIELDS = ("question", "choices", "answer", "hint", "subject", "topic", "category", "grade", "lecture", "solution")
_PROBLEM_FIELDS = (
    Field("question", is_text, "a string"),
    Field("choices", is_text_list, "a list of strings"),
    Field("answer", is_index, "an integer (index into choices)"),
    Field("hint", is_text, "a string", required=False),
    Field("image", is_text, "a string (file name)", required=False),
)


class ScienceQASource:
    name = "scienceqa"

    def __init__(self, root: str, splits: Optional[Sequence[str]] = None, captions: Optional[str] = None):
        """``captions``: the captions.json to use; default ``root/captions.json`` if it exists (else none)."""
        self.root = root
        self.problems_path = os.path.join(root, "problems.json")
        self.splits_path = os.path.join(root, "pid_splits.json")
        for path in (self.problems_path, self.splits_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ScienceQA root {root} has no {os.path.basename(path)}")
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
        problems = _load_object(self.problems_path)
        pid_splits = _load_object(self.splits_path)
        captions = self._read_captions()
        for split in self.splits:
            for pid in self._split_pids(pid_splits, split):
                problem = problems.get(str(pid))
                if problem is None:
                    raise AnnotationError(f"{self.splits_path}: split '{split}' lists problem '{pid}', "
                                          f"which problems.json does not have")
                _check_problem(problem, f"{self.problems_path}: problem '{pid}'")
                image = None
                if problem.get("image"):
                    image = os.path.join(self.root, "images", split, str(pid), problem["image"])
                fields = {name: problem.get(name) for name in _KEPT_FIELDS}
                fields.update(source_id=str(pid), split=split)
                if captions is not None:
                    fields["caption"] = captions.get(str(pid), "")
                yield Example(key=safe_key(pid), split=split, image=image, fields=fields)

    def _split_pids(self, pid_splits: Dict[str, Any], split: str) -> List[Any]:
        if split not in pid_splits:
            raise AnnotationError(f"{self.splits_path}: no split '{split}' (has {sorted(pid_splits)})")
        pids = pid_splits[split]
        if not isinstance(pids, list):
            raise AnnotationError(
                f"{self.splits_path}: split '{split}' must be a list of problem ids, got {type(pids).__name__}")
        return pids


def _load_object(path: str) -> Dict[str, Any]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


def _check_problem(problem: Any, where: str) -> None:
    if not isinstance(problem, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got a JSON {type(problem).__name__}")
    check_fields(problem, _PROBLEM_FIELDS, where)
    if not 0 <= problem["answer"] < len(problem["choices"]):
        raise AnnotationError(f"{where}: answer {problem['answer']} is not an index into its "
                              f"{len(problem['choices'])} choices")
