"""The lmms-eval model plug-in: score an export in the lmms-eval harness (docs/evaluation.md).

    pip install "memvp_ds[eval]"
    lmms-eval --model memvp --model_args weights=runs/x/export/trainable.safetensors,llm_path=/local/llama-7b-hf \\
        --tasks TASK --batch_size 8 --output_path results/

pyproject.toml puts ``manifest`` in lmms-eval's ``lmms_eval.models`` entry-point group, so an installed
memvp_ds is found by name, without a fork or LMMS_EVAL_PLUGINS. Model arguments: ``weights`` (the export),
``llm_path`` (another local copy of the base LLM, also the tokenizer; default: the stored one),
``clip_pretrained`` (a local CLIP checkpoint; default: the one in the stored recipe); ``--batch_size`` and
``--device`` come from the harness (default device: the process's GPU, else the CPU).

The export is loaded as memvp-serve loads it: its stored config is data (never remote code). Each question
the task renders (``doc_to_text``) is put into the prompt the export was trained on, as memvp-serve does with a
chat message (memvp_ds.serve.prompting): a question with '(A) x (B) y' options, or in the official
'Question: ...\\nContext: ...\\nOptions: ...' form, gets exactly memvp-eval's prompt (for ScienceQA the
official one, ending 'The answer is'). The task's image is encoded with the export's feature recipe, through
the same CLIP code as data_prep (memvp_ds.serve.images). The plug-in passes one image per question (memvp-serve
takes several for a model trained with data.max_images > 1).

- ``generate_until``: greedy decoding in batches of ``--batch_size``, cut at the task's ``until`` strings;
  ``max_new_tokens`` defaults to memvp-eval's (one token for ScienceQA's official protocol). Sampling and beam
  search are refused: the model decodes greedily, and a score made otherwise is not the one the task defines.
- ``loglikelihood`` (multiple-choice tasks): the continuation's loss after the prompt, its tokens' mean negative
  log-probability, in batches, and whether each of its tokens is the most likely one. A loss and not lm-eval's
  log-likelihood, because lmms-eval's multiple-choice scoring picks the option with the LOWEST value (its own
  models return the loss: lmms-eval issue #370).
- ``generate_until_multi_round``: rounds answered one after the other, each next question and image from the
  task's ``doc_to_text``, in the protocol of lmms-eval's own models.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image

from memvp_ds.data.prompts import Segment, encode_segments, prompt_format
from memvp_ds.progress import progress
from memvp_ds.serve.prompting import RequestError, chat_prompt

MODEL_ID = "memvp"


def manifest():
    """The entry-point payload: lmms-eval's ``--model memvp`` is this module's ``MemVP``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MemVP")


def greedy_settings(gen_kwargs: Dict[str, Any], where: str) -> Tuple[List[str], Optional[int]]:
    """(stop strings, max_new_tokens or None) of a task's generation settings; ValueError for settings that
    greedy decoding cannot honour."""
    if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
        raise ValueError(f"{where}: generation_kwargs ask for sampling (temperature="
                         f"{gen_kwargs.get('temperature')}, do_sample={gen_kwargs.get('do_sample')}); the memvp "
                         "model decodes greedily: pass --gen_kwargs temperature=0,do_sample=False")
    if int(gen_kwargs.get("num_beams") or 1) > 1:
        raise ValueError(f"{where}: generation_kwargs ask for beam search (num_beams={gen_kwargs['num_beams']}); "
                         "the memvp model decodes greedily: pass --gen_kwargs num_beams=1")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new_tokens = gen_kwargs.get("max_new_tokens")
    return until, None if max_new_tokens is None else int(max_new_tokens)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings (all of it when none occurs)."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[:min(ends)] if ends else text


def one_image(visuals: Any, where: str) -> Optional[Image.Image]:
    """The RGB image of a task's ``doc_to_visual`` answer (None without one); ValueError for several images or
    for video and audio inputs."""
    if visuals is None or isinstance(visuals, Image.Image):
        visuals = [visuals]
    visuals = [v for v in visuals if v is not None]
    if len(visuals) > 1:
        raise ValueError(f"{where}: {len(visuals)} images; the memvp plug-in takes one image per question")
    if visuals and not isinstance(visuals[0], Image.Image):
        raise ValueError(f"{where}: a {type(visuals[0]).__name__} as visual input; the memvp model takes images "
                         "(PIL), not video or audio")
    return visuals[0].convert("RGB") if visuals else None


