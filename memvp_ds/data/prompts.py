"""Prompt formats and the label mask: ScienceQA QCM-A (the official MemVP strings), generic QA,
LLaVA/ShareGPT-style conversations, and conversations rendered by the tokenizer's own chat template.

A prompt format is a registered class (``PROMPT_FORMATS``, like the strategies): it owns its segments, how
many tokens an answer gets at evaluation, how answers are scored and what the evaluation reports about its
protocol. Nothing else compares format names; a new format is one class plus its registry entry.

Every format builds a list of segments (text, is_target). ``encode_segments`` tokenizes the concatenated text
as ONE string, as the official code does (a byte-level BPE would otherwise split a word at a segment
boundary), and puts the loss on the tokens of target segments; a segment's tokens are found by tokenizing
the text up to its end alone. Training and evaluation use the same builders, so the prompt a model is
evaluated on is the one it was trained on (plus the caption, when the evaluation uses it, and the answer
prefix).
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from memvp_ds.config import ConfigError, EvalConfig
from memvp_ds.scoring.scienceqa import OPTION_LETTERS, scienceqa_metrics

log = logging.getLogger("memvp_ds.evaluation")
IGNORE_INDEX = -100
"""Label of a position without loss (prompt, padding). The model treats every negative label so."""
ANSWER_PREFIX = "The answer is"
"""What the official ScienceQA evaluation appends to the prompt: the next token is the model's answer."""
Segment = Tuple[str, bool]
IMAGE_TAG = "<image>"
"""Where an image goes in LLaVA-style text. Stored text keeps the tags of multi-image samples only (which image
goes where); the encoders take them out of the text and note where they were."""
_IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")
IMAGE_MARK = "\ue000"
"""An image tag in text on its way to the tokenizer (a private-use character that no text contains): the
encoders take every mark out of the text and note, per image, the token it precedes."""


def check_choice_count(choices: Sequence[str], what: str = "choices") -> None:
    """Options are lettered A-Z (the answer is one capital letter): more than 26 cannot be asked."""
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"{what}: {len(choices)} options, at most {len(OPTION_LETTERS)} (A-Z) can be lettered")


@dataclass
class EncodedText:
    input_ids: List[int]
    labels: List[int]
    image_positions: List[int] = field(default_factory=list)
    """Per ``<image>`` tag of the text, in order: the index in ``input_ids`` of the token the image precedes."""


def scienceqa_context(hint: Optional[str], caption: Optional[str] = None) -> str:
    """Hint and caption joined by one space, or 'N/A' when both are empty."""
    return " ".join([hint or "", caption or ""]).strip() or "N/A"


def scienceqa_prompt(question: str, choices: Sequence[str], hint: Optional[str], caption: Optional[str] = None) -> str:
    """The official QCM-A prompt: 'Question: q\\nContext: c\\nOptions: (A) x (B) y\\nResponse:'.

    Like the official code, one pass of replace('  ', ' ') over the whole prompt (so three spaces become
    two), then strip().
    """
    check_choice_count(choices)
    options = " ".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    prompt = f"Question: {question}\nContext: {scienceqa_context(hint, caption)}\nOptions: {options}\nResponse:"
    return prompt.replace("  ", " ").strip()


def scienceqa_target(answer_index: int) -> str:
    """'The answer is X.', trained right after 'Response:' with no separator."""
    return f"The answer is {OPTION_LETTERS[answer_index]}."


def strip_image_placeholder(text: str) -> str:
    """Remove LLaVA's ``<image>`` tags (and the whitespace around each, one space left between words)."""
    return _IMAGE_PLACEHOLDER.sub(" ", text).strip()


