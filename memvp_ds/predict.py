"""memvp-predict: answer one question about one image with trained weights.

    memvp-predict --weights runs/x/export/trainable.safetensors --image photo.png \\
        --question "What colour is the circle?" --choices red green blue yellow
    memvp-predict --weights trainable.safetensors --llm-path /local/llama-13b-hf \\
        --clip-pretrained /local/vit_l14_openai.bin --image photo.png --question "What is shown?"

The image goes through the same CLIP feature code and recipe as data_prep (stored in the export), so the
model sees exactly the kind of features it was trained on. A model trained with an online vision tower
(model.vision.online) instead gets the resized pixels and runs its own frozen CLIP with the trained
adapters. The CLIP weights must be a local file: the recipe's own path, or --clip-pretrained. The model is the
export's stored config with --llm-path and the key=value overrides on top.

The config stored in the export is data: it picks the LLM and the prompt format, never remote code
(trust_remote_code is always off here). The image is read before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from memvp_ds.cli import command, llm_path_overrides, parser as cli_parser  # noqa: E402


def read_image(image_path: str):
    """The decoded RGB image, or ValueError naming the file (checked before any model is loaded)."""
    from memvp_ds.vision.clip_features import load_image

    try:
        return load_image(image_path)
    except FileNotFoundError:
        raise
    except Exception as err:  # PIL raises several types for unreadable files
        raise ValueError(f"--image {image_path}: cannot read the image: {err}") from None


def extract_image_features(recipe_dict: dict, image, clip_pretrained: Optional[str] = None) -> torch.Tensor:
    """(1, N, C) features of one image (a path or a decoded image), made as data_prep makes them (and rounded
    to its storage dtype)."""
    from memvp_ds.vision.clip_features import ClipFeatureExtractor, FeatureRecipe, image_transform, load_clip_visual

    recipe = FeatureRecipe.from_stored(recipe_dict, **({"pretrained": clip_pretrained} if clip_pretrained else {}))
    extractor = ClipFeatureExtractor(load_clip_visual(recipe), recipe)
    pixels = image_transform(recipe)(read_image(image) if isinstance(image, str) else image)[None]
    return extractor(pixels).to(getattr(torch, recipe.dtype))


def image_pixels_for(recipe_dict: dict, image) -> torch.Tensor:
    """(1, 3, S, S) uint8 pixels of one image, resized as data_prep stores them for an online vision tower."""
    from memvp_ds.vision.clip_features import FeatureRecipe, image_pixels

    picture = read_image(image) if isinstance(image, str) else image
    return image_pixels(picture, FeatureRecipe.from_stored(recipe_dict))[None]


def question_ids(tokenizer, cfg, question: str, choices: List[str], hint: str = "") -> List[int]:
    """The prompt of one question in the export's format (``cfg``: its config). A model trained on
    conversations (``conversation``, ``chat_template``) is asked it as one user turn, options typed after it
    as memvp-serve's users type them; the question formats get the evaluation prompt (``qa`` without options)."""
    from memvp_ds.data.prompts import build_segments, prompt_format
    from memvp_ds.scoring.scienceqa import OPTION_LETTERS

    name = cfg.data.prompt_format
    if prompt_format(name).multi_turn:
        options = " ".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
        fields = {"conversations": [{"from": "human", "value": f"{question}\n{options}" if options else question}]}
    else:
        fields, name = {"question": question, "choices": choices, "hint": hint, "answer": 0}, name if choices else "qa"
    segments = build_segments(fields, name, with_target=False, tokenizer=tokenizer)
    return prompt_format(name).tokenize(tokenizer, segments, cfg.data.max_seq_len).input_ids


def answer(weights: str, image: Optional[str], question: str, choices: Optional[List[str]] = None,
           hint: str = "", clip_pretrained: Optional[str] = None, max_new_tokens: int = 16,
           overrides: Optional[List[str]] = None) -> str:
    """The model's answer to one question (``overrides``: ``key=value`` on top of the export's config)."""
    from memvp_ds.data.tokenizer import load_tokenizer, tokenizer_path as resolve_tokenizer
    from memvp_ds.export import load_exported, read_export_metadata, read_feature_recipe
    from memvp_ds.model.llm import check_vocab_fits

    picture = read_image(image) if image is not None else None
    online = read_export_metadata(weights)["model"].get("vision", {}).get("online", False)
    clip_override = [f"model.vision.recipe.pretrained={clip_pretrained}"] if online and clip_pretrained else []
    model, cfg = load_exported(weights, clip_override + list(overrides or []))
    model.eval()
    tokenizer_path = resolve_tokenizer(cfg)
    print(f"memvp-predict: LLM {cfg.model.llm.path or 'inline config'}, tokenizer {tokenizer_path}, "
          f"trust_remote_code={cfg.model.llm.trust_remote_code}", file=sys.stderr)
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.llm.trust_remote_code)
    check_vocab_fits(len(tokenizer), tokenizer_path, cfg.model.llm)
    ids = torch.tensor([question_ids(tokenizer, cfg, question, choices or [], hint)])
    visual = {}
    if picture is not None and model.vision is not None:  # the adapted CLIP inside the model makes the features
        visual["images"] = image_pixels_for(dataclasses.asdict(cfg.model.vision.recipe), picture)
    elif picture is not None:
        recipe = read_feature_recipe(weights)
        visual["image_features"] = extract_image_features(recipe, picture, clip_pretrained).float()
    tokens = model.generate(ids, **visual, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode([t for t in tokens[0].tolist() if t != tokenizer.eos_token_id], skip_special_tokens=True)


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("memvp-predict", __doc__)
    parser.add_argument("--weights", required=True, help="export .safetensors written by training")
    parser.add_argument("--image", help="image file (default: none, a text-only question)")
    parser.add_argument("--question", required=True, help="the question, as the dataset words it")
    parser.add_argument("--choices", nargs="*", help="multiple-choice options, in order (A), (B), ... "
                        "(default: none, a free-form answer)")
    parser.add_argument("--hint", default="", help="text context (ScienceQA's hint); default: none")
    parser.add_argument("--clip-pretrained", help="local CLIP checkpoint (default: the one in the stored recipe)")
    parser.add_argument("--llm-path", help="another local copy of the base LLM (also the tokenizer); default: "
                        "the stored model.llm.path")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy decoding length")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the export's stored config "
                        "(before --choices, which takes every word after it)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Arguments that would fail only after the model is loaded, checked before (one line each)."""
    from memvp_ds.config import check_at_least
    from memvp_ds.data.prompts import check_choice_count

    check_at_least("--max-new-tokens", args.max_new_tokens, 1)
    check_choice_count(args.choices or [], "--choices")


@command
def main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    output = answer(args.weights, args.image, args.question, args.choices, args.hint, args.clip_pretrained,
                    args.max_new_tokens, llm_path_overrides(args.llm_path) + args.overrides)
    print(output)
    if args.choices:
        from memvp_ds.scoring.scienceqa import parse_answer

        index = parse_answer(output, len(args.choices))
        print(f"parsed answer: {args.choices[index] if index is not None else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