class MemVP(lmms):
    """An export behind lmms-eval's model interface (``--model memvp``)."""

    is_simple = True

    def __init__(self, weights: str, llm_path: Optional[str] = None, clip_pretrained: Optional[str] = None,
                 batch_size: Any = 1, device: Optional[str] = None) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"--batch_size {batch_size}: the memvp model takes a positive integer ('auto' is not "
                             "supported)")
        self.batch_size = int(batch_size)
        if device in (None, "cuda") and torch.cuda.is_available():  # each process of a multi-process run its own GPU
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self._device = torch.device(device or "cpu")
        self.model, self.cfg, self.tokenizer, self.encoder = _load(weights, llm_path, clip_pretrained, self._device)
        self.dtype = next(self.model.parameters()).dtype
        self._shown_prompt = set()

    @property
    def device(self) -> torch.device:
        """Where the model runs (the harness gathers per-rank counts on it when several processes run)."""
        return self._device

    # -- what every request needs ------------------------------------------------------------------------

    def _segments(self, context: str, where: str) -> List[Segment]:
        """The export's prompt for a task's question text (as memvp-serve renders a user message)."""
        try:
            return chat_prompt([{"role": "user", "content": context}], self.cfg.data.prompt_format,
                               tokenizer=self.tokenizer).segments
        except RequestError as err:
            raise ValueError(f"{where}: the task's question text gives no question ({err})") from None

    def _prompt_ids(self, context: str, task: str, where: str) -> List[int]:
        """The token ids of the export's prompt for a question text (the first of each task is logged)."""
        ids = prompt_format(self.cfg.data.prompt_format).tokenize(self.tokenizer, self._segments(context, where),
                                                                  self.cfg.data.max_seq_len).input_ids
        self._show_prompt(task, ids)
        return ids

    def _show_prompt(self, task: str, ids: List[int]) -> None:
        """Log each task's first prompt once: what the model is asked is visible in the harness's log."""
        if task not in self._shown_prompt and self.rank == 0:
            self._shown_prompt.add(task)
            eval_logger.info(f"memvp: first prompt of task {task}: {self.tokenizer.decode(ids)!r}")

    def _image(self, doc_to_visual: Optional[Callable], doc_id: int, task: str, split: str) -> Optional[Image.Image]:
        """The document's one image (None for a task without visuals)."""
        if doc_to_visual is None:
            return None
        return one_image(doc_to_visual(self.task_dict[task][split][doc_id]), f"task {task}, doc {doc_id}")

    def _visual_inputs(self, images: Sequence[Optional[Image.Image]]) -> Dict[str, torch.Tensor]:
        """The model's visual keyword arguments for a batch (features in the model's dtype, as memvp-eval)."""
        encoded = self.encoder.encode([[] if image is None else [self.encoder.pixels(image)] for image in images])
        return {name: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
                for name, value in encoded.items()}

    @torch.inference_mode()
    def _greedy(self, prompts: Sequence[List[int]], images: Sequence[Optional[Image.Image]],
                max_new_tokens: int) -> List[str]:
        """Greedy answers of one left-padded batch, decoded as memvp-eval decodes them."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        tokens = self.model.generate(ids, mask, **self._visual_inputs(images), max_new_tokens=max_new_tokens,
                                     eos_token_id=eos)
        return [self.tokenizer.decode([t for t in row if t != eos], skip_special_tokens=True)
                for row in tokens.tolist()]

    def _default_new_tokens(self) -> int:
        from memvp_ds.evaluation.run import answer_tokens

        return answer_tokens(self.cfg)

    # -- lmms-eval's interface ---------------------------------------------------------------------------

    def generate_until(self, requests: List[Instance]) -> List[str]:
        """Greedy answers; requests with the same generation settings are batched, longest prompts first."""
        answers: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        bar = progress(total=len(requests), desc="memvp generate_until", unit="requests", enabled=self.rank == 0)
        for indices in groups.values():
            _, gen_kwargs, _, _, task, _ = requests[indices[0]].args
            until, max_new_tokens = greedy_settings(gen_kwargs, f"task {task}")
            prompts = {}
            for index in indices:
                context, _, _, doc_id, task, _ = requests[index].args
                prompts[index] = self._prompt_ids(context, task, f"task {task}, doc {doc_id}")
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                images = [self._image(*requests[i].args[2:]) for i in batch]
                texts = self._greedy([prompts[i] for i in batch], images, max_new_tokens or self._default_new_tokens())
                for index, text in zip(batch, texts):
                    answers[index] = cut_at_stop(text, until)
                bar.update(len(batch))
        bar.close()
        return answers

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        """(the continuation's loss after the prompt: its tokens' mean negative log-probability, whether greedy
        decoding would produce it)."""
        encoded = []
        if not prompt_format(self.cfg.data.prompt_format).eos_after_answer:
            raise ValueError(f"log-likelihood tasks: a data.prompt_format={self.cfg.data.prompt_format} export is "
                             "scored with generate_until tasks only (its answers end in the template's own "
                             "end-of-turn token)")
        for request in requests:
            if len(request.args) != 6:
                raise ValueError(f"task {request.task_name}: context-free log-likelihoods (acc_mutual_info) are "
                                 "not supported by the memvp model; use acc or acc_norm")
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(continuation, str):  # a loglikelihood task passes its doc_to_target
                continuation = continuation(self.task_dict[task][split][doc_id])
            segments = self._segments(context, f"task {task}, doc {doc_id}") + [(continuation, True)]
            text = encode_segments(self.tokenizer, segments, self.cfg.data.max_seq_len)
            # Without the EOS that ends a training answer: the task scores its continuation, not its end.
            encoded.append((text.input_ids[:-1], text.labels[:-1]))
            self._show_prompt(task, text.input_ids[:-1])
        scores: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i][0]))
        bar = progress(total=len(requests), desc="memvp loglikelihood", unit="requests", enabled=self.rank == 0)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            images = [self._image(*requests[i].args[2:]) for i in batch]
            for index, score in zip(batch, self._score([encoded[i] for i in batch], images)):
                scores[index] = score
            bar.update(len(batch))
        bar.close()
        return scores

    @torch.inference_mode()
    def _score(self, rows: Sequence[Tuple[List[int], List[int]]], images: Sequence[Optional[Image.Image]]
               ) -> List[Tuple[float, bool]]:
        """(mean negative log-probability of the labelled tokens, all of them the argmax) of right-padded rows
        (the training layout)."""
        longest = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids, _ in rows], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in rows], device=self.device)
        labels = torch.tensor([labels + [-100] * (longest - len(labels)) for _, labels in rows], device=self.device)
        hidden = self.model(ids, mask, labels=labels, **self._visual_inputs(images)).hidden
        targets = labels[:, 1:]
        counted = targets >= 0
        logprobs = torch.log_softmax(self.model.llm.get_output_embeddings()(hidden[:, :-1][counted]).float(), -1)
        wanted = targets[counted]
        rows_of = counted.nonzero()[:, 0]
        zeros = torch.zeros(len(rows), device=self.device)
        loss = zeros.index_add(0, rows_of, -logprobs.gather(-1, wanted[:, None])[:, 0]) / counted.sum(1).clamp(min=1)
        missed = zeros.index_add(0, rows_of, (logprobs.argmax(-1) != wanted).float())
        return [(float(value), not bool(miss)) for value, miss in zip(loss.tolist(), missed.tolist())]

    def generate_until_multi_round(self, requests: List[Instance]) -> List[List[str]]:
        """Each request's rounds answered greedily: round 0 from the request, every next one from the task's
        ``doc_to_text(doc, previous_output=, round_idx=, previous_round_info=)``, which returns (images, question,
        done, the rounds' results, info for the next round); the answer is the rounds' results when done."""
        answers = []
        bar = progress(total=len(requests), desc="memvp multi-round", unit="requests", enabled=self.rank == 0)
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            where = f"task {task}, doc {doc_id}"
            until, max_new_tokens = greedy_settings(gen_kwargs, f"task {task}")
            doc = self.task_dict[task][split][doc_id]
            visuals, rounds, info, round_idx = doc_to_visual(doc) if doc_to_visual else None, [], None, 0
            while True:
                ids = self._prompt_ids(context, task, where)
                text = self._greedy([ids], [one_image(visuals, where)], max_new_tokens or self._default_new_tokens())[0]
                rounds, round_idx = list(rounds) + [cut_at_stop(text, until)], round_idx + 1
                visuals, context, done, rounds, info = doc_to_text(doc, previous_output=list(rounds),
                                                                   round_idx=round_idx, previous_round_info=info)
                if done:
                    break
            answers.append(list(rounds))
            bar.update(1)
        bar.close()
        return answers


def _load(weights: str, llm_path: Optional[str], clip_pretrained: Optional[str], device: torch.device):
    """(model, config, tokenizer, image encoder) of an export, as memvp-serve loads them."""
    import dataclasses

    from memvp_ds.cli import llm_path_overrides
    from memvp_ds.data.tokenizer import load_tokenizer, tokenizer_path
    from memvp_ds.model.llm import check_vocab_fits
    from memvp_ds.export import load_exported, read_export_metadata, read_feature_recipe
    from memvp_ds.serve.images import ImageEncoder

    online = read_export_metadata(weights)["model"].get("vision", {}).get("online", False)
    clip_override = [f"model.vision.recipe.pretrained={clip_pretrained}"] if online and clip_pretrained else []
    model, cfg = load_exported(weights, llm_path_overrides(llm_path) + clip_override)
    model.to(device).eval()
    tokenizer_dir = tokenizer_path(cfg)
    tokenizer = load_tokenizer(tokenizer_dir, cfg.model.llm.trust_remote_code)
    check_vocab_fits(len(tokenizer), tokenizer_dir, cfg.model.llm)
    recipe = dataclasses.asdict(cfg.model.vision.recipe) if online else read_feature_recipe(weights)
    return model, cfg, tokenizer, ImageEncoder(recipe, online, clip_pretrained, str(device))