def mark_image_tags(text: str) -> str:
    """``text`` with each ``<image>`` tag as an IMAGE_MARK where the tag was: without its marks it is
    ``strip_image_placeholder(text)``, each mark right before the space that replaced its tag (or at the
    text's edge). Text without a tag is returned as it is."""
    if IMAGE_TAG not in text:
        return text
    parts = _IMAGE_PLACEHOLDER.split(text)
    marked = parts[0] + "".join(f"{IMAGE_MARK} {part}" for part in parts[1:])
    body = marked.strip(string.whitespace + IMAGE_MARK)
    if not body:
        return IMAGE_MARK * (len(parts) - 1)
    start = marked.index(body)
    marks = lambda edge: IMAGE_MARK * edge.count(IMAGE_MARK)  # noqa: E731
    return marks(marked[:start]) + body + marks(marked[start + len(body):])


def take_image_marks(segments: Sequence[Segment]) -> Tuple[List[Segment], List[int]]:
    """The segments without IMAGE_MARKs, and the marks' character offsets in their concatenated text."""
    clean, offsets, length = [], [], 0
    for text, is_target in segments:
        pieces = text.split(IMAGE_MARK)
        for piece in pieces[:-1]:
            length += len(piece)
            offsets.append(length)
        length += len(pieces[-1])
        clean.append(("".join(pieces), is_target))
    return clean, offsets


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

    The space after 'ASSISTANT:' starts the answer segment, so that the prompt tokenized alone is a token
    prefix of the whole text (a prompt ending in a space would tokenize to a lone space token). The
    ``<image>`` tags become IMAGE_MARKs (see ``mark_image_tags``).
    """
    segments: List[Segment] = []
    for turn in map(normalize_turn, turns):
        text = mark_image_tags(turn["value"]).strip()
        if turn["from"] == "system":
            segments.append((f"{text}\n", False))
        elif turn["from"] == "human":
            segments.append((f"USER: {text}\nASSISTANT:", False))
        else:
            segments.append((f" {text}\n", True))
    return segments


def bos_ids(tokenizer) -> List[int]:
    """[BOS] where the tokenizer has one (LLaMA), [] where it has none (Qwen2)."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def encode_segments(tokenizer, segments: Sequence[Segment], max_seq_len: int) -> EncodedText:
    """BOS (if any) + the segments' text tokenized as one string (+ EOS when it ends with a target).

    Labels are the token ids of target segments and of EOS, -100 elsewhere. A segment ends after as many
    tokens as the text up to its end has when tokenized alone (the official prompt length); that text's
    tokens must be a prefix of the whole text's tokens, else the mask would be wrong: ValueError. An image
    tag (IMAGE_MARK) is found the same way, from the text before it without trailing whitespace. Too long a
    sequence loses tokens from the start of the text after BOS (the oldest context), so the answer the loss
    is computed on is kept whole.
    """
    segments, image_offsets = take_image_marks(segments)
    head = bos_ids(tokenizer)
    text = "".join(segment for segment, _ in segments)
    input_ids = head + tokenizer.encode(text, add_special_tokens=False)

    def tokens_before(end: int, where: str) -> int:
        prefix_ids = tokenizer.encode(text[:end], add_special_tokens=False) if end else []
        if input_ids[len(head) : len(head) + len(prefix_ids)] != prefix_ids:
            raise ValueError(f"the tokenizer merges across the {where} after {text[:end][-30:]!r}: the text before "
                             "it is not a token prefix of the whole text")
        return len(head) + len(prefix_ids)

    labels = [IGNORE_INDEX] * len(input_ids)
    start, end_char = len(head), 0
    for index, (segment, is_target) in enumerate(segments):
        end_char += len(segment)
        end = tokens_before(end_char, "segment boundary") if index < len(segments) - 1 else len(input_ids)
        if is_target:
            labels[start:end] = input_ids[start:end]
        start = end
    images = [tokens_before(len(text[:offset].rstrip()), IMAGE_TAG) for offset in image_offsets]
    if segments and segments[-1][1]:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return _drop_oldest(EncodedText(input_ids, labels, images), len(head), max_seq_len)


