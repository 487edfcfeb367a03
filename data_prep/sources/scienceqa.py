"""ScienceQA: problems.json + pid_splits.json + images/{split}/{pid}/image.png."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

from data_prep.sources.base import Example, safe_key
from data_prep.sources.records import AnnotationError, Field, check_fields, is_index, is_text, is_text_list, load_json

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

    def __init__(self, root: str, splits: Optional[Sequence[str]] = None):
        self.root = root
        self.problems_path = os.path.join(root, "problems.json")
        self.splits_path = os.path.join(root, "pid_splits.json")
        for path in (self.problems_path, self.splits_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ScienceQA root {root} has no {os.path.basename(path)}")
        self.splits = list(splits) if splits else ["train", "val", "test"]

    def describe(self):
        return {"type": self.name, "root": os.path.abspath(self.root), "splits": self.splits}

    def examples(self) -> Iterator[Example]:
        problems = _load_object(self.problems_path)
        pid_splits = _load_object(self.splits_path)
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
