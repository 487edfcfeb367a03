"""memvp-prep / python -m data_prep: turn image-text datasets into WebDataset shards of CLIP features."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from memvp_ds.cli import HelpFormatter, add_debug_option, command
from memvp_ds.data.shard_format import MANIFEST, Manifest, split_urls

DESCRIPTION = """\
Extract CLIP features once and write verified WebDataset shards for memvp_ds training.

Typical flow:
  memvp-prep synthetic data/synth                       # or use real ScienceQA
  memvp-prep extract --source scienceqa --root data/synth --out data/synth_shards \\
      --clip-model ViT-L-14 --clip-pretrained /ckpt/open_clip_vit_l14_openai.bin
  memvp-prep verify data/synth_shards
  memvp-prep tokenizer --source scienceqa --root data/synth --out data/tokenizer   # tiny models only
On a cluster: run extract with --part i/n in each array task, then merge + verify (slurm/extract.sh).
"""


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="dataset -> shards of CLIP features (resumable, splittable into parts)",
        description="Read a dataset, extract CLIP patch features with the MemVP recipe and write "
        f"{{split}}-{{index:06d}}.tar shards plus {MANIFEST}. Rerunning skips shards that are complete and "
        "intact. Missing or corrupt images are counted, listed in errors.jsonl and their samples kept "
        "text-only (or dropped).",
        formatter_class=HelpFormatter,
    )
    add_debug_option(p)
    _add_source_options(p)
    p.add_argument("--out", required=True, help="output folder for shards and manifest")
    p.add_argument("--clip-model", default="ViT-L-14",
                   help="open_clip model name, 'tiny-vit' (the shipped tiny tower: tests, demo) or a model-config JSON path")
    p.add_argument("--clip-pretrained", default="openai",
                   help="local checkpoint file, 'random' (tests/demo), or an open_clip tag with --allow-download")
    p.add_argument("--allow-download", action="store_true", help="let open_clip download pretrained weights")
    p.add_argument("--image-size", type=int,
                   help="input size in pixels (default: the CLIP model's own, e.g. 224 for ViT-L-14)")
    p.add_argument("--layer", choices=["penultimate", "last", "cls_every_4"], default="penultimate",
                   help="transformer block; cls_every_4: the CLS token after every 4th block (LaVIN's 6 tokens)")
    p.add_argument("--keep-cls", action="store_true", help="keep the CLS token (not the official recipe)")
    p.add_argument("--no-ln-post", action="store_true",
                   help="skip CLIP's final LayerNorm (LaVIN's tokens; DVP-SQA's last-block tokens with CLS)")
    p.add_argument("--no-quick-gelu", action="store_true", help="the weights use GELU rather than QuickGELU")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard file")
    p.add_argument("--shard-size-mb", type=float, help="target shard size (default: unset, --samples-per-shard decides)")
    p.add_argument("--batch-size", type=int, default=64, help="images per CLIP forward")
    p.add_argument("--workers", type=int, default=4, help="image decoding worker processes")
    p.add_argument("--part", default="0/1", help="i/n: this task's share of the shards (array jobs)")
    p.add_argument("--on-bad-image", choices=["text-only", "drop"], default="text-only",
                   help="what a sample with a missing or corrupt image becomes")
    p.add_argument("--store", choices=["features", "images", "both"], default="features",
                   help="per image: CLIP features, the resized image (for online CLIP with trainable adapters, "
                   "model.vision.online=true), or both")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def _add_source_options(p) -> None:
    """The options that name a dataset: shared by extract and tokenizer."""
    p.add_argument("--source", required=True, choices=["scienceqa", "llava", "jsonl"], help="dataset format")
    p.add_argument("--root", help="scienceqa: folder with problems.json, pid_splits.json, images/ (default: none)")
    p.add_argument("--annotations", help="llava/jsonl: the .json or .jsonl annotation file (default: none)")
    p.add_argument("--image-root", default=".", help="llava/jsonl: folder that image paths are relative to")
    p.add_argument("--split", default="train", help="llava/jsonl: split name for records without one")
    p.add_argument("--splits", nargs="*", help="scienceqa: splits to read (default: train val test)")
    p.add_argument("--captions", help="scienceqa: captions.json (default: <root>/captions.json when present); "
                   "stored per sample for the official evaluation context")


def _build_source(args):
    from data_prep.sources import JsonlQASource, LlavaSource, ScienceQASource

    if args.source == "scienceqa":
        if not args.root:
            raise ValueError("--root is required for --source scienceqa")
        return ScienceQASource(args.root, args.splits, args.captions)
    if not args.annotations:
        raise ValueError(f"--annotations is required for --source {args.source}")
    cls = LlavaSource if args.source == "llava" else JsonlQASource
    return cls(args.annotations, args.image_root, args.split)


def _parse_part(text: str):
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part must look like i/n (e.g. 0/4), got '{text}'") from None
    return index, count


def cmd_extract(args) -> int:
    from data_prep.clip_model import native_image_size
    from data_prep.extract import ExtractOptions, run_extract
    from memvp_ds.vision.clip_features import FeatureRecipe

    image_size = native_image_size(args.clip_model) if args.image_size is None else args.image_size
    recipe = FeatureRecipe(
        model=args.clip_model, pretrained=args.clip_pretrained, image_size=image_size, layer=args.layer,
        keep_cls=args.keep_cls, ln_post=not args.no_ln_post, quick_gelu=not args.no_quick_gelu,
    )
    index, count = _parse_part(args.part)
    opts = ExtractOptions(
        out_dir=args.out, samples_per_shard=args.samples_per_shard, shard_size_mb=args.shard_size_mb,
        batch_size=args.batch_size, num_workers=args.workers, part_index=index, part_count=count,
        on_bad_image=args.on_bad_image, device=args.device, allow_download=args.allow_download, store=args.store,
    )
    manifest = Manifest(run_extract(_build_source(args), recipe, opts))
    errors = manifest.bad_images
    for split, counts in manifest.split_counts().items():
        print(f"{split}: {counts['samples']} samples ({counts['with_image']} with image) in {counts['shards']} shards: "
              f"data.{split}_shards={shard_spec(args.out, manifest, split)}")
    print(f"bad images: {errors} ({'kept text-only' if opts.on_bad_image == 'text-only' else 'dropped'}); see errors.jsonl"
          if errors else "bad images: 0")
    return 0


def shard_spec(out_dir: str, manifest: Manifest, split: str) -> str:
    """The shard pattern of ``split`` to give to memvp-train (a brace range over the shard indices)."""
    names = [os.path.basename(url) for url in split_urls(out_dir, split, manifest)]
    first, last = names[0].rsplit("-", 1)[1][:-4], names[-1].rsplit("-", 1)[1][:-4]
    index = first if first == last else "{" + f"{first}..{last}" + "}"
    return f"{out_dir.rstrip('/')}/{split}-{index}.tar"


def cmd_tokenizer(args) -> int:
    from memvp_ds.data.prompts import build_segments, take_image_marks
    from memvp_ds.data.tokenizer import train_tokenizer

    prompt_format = args.prompt_format or PROMPT_FORMAT_OF_SOURCE[args.source]
    texts = ["".join(text for text, _ in take_image_marks(build_segments(example.fields, prompt_format))[0])
             for example in _build_source(args).examples()]
    if not texts:
        raise ValueError("tokenizer: the source has no records")
    tokenizer = train_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    print(f"byte-level BPE tokenizer with {len(tokenizer)} tokens, trained on {len(texts)} {prompt_format} texts: "
          f"data.tokenizer={args.out}")
    return 0


def cmd_verify(args) -> int:
    from data_prep.verify import verify

    problems = verify(args.dir)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(f"{args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_inspect(args) -> int:
    from data_prep.verify import inspect

    print(inspect(args.dir))
    return 0


def cmd_merge(args) -> int:
    from data_prep.verify import merge

    merged = merge(args.dir)
    print(f"merged {merged['merged_from']} parts: {len(merged['shards'])} shards -> {args.dir}/{MANIFEST}")
    return 0


def cmd_synthetic(args) -> int:
    from data_prep.synthetic import make_synthetic_scienceqa

    counts = make_synthetic_scienceqa(args.out, args.num_train, args.num_val, args.num_test, args.image_size, seed=args.seed)
    print(f"wrote synthetic ScienceQA to {args.out}: {counts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memvp-prep", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level log lines")
    add_debug_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_extract(sub)
    for name, help_text in (
        ("verify", "re-read every shard: count, sha256, feature shape and dtype, image size against the manifest; "
                   "exit 1 on any mismatch"),
        ("inspect", "print counts per split, the feature recipe and one sample"),
        ("merge", "combine manifest.part-i-of-n.json of all parts into " + MANIFEST),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        add_debug_option(p)
        p.add_argument("dir", help="shard folder (holds the manifest)")
    p = sub.add_parser("synthetic", help="write a small ScienceQA-format dataset of coloured shapes",
                       description="Coloured shapes at positions with multiple-choice questions that need the "
                       "image (plus ~10% text-only questions), in ScienceQA's file layout.",
                       formatter_class=HelpFormatter)
    add_debug_option(p)
    p.add_argument("out", help="output folder (problems.json, pid_splits.json, images/)")
    p.add_argument("--num-train", type=int, default=2000, help="training problems")
    p.add_argument("--num-val", type=int, default=200, help="validation problems")
    p.add_argument("--num-test", type=int, default=500, help="test problems")
    p.add_argument("--image-size", type=int, default=64, help="image width and height in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (the dataset is a function of it)")
    p = sub.add_parser("tokenizer", help="train a small byte-level BPE tokenizer on a dataset's text (tiny models)",
                       description="Train a byte-level BPE tokenizer on the prompts and answers of a dataset, as the "
                       "training prompts format them, and save it as a Hugging Face tokenizer folder (give it to "
                       "memvp-train as data.tokenizer). For the tiny random LLMs of tests and demos; a real LLM "
                       "brings its own tokenizer.", formatter_class=HelpFormatter)
    add_debug_option(p)
    _add_source_options(p)
    p.add_argument("--out", required=True, help="output folder of the tokenizer")
    p.add_argument("--vocab-size", type=int, default=512,
                   help="largest vocabulary; the tiny configs' LLM embeds 512 tokens, so at most that for them")
    p.add_argument("--prompt-format", choices=sorted(PROMPT_FORMAT_OF_SOURCE.values()),
                   help="text layout (default: qcm_a for scienceqa, conversation for llava, qa for jsonl)")
    return parser


PROMPT_FORMAT_OF_SOURCE = {"scienceqa": "qcm_a", "llava": "conversation", "jsonl": "qa"}
COMMANDS = {"extract": cmd_extract, "verify": cmd_verify, "inspect": cmd_inspect, "merge": cmd_merge,
            "synthetic": cmd_synthetic, "tokenizer": cmd_tokenizer}


@command
def main(argv) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
