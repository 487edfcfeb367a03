"""ScienceQA answer parsing and the published accuracy breakdown (Lu et al. 2022), as the official MemVP
evaluation reads and scores them."""

from __future__ import annotations

import re
from typing import Dict, Iterable, Optional

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""Option labels, in order: (A) (B) ... in the prompts, the first capital letter in an answer."""
_CAPITAL = re.compile(r"[A-Z]")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def parse_answer(output: str, num_choices: int) -> Optional[int]:
    """The official reading of a generated answer: its first capital letter (A-Z) is the predicted option.

    None (a parse failure, scored wrong) when there is no capital letter or it is beyond the choices:
    nothing is guessed, so e.g. 'The answer is: (B)' reads 'T' and fails, ' a' fails, '(B)' is B.
    """
    match = _CAPITAL.search(output)
    if match is None:
        return None
    index = OPTION_LETTERS.index(match.group())
    return index if index < num_choices else None


def categories(fields: dict) -> Iterable[str]:
    """The published breakdown keys a problem counts towards."""
    subject = SUBJECTS.get(fields.get("subject"))
    if subject:
        yield subject
    has_text = bool(fields.get("hint"))
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
    """Accuracy (%) overall and per category, and the count of parse failures (outputs without a valid
    option letter, counted as wrong).

    Each record needs ``fields`` (the stored sample: answer, choices, subject, hint, has_image, grade) and
    ``output`` (the generated text); ``parsed`` (option index or None) and ``gold`` are added to it.
    """
    totals: Dict[str, list] = {}
    failures = 0
    for record in records:
        fields = record["fields"]
        record["parsed"] = parse_answer(record["output"], len(fields["choices"]))
        record["gold"] = int(fields["answer"])
        failures += record["parsed"] is None
        correct = record["parsed"] == record["gold"]
        for key in ("overall", *categories(fields)):
            entry = totals.setdefault(key, [0, 0])
            entry[0] += int(correct)
            entry[1] += 1
    metrics = {f"acc/{key}": 100.0 * right / count for key, (right, count) in totals.items()}
    metrics.update({f"count/{key}": count for key, (_, count) in totals.items()})
    metrics["count/parse_failures"] = failures
    return metrics
