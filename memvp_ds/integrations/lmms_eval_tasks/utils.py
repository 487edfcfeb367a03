"""ScienceQA in lmms-eval with MemVP's official evaluation prompt and reading (the tasks beside this file).

lmms-eval's own ScienceQA tasks word the options 'A. x' and ask for 'the option's letter': a prompt the
model was never trained on. These give the official 'Question: ...\\nContext: ...\\nOptions: (A) x (B) y'
text, which the memvp plug-in turns into exactly memvp-eval's prompt (ending 'Response:The answer is').
"""

import re

_CAPITAL = re.compile(r"[A-Z]")


def doc_to_visual(doc):
    return [] if doc["image"] is None else [doc["image"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The official question text: the hint as context ('N/A' without one), options lettered (A), (B), ..."""
    options = " ".join(f"({chr(ord('A') + i)}) {choice}" for i, choice in enumerate(doc["choices"]))
    return f"Question: {doc['question']}\nContext: {doc['hint'] or 'N/A'}\nOptions: {options}"


def doc_to_letters(doc):
    """The multiple-choice continuations: the option letters (scored after 'The answer is')."""
    return [chr(ord("A") + i) for i in range(len(doc["choices"]))]


def first_capital_is_gold(doc, results):
    """The official reading: the answer's first capital letter is the chosen option (none: wrong)."""
    found = _CAPITAL.search(results[0])
    return {"acc": float(found is not None and found.group() == chr(ord("A") + doc["answer"]))}
