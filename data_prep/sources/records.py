"""Reading annotation files record by record, with every error naming the file and the record.

A malformed file (bad JSON, a line that is not an object, a missing or mistyped field) stops extraction
with one AnnotationError line such as ``qa.jsonl:7 (id 'q7'): 'answer' is missing``, before any shard is
written, instead of a traceback from deep inside the pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Sequence, Tuple


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the record."""


@dataclass(frozen=True)
class Field:
    """One field of a record: how to recognise a valid value, and how to say what was expected."""

    name: str
    is_valid: Callable[[Any], bool]
    expected: str
    required: bool = True


# Value checks for Field.is_valid. JSON true/false load as bool, a subclass of int: never a number here.


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_text(value: Any) -> bool:
    """A string."""
    return isinstance(value, str)


def is_index(value: Any) -> bool:
    """An integer."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_id(value: Any) -> bool:
    """A string or an integer (ids are often numbers in JSON)."""
    return is_text(value) or is_index(value)


def is_text_or_number(value: Any) -> bool:
    """A string or a number (e.g. a free-form answer)."""
    return is_text(value) or _is_number(value)


def is_text_list(value: Any) -> bool:
    """A list of strings."""
    return isinstance(value, list) and all(is_text(item) for item in value)


def load_json(path: str) -> Any:
    """Parse a whole JSON file; malformed JSON or bytes that are not UTF-8 raise AnnotationError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl_records(path: str) -> Iterator[Tuple[str, Any]]:
    # Streamed line by line (a JSONL file may be far larger than memory); bytes are decoded per line so
    # that a decoding error names its own line.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                where = f"{path}:{line_no}"
                yield where, _parse_line(raw, where)


def _parse_line(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{where}: not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None


def _json_list_records(path: str) -> Iterator[Tuple[str, Any]]:
    records = load_json(path)
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON list of records, got a JSON {type(records).__name__}")
    for index, record in enumerate(records):
        yield f"{path}: record {index}", record


def read_records(path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(where, record) for each record of a .json list or a .jsonl file.

    ``where`` names the file and the line (JSONL) or list index (JSON); every record is a JSON object.
    """
    records = _jsonl_records(path) if path.endswith(".jsonl") else _json_list_records(path)
    for where, record in records:
        if not isinstance(record, dict):
            raise AnnotationError(f"{where}: expected a JSON object, got a JSON {type(record).__name__}")
        yield where, record


def describe_record(where: str, record: Dict[str, Any]) -> str:
    """``where`` plus the record's id when it has one, for error messages."""
    return f"{where} (id {record['id']!r})" if record.get("id") is not None else where


def check_fields(record: Dict[str, Any], fields: Sequence[Field], where: str) -> None:
    """Raise AnnotationError naming ``where`` for the first field that is missing or of the wrong type.

    An optional field may be absent or null.
    """
    for field in fields:
        value = record.get(field.name)
        if value is None:
            if field.required:
                raise AnnotationError(f"{where}: required field '{field.name}' is missing")
            continue
        if not field.is_valid(value):
            raise AnnotationError(
                f"{where}: '{field.name}' must be {field.expected}, got {type(value).__name__} {_preview(value)}"
            )


def _preview(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
