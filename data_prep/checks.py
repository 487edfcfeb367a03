"""Checks on a dataset's examples that run before extraction writes anything or loads a model.

Split names become shard file names under --out, and sample keys become tar member names, so both come
from the data and both are checked here rather than trusted.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, List, Sequence

from data_prep.sources.base import Example

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_SHOWN = 5


def _source_id(example: Example) -> str:
    return str(example.fields.get("source_id", example.key))


def check_split_names(examples: Sequence[Example], where: str) -> None:
    """Refuse any split that is not a plain name: shards are written to ``--out/{split}-{index}.tar``,
    so a split such as ``../x`` or ``/tmp/x`` would write outside --out."""
    for example in examples:
        if not _PLAIN_NAME.fullmatch(example.split):
            raise ValueError(
                f"{where}: record {_source_id(example)!r} has split {example.split!r}; a split names shard files "
                "under --out, so it must be a plain name of letters, digits, '_', '-', '.' not starting with '.'"
            )


def check_sample_keys(examples: Sequence[Example], where: str) -> None:
    """Refuse empty keys and keys shared by two records (equal ids, or ids equal once made tar-safe):
    WebDataset groups a shard's files by key, so such records would merge or overwrite one another."""
    empty = sum(1 for example in examples if not example.key)
    if empty:
        raise ValueError(f"{where}: {empty} record(s) have an empty id; every record needs a non-empty id")
    ids_by_key: Dict[str, List[str]] = defaultdict(list)
    for example in examples:
        ids_by_key[example.key].append(_source_id(example))
    shared = {key: ids for key, ids in ids_by_key.items() if len(ids) > 1}
    if shared:
        clashes = [f"key {key!r} <- ids {', '.join(repr(i) for i in ids)}" for key, ids in shared.items()]
        raise ValueError(
            f"{where}: {len(shared)} sample key(s) shared by several records: {_listed(clashes, sep='; ')} "
            "(a key is the record's id with characters other than [A-Za-z0-9_-] replaced by '_'; "
            "give every record a distinct id)"
        )


def _listed(items: Sequence[str], sep: str = ", ") -> str:
    shown = sep.join(str(item) for item in items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown}{sep}and {len(items) - _SHOWN} more"
