"""LLaVA-style conversations and generic question/answer JSONL, both as JSON or JSONL files."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator

from data_prep.sources.base import Example, safe_key
from memvp_ds.data.prompts import normalize_turn, strip_image_placeholder


def read_records(path: str) -> Iterator[Dict[str, Any]]:
    """Records of a .json list or a .jsonl file (streamed line by line); errors name file and line."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no}: invalid JSON: {err}") from None
    else:
        with open(path) as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        yield from records


def _image_path(image_root: str, name):
    return os.path.join(image_root, name) if name else None


class _AnnotationFileSource:
    """A .json/.jsonl annotation file whose image paths are relative to ``image_root``."""

    name: str

    def __init__(self, path: str, image_root: str, split: str = "train"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.name} annotation file not found: {path}")
        self.path, self.image_root, self.split = path, image_root, split

    def describe(self):
        return {"type": self.name, "path": os.path.abspath(self.path), "image_root": os.path.abspath(self.image_root)}


class LlavaSource(_AnnotationFileSource):
    """``{"id", "image", "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`` (LLaVA), or ShareGPT
    style turns (roles user/assistant/system, keys ``from``/``value`` or ``role``/``content``, the list under
    ``conversations`` or ``messages``). Turns are stored in LLaVA's form; ``<image>`` is removed."""

    name = "llava"

    def examples(self) -> Iterator[Example]:
        for index, record in enumerate(read_records(self.path)):
            source_id = str(record.get("id", index))
            turns = record.get("conversations", record.get("messages"))
            if not isinstance(turns, list):
                raise ValueError(f"{self.path}: record {index} (id {source_id}) has no 'conversations' list")
            try:
                turns = [normalize_turn(t) for t in turns]
            except (ValueError, AttributeError) as err:
                raise ValueError(f"{self.path}: record {index} (id {source_id}): {err}") from None
            turns = [{**t, "value": strip_image_placeholder(t["value"])} for t in turns]
            fields = {"conversations": turns, "source_id": source_id, "split": self.split}
            yield Example(safe_key(source_id), self.split, _image_path(self.image_root, record.get("image")), fields)


class JsonlQASource(_AnnotationFileSource):
    """Generic records with ``image``, ``question``, ``answer`` and optional ``choices`` / ``split`` / ``id``."""

    name = "jsonl"

    def examples(self) -> Iterator[Example]:
        records = list(read_records(self.path))
        splits = sorted({r.get("split", self.split) for r in records})
        for split in splits:  # group by split: shards never mix splits
            for index, record in enumerate(records):
                if record.get("split", self.split) != split:
                    continue
                for required in ("question", "answer"):
                    if required not in record:
                        raise ValueError(f"{self.path}: record {index} has no '{required}'")
                source_id = str(record.get("id", index))
                fields = {k: record.get(k) for k in ("question", "answer", "choices")}
                fields.update(source_id=source_id, split=split)
                yield Example(safe_key(source_id), split, _image_path(self.image_root, record.get("image")), fields)
