"""VQAv2 accuracy: min(#humans who gave the answer / 3, 1) after the standard answer normalisation."""

from __future__ import annotations

import re
from typing import Iterable, List

_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's",
                 "whats": "what's", "wasnt": "wasn't", "werent": "weren't", "couldnt": "couldn't"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """The official VQA evaluation's processing: punctuation, digits, articles and contractions."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_NUMBER.sub(r"\1\3", text)
    text = _PUNCTUATION.sub("", text)
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: List[str]) -> float:
    """Averaged over the 10 leave-one-out subsets of the human answers, as the official code does."""
    predicted = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in human_answers]
    if len(answers) <= 1:
        return float(bool(answers) and predicted == answers[0])
    scores = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        scores.append(min(1.0, sum(a == predicted for a in others) / 3.0))
    return sum(scores) / len(scores)


def mean_vqa_accuracy(pairs: Iterable[tuple]) -> float:
    scores = [vqa_accuracy(prediction, answers) for prediction, answers in pairs]
    return 100.0 * sum(scores) / max(len(scores), 1)
