"""OpenAI chat messages -> the prompt the model was trained and evaluated on (memvp_ds.data.prompts).

The export's ``data.prompt_format`` says which builder: ``conversation`` renders every turn as training
did ('USER: ...\\nASSISTANT:'), ``chat_template`` with the tokenizer's chat template as training did; ``qcm_a``
and ``qa`` answer the last user message. A multiple-choice question typed as a user would ("Which shape is
at the top? (A) circle (B) square", or the official 'Question: ...\\nContext: ...\\nOptions: ...' text) is
parsed into question, options and context, so it gets the exact evaluation prompt, as memvp-predict builds it;
without options it is a free-form ``qa`` question (as memvp-predict). The tokenizer's chat template is used
only for a model trained with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from memvp_ds.data.prompts import IMAGE_TAG, Segment, build_segments, prompt_format as format_named

_OPTION = re.compile(r"\(([A-Z])\)\s*")
_LABELLED = re.compile(r"^(Question|Context|Hint|Options):\s*(.*)$", re.IGNORECASE)


class RequestError(ValueError):
    """A bad request: ``param`` names the offending field, ``status`` the HTTP code, ``code`` OpenAI's."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class ChatPrompt:
    segments: List[Segment]
    """The prompt, for ``encode_segments`` (with an IMAGE_MARK where each image goes, for a model that takes
    several images per sample)."""
    images: List[Tuple[str, str]]
    """(field name, image_url) of each of the request's images, in order."""


def split_content(content: Any, field: str, tag_images: bool = False) -> Tuple[str, List[Tuple[str, str]]]:
    """A message's ``content`` (a string, or a list of text / image_url parts) -> (text, [(field, url)]), the
    parts' texts joined by newlines; ``tag_images`` puts an ``<image>`` tag in the text where each image part
    is (where a model that takes several images per sample finds it)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{field}: must be a string or a list of content parts", field)
    texts, images = [], []
    for i, part in enumerate(content):
        where = f"{field}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise RequestError(f"{where}.image_url.url: must be a string", f"{where}.image_url.url")
            images.append((f"{where}.image_url.url", url))
            if tag_images:
                texts.append(IMAGE_TAG)
        else:
            raise RequestError(f"{where}: a content part is {{'type': 'text', 'text': ...}} or "
                               "{'type': 'image_url', 'image_url': {'url': ...}}", where)
    return "\n".join(texts), images


def parse_multiple_choice(text: str) -> Dict[str, Any]:
    """question, choices and hint from a question typed with '(A) x (B) y' options and optional
    'Context:' / 'Hint:' lines (the official 'Question: ... Options: ...' text included)."""
    question_lines, hint, options_text = [], "", ""
    for line in text.strip().splitlines():
        labelled = _LABELLED.match(line.strip())
        label = labelled.group(1).lower() if labelled else None
        if label in ("context", "hint"):
            hint = "" if labelled.group(2).strip() == "N/A" else labelled.group(2).strip()
        elif label == "options":
            options_text += " " + labelled.group(2)
        elif label == "question":
            question_lines.append(labelled.group(2))
        elif line.strip() and line.strip() != "Response:":
            question_lines.append(line.strip())
    question = " ".join(question_lines)
    first = _OPTION.search(question)
    if first and not options_text:  # options typed on the question's line
        question, options_text = question[:first.start()].strip(), question[first.start():]
    parts = _OPTION.split(options_text)
    letters, texts = parts[1::2], [p.strip() for p in parts[2::2]]
    if letters != [chr(ord("A") + i) for i in range(len(letters))]:
        letters, texts = [], []  # not a lettered list in order: a plain question
    return {"question": question.strip(), "choices": texts if letters else [], "hint": hint, "answer": 0}


def chat_prompt(messages: Any, prompt_format: str, max_images: int = 1, tokenizer=None) -> ChatPrompt:
    """The training prompt for OpenAI ``messages`` with up to ``max_images`` images (the model's
    ``data.max_images``): one image goes in front, as training put a one-image sample's; several go where
    their parts are, as their tags did. ``tokenizer``: for a format rendered by its chat template.
    RequestError naming the field for bad input."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role: must be system, user or assistant", f"messages[{i}].role")
    contents = [split_content(m.get("content"), f"messages[{i}].content") for i, m in enumerate(messages)]
    images = [image for _, found in contents for image in found]
    if max_images > 1 and len(images) > 1:
        contents = [split_content(m.get("content"), f"messages[{i}].content", tag_images=True)
                    for i, m in enumerate(messages)]
    turns = [{"role": m["role"], "content": text} for m, (text, _) in zip(messages, contents)]
    if len(images) > max_images:
        field = images[max_images][0]
        allowed = "one image" if max_images == 1 else f"at most {max_images} images"
        raise RequestError(f"{field}: {allowed} per request (the model was trained with data.max_images="
                           f"{max_images})", field)
    if turns[-1]["role"] != "user":
        raise RequestError(f"messages[{len(turns) - 1}].role: the last message must be the user's",
                           f"messages[{len(turns) - 1}].role")
    if format_named(prompt_format).multi_turn:
        segments = build_segments({"conversations": turns}, prompt_format, with_target=False, tokenizer=tokenizer)
    else:
        fields = parse_multiple_choice(turns[-1]["content"])
        if not fields["question"]:
            field = f"messages[{len(turns) - 1}].content"
            raise RequestError(f"{field}: no question text", field)
        segments = build_segments(fields, prompt_format if fields["choices"] else "qa", with_target=False)
    return ChatPrompt(segments, images)
