"""Throughput of `memvp-prep extract`, end to end and per stage (decode, model, write).

    python benchmarks/extract.py                       # tiny ViT on CPU, 400 synthetic images
    python benchmarks/extract.py --model ViT-L-14 --images 20000 --workers 16 --batch-size 256   # GPU

Random weights are fine: speed does not depend on them. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.extract import ExtractOptions, _collate, _ImageDataset, run_extract  # noqa: E402
from data_prep.sources import ScienceQASource  # noqa: E402
from data_prep.synthetic import make_synthetic_scienceqa  # noqa: E402
from memvp_ds.vision.clip_features import ClipFeatureExtractor, FeatureRecipe, load_clip_visual  # noqa: E402

TINY_VIT = str(Path(__file__).resolve().parents[1] / "memvp_ds" / "vision" / "model_configs" / "tiny-vit.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY_VIT, help="open_clip model name or config JSON")
    parser.add_argument("--image-size", type=int, help="model input size (default: 64 for the tiny ViT, else 224)")
    parser.add_argument("--source-size", type=int, default=224, help="pixel size of the synthetic source images")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/extract.json")
    args = parser.parse_args(argv)
    image_size = args.image_size or (64 if args.model == TINY_VIT else 224)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipe = FeatureRecipe(model=args.model, pretrained="random", image_size=image_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_synthetic_scienceqa(str(root / "sqa"), num_train=args.images, num_val=0, num_test=0,
                                 image_size=args.source_size, text_only_fraction=0.0)
        source = ScienceQASource(str(root / "sqa"), ["train"])
        examples = list(source.examples())

        start = time.perf_counter()  # decode only: the DataLoader with its workers
        items = [(i, path) for i, example in enumerate(examples) for path in example.images]  # as run_extract
        loader = torch.utils.data.DataLoader(_ImageDataset(items, recipe), batch_size=args.batch_size,
                                             num_workers=args.workers, collate_fn=_collate)
        batches = [b[1] for b in loader]
        decode = len(examples) / (time.perf_counter() - start)

        extractor = ClipFeatureExtractor(load_clip_visual(recipe), recipe).to(device)
        autocast = torch.autocast(device, dtype=torch.float16, enabled=device == "cuda")
        with autocast:
            extractor(batches[0].to(device))  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            for images in batches:
                extractor(images.to(device, non_blocking=True)).float().cpu()
        if device == "cuda":
            torch.cuda.synchronize()
        model = len(examples) / (time.perf_counter() - start)

        start = time.perf_counter()
        run_extract(source, recipe, ExtractOptions(out_dir=str(root / "shards"), batch_size=args.batch_size,
                                                   num_workers=args.workers, samples_per_shard=1000))
        end_to_end = len(examples) / (time.perf_counter() - start)
    results = {"device": device, "model": Path(args.model).stem, "images": len(examples), "workers": args.workers,
               "decode_images_per_s": decode, "model_images_per_s": model, "end_to_end_images_per_s": end_to_end}
    print(f"{'stage':<26}{'images/s':>10}")
    for key in ("decode_images_per_s", "model_images_per_s", "end_to_end_images_per_s"):
        print(f"{key.removesuffix('_images_per_s'):<26}{results[key]:>10.1f}")
    print("(end to end includes model loading, writing shards and checksums)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
