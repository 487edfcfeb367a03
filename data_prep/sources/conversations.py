"""LLaVA-style conversations and generic question/answer JSONL, both as JSON or JSONL files."""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Tuple

from data_prep.sources.base import Example, safe_key
from data_prep.sources.records import (
    AnnotationError,
    Field,
    check_fields,
    describe_record,
    is_id,
    is_text,
    is_text_list,
    is_text_or_number,
    read_records,
)
from memvp_ds.data.prompts import IMAGE_TAG, normalize_turn, strip_image_placeholder

def _is_image_field(value) -> bool:
    return is_text(value) or is_text_list(value)


_IMAGES = "a string (image path), or a list of them for several images (one <image> tag each, in order)"
_LLAVA_FIELDS = (
    Field("id", is_id, "a string or integer", required=False),
    Field("image", _is_image_field, _IMAGES, required=False),
)
_QA_FIELDS = (
    Field("id", is_id, "a string or integer", required=False),
    Field("image", _is_image_field, _IMAGES, required=False),
    Field("split", is_text, "a string", required=False),
    Field("question", is_text, "a string"),
    Field("answer", is_text_or_number, "a string or number"),
    Field("choices", is_text_list, "a list of strings", required=False),
)


def _image_path(image_root: str, name):
    return os.path.join(image_root, name) if name else None


def _image_paths(record, image_root: str, texts, where: str) -> Tuple[Optional[str], List[str]]:
    """The record's first image and its further ones: ``image`` is one path, or a list of paths that the text
    refers to with one ``<image>`` tag each, in order (checked: a multi-image sample's images are told apart
    by their order)."""
    image = record.get("image")
    if not isinstance(image, list):
        return _image_path(image_root, image), []
    tags = sum(text.count(IMAGE_TAG) for text in texts)
    if not image or tags != len(image):
        raise AnnotationError(f"{where}: 'image' lists {len(image)} images but the text has {tags} {IMAGE_TAG} "
                              "tags; give each image its tag, in the order of the list")
    paths = [os.path.join(image_root, name) for name in image]
    return paths[0], paths[1:]


def _source_id(record, index: int) -> str:
    """The record's own id, or its position in the file when it has none."""
    return str(record["id"]) if record.get("id") is not None else str(index)


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
    ``conversations`` or ``messages``). Turns are stored in LLaVA's form; ``<image>`` is removed, except in a
    sample with several images, whose tags say where each goes (for the strategies that place images in the
    text)."""

    name = "llava"

    def examples(self) -> Iterator[Example]:
        for index, (where, record) in enumerate(read_records(self.path)):
            where = describe_record(where, record)
            check_fields(record, _LLAVA_FIELDS, where)
            turns = record.get("conversations", record.get("messages"))
            if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
                raise AnnotationError(f"{where}: 'conversations' (or 'messages') must be a list of turns "
                                      '({"from"|"role": ..., "value"|"content": ...})')
            try:
                turns = [normalize_turn(t) for t in turns]
            except ValueError as err:
                raise AnnotationError(f"{where}: {err}") from None
            answers = [t["value"] for t in turns if t["from"] == "gpt"]
            if isinstance(record.get("image"), list) and any(IMAGE_TAG in answer for answer in answers):
                # an evaluation prompt ends before the last answer: its images would lose their tags
                raise AnnotationError(f"{where}: an {IMAGE_TAG} tag in an answer; images go in the human turns")
            image, more = _image_paths(record, self.image_root, [t["value"] for t in turns], where)
            if not more:  # one image goes in front; several keep their tags (which image goes where)
                turns = [{**t, "value": strip_image_placeholder(t["value"])} for t in turns]
            source_id = _source_id(record, index)
            fields = {"conversations": turns, "source_id": source_id, "split": self.split}
            yield Example(safe_key(source_id), self.split, image, fields, more)


class JsonlQASource(_AnnotationFileSource):
    """Generic records with ``image``, ``question``, ``answer`` and optional ``choices`` / ``split`` / ``id``."""

    name = "jsonl"

    def _split_of(self, record) -> str:
        return self.split if record.get("split") is None else record["split"]

    def examples(self) -> Iterator[Example]:
        records, images = [], []
        for where, record in read_records(self.path):
            where = describe_record(where, record)
            check_fields(record, _QA_FIELDS, where)
            records.append(record)
            images.append(_image_paths(record, self.image_root, [record["question"]], where))
        splits = sorted({self._split_of(r) for r in records})
        for split in splits:  # group by split: shards never mix splits
            for index, record in enumerate(records):
                if self._split_of(record) != split:
                    continue
                source_id = _source_id(record, index)
                fields = {k: record.get(k) for k in ("question", "answer", "choices")}
                fields.update(source_id=source_id, split=split)
                image, more = images[index]
                if not more:  # as in conversations: the tags of several images stay
                    fields["question"] = strip_image_placeholder(fields["question"])
                yield Example(safe_key(source_id), split, image, fields, more)
