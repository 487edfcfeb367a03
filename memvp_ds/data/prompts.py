"""Prompt builders and the label mask: ScienceQA QCM-A and LLaVA/ShareGPT-style conversations.

Both reduce to a list of segments (text, is_target); ``encode_segments`` tokenizes them, puts the loss on
target segments only and truncates to ``max_seq_len``. Training and evaluation use the same builders, so
the prompt a model is evaluated on is byte-identical to the one it was trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from memvp_ds.config import PROMPT_FORMATS

IGNORE_INDEX = -100
"""Label of a position without loss (prompt, padding). The model treats every negative label so."""
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
Segment = Tuple[str, bool]
_IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")


@dataclass
class EncodedText:
    input_ids: List[int]
    labels: List[int]


def scienceqa_prompt(question: str, choices: Sequence[str], hint: Optional[str]) -> str:
    """The QCM part of the official QCM-A format."""
    context = (hint or "").strip() or "N/A"
    options = " ".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    return f"Question: {question}\nContext: {context}\nOptions: {options}\n"


def scienceqa_target(answer_index: int) -> str:
    return f"Answer: The answer is {OPTION_LETTERS[answer_index]}."


def strip_image_placeholder(text: str) -> str:
    """Remove LLaVA's ``<image>`` marker: the image enters through the strategy, not the text."""
    return _IMAGE_PLACEHOLDER.sub(" ", text).strip()


CONVERSATION_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}
"""Accepted turn roles, LLaVA's and ShareGPT/OpenAI's names, mapped to the LLaVA name that is stored."""


def normalize_turn(turn: dict) -> dict:
    """One turn as ``{"from": "human"|"gpt"|"system", "value": text}``, from LLaVA's ``from``/``value`` keys
    or ``role``/``content``, with any role name of CONVERSATION_ROLES. Raises ValueError naming the role."""
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if role is None:
        raise ValueError(f"a conversation turn needs a 'from' or 'role' key, got keys {sorted(turn)}")
    if role not in CONVERSATION_ROLES:
        raise ValueError(f"conversation turn role {role!r} is not one of {', '.join(CONVERSATION_ROLES)}")
    if not isinstance(text, str):
        raise ValueError(f"conversation turn of role {role!r} has no text ('value' or 'content')")
    return {"from": CONVERSATION_ROLES[role], "value": text}


def conversation_segments(turns: Sequence[dict]) -> List[Segment]:
    """Conversation turns (see ``normalize_turn``) as 'USER: ...\\nASSISTANT: ...' segments: the loss is on
    the assistant's answers only; a system turn is plain context before them (no loss).

    The ``<image>`` placeholder is removed: the image enters through the strategy, not the text.
    """
    segments: List[Segment] = []
    for turn in map(normalize_turn, turns):
        text = strip_image_placeholder(turn["value"])
        if turn["from"] == "system":
            segments.append((f"{text}\n", False))
        elif turn["from"] == "human":
            segments.append((f"USER: {text}\nASSISTANT: ", False))
        else:
            segments.append((f"{text}\n", True))
    return segments


def encode_segments(tokenizer, segments: Sequence[Segment], max_seq_len: int) -> EncodedText:
    """Tokenize segments behind BOS; labels are the token ids on target segments (and EOS), else -100.

    EOS ends the sequence only if it ends with a target. Too long a sequence loses tokens from the start
    of the text after BOS (the oldest context), so the answer the loss is computed on is kept whole.
    """
    input_ids: List[int] = [tokenizer.bos_token_id]
    labels: List[int] = [IGNORE_INDEX]
    for text, is_target in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if is_target else [IGNORE_INDEX] * len(ids)
    if segments and segments[-1][1]:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    overflow = len(input_ids) - max_seq_len
    if overflow > 0:
        input_ids = input_ids[:1] + input_ids[1 + overflow :]
        labels = labels[:1] + labels[1 + overflow :]
    return EncodedText(input_ids=input_ids, labels=labels)


def build_segments(fields: dict, prompt_format: str, with_target: bool = True) -> List[Segment]:
    """Segments for one stored sample. ``with_target=False`` gives the prompt a model answers at eval time.

    qcm_a: ScienceQA question/hint/choices -> 'Answer: The answer is X.'; qa: generic question -> answer
    (with options when the sample has choices); conversation: LLaVA turns (eval prompts end before the
    last answer).
    """
    if prompt_format == "qcm_a":
        segments = [(scienceqa_prompt(fields["question"], fields["choices"], fields.get("hint")), False)]
        target = scienceqa_target(int(fields["answer"]))
    elif prompt_format == "qa":
        prompt = f"Question: {fields['question']}\n"
        if fields.get("choices"):
            prompt += "Options: " + " ".join(f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(fields["choices"])) + "\n"
        segments, target = [(prompt, False)], f"Answer: {fields['answer']}"
    elif prompt_format == "conversation":
        segments = conversation_segments(fields["conversations"])
        if with_target:
            return segments
        return segments[:-1] if segments and segments[-1][1] else segments
    else:
        raise ValueError(f"data.prompt_format: unknown format '{prompt_format}'; choose one of {PROMPT_FORMATS}")
    return segments + [(target, True)] if with_target else segments
