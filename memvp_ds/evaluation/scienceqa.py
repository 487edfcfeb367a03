"""ScienceQA answer parsing and the published accuracy breakdown (Lu et al. 2022; as in LaVIN/MemVP)."""

from __future__ import annotations

import re
from typing import Dict, Iterable, Optional, Tuple

from memvp_ds.data.prompts import OPTION_LETTERS

_ANSWER = re.compile(r"The answer is \(?([A-Z])\)?")
_FALLBACK = re.compile(r"^\s*\(?([A-Z])[\).:\s]")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def parse_answer(output: str, num_choices: int) -> Tuple[Optional[int], str]:
    """(choice index or None, how it was found): 'pattern' for "The answer is X.", 'fallback' for an output
    that starts with a bare option letter such as "B." or "(B)", 'failed' otherwise (counted as wrong)."""
    match = _ANSWER.search(output)
    how = "pattern"
    if match is None:
        match, how = _FALLBACK.match(output), "fallback"
    if match is None:
        return None, "failed"
    index = OPTION_LETTERS.index(match.group(1))
    return (index, how) if index < num_choices else (None, "failed")


def categories(fields: dict) -> Iterable[str]:
    """The published breakdown keys a problem counts towards."""
    subject = SUBJECTS.get(fields.get("subject"))
    if subject:
        yield subject
    has_text = bool((fields.get("hint") or "").strip())
    has_image = bool(fields.get("has_image"))
    if has_text:
        yield "TXT"
    if has_image:
        yield "IMG"
    if not has_text and not has_image:
        yield "NO"
    grade = str(fields.get("grade") or "")
    if grade.startswith("grade") and grade[5:].isdigit():
        yield "G1-6" if int(grade[5:]) <= 6 else "G7-12"


def scienceqa_metrics(records: Iterable[dict]) -> Dict[str, float]:
    """Accuracy (%) overall and per category, plus counts of answers found by fallback or not at all.

    Each record needs ``fields`` (the stored sample: answer, choices, subject, hint, has_image, grade) and
    ``output`` (the generated text).
    """
    totals: Dict[str, list] = {}
    parse_counts = {"pattern": 0, "fallback": 0, "failed": 0}
    for record in records:
        fields = record["fields"]
        predicted, how = parse_answer(record["output"], len(fields["choices"]))
        parse_counts[how] += 1
        correct = predicted == int(fields["answer"])
        for key in ("overall", *categories(fields)):
            entry = totals.setdefault(key, [0, 0])
            entry[0] += int(correct)
            entry[1] += 1
    metrics = {f"acc/{key}": 100.0 * right / count for key, (right, count) in totals.items()}
    metrics.update({f"count/{key}": count for key, (_, count) in totals.items()})
    metrics.update({f"parse/{key}": value for key, value in parse_counts.items()})
    return metrics