def _drop_oldest(encoded: EncodedText, keep: int, max_seq_len: int) -> EncodedText:
    """At most ``max_seq_len`` tokens: the first ``keep`` (BOS) stay, then the oldest context goes first. An
    image whose tag was in the dropped context goes where the kept context starts."""
    overflow = len(encoded.input_ids) - max_seq_len
    if overflow <= 0:
        return encoded
    cut = lambda ids: ids[:keep] + ids[keep + overflow :]  # noqa: E731
    images = [position if position <= keep else max(keep, position - overflow) for position in encoded.image_positions]
    return EncodedText(cut(encoded.input_ids), cut(encoded.labels), images)


def encode_rendered(tokenizer, segments: Sequence[Segment], max_seq_len: int) -> EncodedText:
    """Segments rendered by a chat template (BOS, turn markers and end-of-turn tokens are in their text):
    the text is tokenized as one string without adding special tokens, and a token carries the loss when
    any of its characters lies in a target segment (the rule of transformers' assistant-token mask). An
    image tag (IMAGE_MARK) precedes the first token that ends after it. Too long a sequence loses its
    oldest tokens after a leading BOS."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("data.prompt_format=chat_template needs a fast tokenizer (character offsets of tokens)")
    segments, image_offsets = take_image_marks(segments)
    text, spans, start = "", [], 0
    for segment, is_target in segments:
        if is_target:
            spans.append((start, start + len(segment)))
        text, start = text + segment, start + len(segment)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    labels = [token if any(begin < b and end > a for a, b in spans) else IGNORE_INDEX
              for token, (begin, end) in zip(input_ids, offsets)]
    images = [next((i for i, (_, end) in enumerate(offsets) if end > offset), len(input_ids))
              for offset in image_offsets]
    keep = int(bool(input_ids) and input_ids[0] == tokenizer.bos_token_id)
    return _drop_oldest(EncodedText(input_ids, labels, images), keep, max_seq_len)


class PromptFormat:
    """One way of turning a stored sample into text, and of scoring the model's answers to it."""

    name: str
    multi_turn = False
    """Whether the format renders a whole conversation (a chat request keeps every turn) rather than one
    question."""
    eos_after_answer = True
    """Whether ``tokenize`` ends a trained answer with an added EOS (a chat template writes its own
    end-of-turn token instead)."""

    def segments(self, fields: dict, with_target: bool, use_caption: bool, tokenizer=None) -> List[Segment]:
        """The sample's segments; ``with_target=False`` gives the prompt a model answers at eval time. Only a
        format that renders with the tokenizer's chat template reads ``tokenizer``."""
        raise NotImplementedError

    def encode(self, tokenizer, fields: dict, with_target: bool, use_caption: bool, max_seq_len: int) -> EncodedText:
        """The sample's token ids and labels."""
        return self.tokenize(tokenizer, self.segments(fields, with_target, use_caption, tokenizer), max_seq_len)

    def tokenize(self, tokenizer, segments: Sequence[Segment], max_seq_len: int) -> EncodedText:
        """Token ids and labels of this format's segments (``encode_segments``: BOS + text + EOS after an
        answer)."""
        return encode_segments(tokenizer, segments, max_seq_len)

    def check_tokenizer(self, tokenizer, path: str) -> None:
        """Raise ConfigError when the tokenizer at ``path`` cannot render this format (pre-flight); any
        tokenizer renders the plain-text formats."""

    def answer_tokens(self, eval_cfg: EvalConfig) -> int:
        """New tokens generated per answer at evaluation."""
        return eval_cfg.max_new_tokens

    def metrics(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        """Scores of generated answers (records with ``fields`` and ``output``; ``gold`` and, where the format
        parses answers, ``parsed`` are added to each)."""
        return {"count/overall": len(records)}

    def settings(self, eval_cfg: EvalConfig) -> Dict[str, Any]:
        """The evaluation settings this format uses (reported by the dry run and with the metrics)."""
        return {"answer_tokens": self.answer_tokens(eval_cfg)}

    def protocol(self, eval_cfg: EvalConfig, records: List[Dict[str, Any]]) -> Dict[str, Any]:
        """How the answers were obtained, reported with the metrics."""
        return self.settings(eval_cfg)


class ScienceQAFormat(PromptFormat):
    """qcm_a: the official ScienceQA prompt -> 'The answer is X.'. The evaluation prompt is the prompt +
    'The answer is', whose next token is the answer (ONE token, as the official protocol reads it);
    ``use_caption`` adds the sample's ``caption`` field to the context, as the official evaluation does."""

    name = "qcm_a"

    def segments(self, fields: dict, with_target: bool, use_caption: bool, tokenizer=None) -> List[Segment]:
        caption = fields.get("caption") if use_caption else None
        prompt = scienceqa_prompt(mark_image_tags(fields["question"]), fields["choices"], fields.get("hint"), caption)
        if not with_target:
            return [(prompt + ANSWER_PREFIX, False)]
        return [(prompt, False), (scienceqa_target(int(fields["answer"])), True)]

    def answer_tokens(self, eval_cfg: EvalConfig) -> int:
        return 1

    def metrics(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        return scienceqa_metrics(records)

    def settings(self, eval_cfg: EvalConfig) -> Dict[str, Any]:
        return {"answer_tokens": 1, "use_caption": eval_cfg.use_caption}

    def protocol(self, eval_cfg: EvalConfig, records: List[Dict[str, Any]]) -> Dict[str, Any]:
        captioned = sum(bool(r["fields"].get("caption")) for r in records) if eval_cfg.use_caption else 0
        if eval_cfg.use_caption and not captioned:
            log.warning("eval.use_caption is on but no sample has a caption (data_prep found no captions.json?)")
        return {**self.settings(eval_cfg), "count/captioned": captioned}


class QAFormat(PromptFormat):
    """qa: generic question (with options when the sample has choices) -> 'Answer: ...', VQA scoring."""

    name = "qa"

    def segments(self, fields: dict, with_target: bool, use_caption: bool, tokenizer=None) -> List[Segment]:
        prompt = f"Question: {mark_image_tags(fields['question'])}\n"
        if fields.get("choices"):
            check_choice_count(fields["choices"])
            prompt += "Options: " + " ".join(f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(fields["choices"])) + "\n"
        return [(prompt, False), (f"Answer: {fields['answer']}", True)] if with_target else [(prompt, False)]

    def metrics(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        from memvp_ds.scoring.vqa import mean_vqa_accuracy

        pairs = []
        for record in records:
            answers = record["fields"]["answer"]
            answers = answers if isinstance(answers, list) else [answers]
            record["output"] = record["output"].removeprefix("Answer:").strip()
            record["gold"] = answers
            pairs.append((record["output"], answers))
        return {"acc/vqa": mean_vqa_accuracy(pairs), "count/overall": len(records)}


class ConversationFormat(PromptFormat):
    """conversation: LLaVA turns (eval prompts end before the last answer), scored by captioning metrics
    against that last answer."""

    name = "conversation"
    multi_turn = True

    def segments(self, fields: dict, with_target: bool, use_caption: bool, tokenizer=None) -> List[Segment]:
        segments = conversation_segments(fields["conversations"])
        if with_target:
            return segments
        return segments[:-1] if segments and segments[-1][1] else segments

    def metrics(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        from memvp_ds.scoring.captioning import caption_metrics

        for record in records:  # the reference is the last answer, the one the prompt stops before
            turns = [t["value"] for t in record["fields"]["conversations"] if t["from"] == "gpt"]
            record["gold"] = turns[-1:]
        pairs = [(r["output"], r["gold"]) for r in records if r["gold"]]
        try:
            return {**caption_metrics(pairs), "count/overall": len(records)}
        except ImportError as err:
            log.warning("%s; reporting predictions only", err)
        return super().metrics(records)


CHAT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
"""Stored (LLaVA) turn roles -> the roles chat templates know."""


def chat_template_segments(tokenizer, turns: Sequence[dict], with_target: bool = True) -> List[Segment]:
    """Conversation turns rendered by the tokenizer's chat template, cut into segments: each assistant turn's
    text is a target segment, from where the template's generation prompt ends up to and including its
    end-of-turn token (the whitespace after that token separates turns and carries no loss); everything else
    (BOS, system prompt, user turns, turn headers) is context. ``with_target=False``: the prompt up to the last
    assistant turn, ending in the template's generation prompt.

    A turn's boundaries come from rendering the conversation up to it: with the generation prompt (where the
    answer starts) and with the answer (where it ends). Each rendering must be the start of the whole one,
    else the template renders earlier turns differently once later ones exist: ValueError."""
    messages = [{"role": CHAT_ROLES[t["from"]], "content": mark_image_tags(t["value"])}
                for t in map(normalize_turn, turns)]
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not with_target and answers and answers[-1] == len(messages) - 1:
        messages, answers = messages[:-1], answers[:-1]
    render = lambda upto, prompt: tokenizer.apply_chat_template(  # noqa: E731
        messages[:upto], tokenize=False, add_generation_prompt=prompt)
    whole = render(len(messages), not with_target)
    segments: List[Segment] = []
    done = 0
    for index in answers:
        begin, end = render(index, True), render(index + 1, False)
        if not (whole.startswith(end) and end.startswith(begin)):
            raise ValueError(f"the chat template renders the turns before turn {index} differently once later "
                             "turns follow: the answers' tokens cannot be told apart")
        stop = max(len(end.rstrip()), len(begin))
        segments += [(whole[done : len(begin)], False), (whole[len(begin) : stop], True)]
        done = stop
    if done < len(whole):
        segments.append((whole[done:], False))
    return [segment for segment in segments if segment[0]]


class ChatTemplateFormat(ConversationFormat):
    """chat_template: conversation turns rendered by the tokenizer's own chat template (system, user and
    assistant turns), the loss on exactly the assistant turns' tokens; BOS, turn markers and end-of-turn
    tokens are what the template writes (no BOS or EOS is added). For instruct models, which were trained
    on their template. Scored like ``conversation``."""

    name = "chat_template"
    eos_after_answer = False

    def segments(self, fields: dict, with_target: bool, use_caption: bool, tokenizer=None) -> List[Segment]:
        if tokenizer is None:
            raise ValueError("data.prompt_format=chat_template renders prompts with a tokenizer's chat template")
        return chat_template_segments(tokenizer, fields["conversations"], with_target)

    def tokenize(self, tokenizer, segments: Sequence[Segment], max_seq_len: int) -> EncodedText:
        return encode_rendered(tokenizer, segments, max_seq_len)

    def check_tokenizer(self, tokenizer, path: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"data.prompt_format=chat_template: the tokenizer at {path} has no chat template "
                              "(a base model's); use data.prompt_format=conversation")


PROMPT_FORMATS: Dict[str, PromptFormat] = {
    f.name: f for f in (ScienceQAFormat(), ConversationFormat(), QAFormat(), ChatTemplateFormat())}
"""The registry: data.prompt_format names one of these."""


def prompt_format(name: str) -> PromptFormat:
    """The registered format ``name``; ConfigError naming data.prompt_format otherwise."""
    if name not in PROMPT_FORMATS:
        raise ConfigError(f"data.prompt_format: '{name}' is not one of {', '.join(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[name]


def build_segments(fields: dict, prompt_format_name: str, with_target: bool = True,
                   use_caption: bool = False, tokenizer=None) -> List[Segment]:
    """Segments for one stored sample in the format ``prompt_format_name`` (see PROMPT_FORMATS).
    ``with_target=False`` gives the prompt a model answers at eval time."""
    return prompt_format(prompt_format_name).segments(fields, with_target, use_caption, tokenizer)


def encode_prompt(tokenizer, fields: dict, prompt_format_name: str, max_seq_len: int, with_target: bool = True,
                  use_caption: bool = False) -> EncodedText:
    """Token ids and labels of one stored sample in the format ``prompt_format_name``."""
    return prompt_format(prompt_format_name).encode(tokenizer, fields, with_target, use_caption, max_seq_len)
