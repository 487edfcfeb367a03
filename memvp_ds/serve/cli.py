"""memvp-serve: an OpenAI-compatible chat server for a trained export, with continuous batching.

    memvp-serve --weights runs/x/export/trainable.safetensors
    memvp-serve --weights trainable.safetensors --llm-path /local/llama-13b-hf --port 8000 \\
        --api-key "$(cat key.txt)" --max-rows 32 --image-root /srv/images

API (docs/serving.md): POST /v1/chat/completions (OpenAI's schema; text and image_url parts, the image as a
data: URL or a file under --image-root; stream: true for server-sent events; max_tokens, temperature (0 =
greedy, the default), top_p, seed, stop), GET /v1/models, GET /health, GET /metrics (Prometheus), and a web
page at / to try the model. Requests that arrive while others decode join the running batch at the next
step. The chat messages are rendered in the prompt format the export was trained with; images are encoded
with its feature recipe (the same CLIP code as data_prep). The export is read through memvp_ds.export: its
stored config is data (never remote code). Binds 127.0.0.1 unless --host says otherwise; with --api-key (or
MEMVP_API_KEY) every endpoint but /health and the page needs 'Authorization: Bearer <key>'. SIGTERM stops
accepting, lets in-flight requests finish (at most --drain-timeout seconds) and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from memvp_ds.cli import command, llm_path_overrides, parser as cli_parser  # noqa: E402
from memvp_ds.serve.limits import ServeLimits  # noqa: E402


def build_service(weights: str, overrides: Optional[List[str]] = None, limits: Optional[ServeLimits] = None,
                  api_key: Optional[str] = None, image_root: Optional[str] = None,
                  clip_pretrained: Optional[str] = None, model_name: Optional[str] = None, device: str = "cpu"):
    """Load the export, its tokenizer and image encoder onto ``device``; the engine is not started yet (the
    app starts it)."""
    from memvp_ds.data.tokenizer import load_tokenizer, tokenizer_path as resolve_tokenizer
    from memvp_ds.export import load_exported, read_export_metadata, read_feature_recipe
    from memvp_ds.serve.api import Service
    from memvp_ds.serve.engine import Engine
    from memvp_ds.serve.images import ImageEncoder
    from memvp_ds.serve.metrics import ServeMetrics

    limits = limits or ServeLimits()
    if image_root is not None and not os.path.isdir(image_root):
        raise NotADirectoryError(f"--image-root {image_root}: not a directory")
    online = read_export_metadata(weights)["model"].get("vision", {}).get("online", False)
    clip_override = [f"model.vision.recipe.pretrained={clip_pretrained}"] if online and clip_pretrained else []
    model, cfg = load_exported(weights, clip_override + list(overrides or []))
    model.to(device).eval()
    tokenizer_path = resolve_tokenizer(cfg)
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.llm.trust_remote_code)
    vocab = model.llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the LLM's embedding only "
                         f"{vocab}: model.llm.path and data.tokenizer do not belong together")
    recipe = dataclasses.asdict(cfg.model.vision.recipe) if online else read_feature_recipe(weights)
    encoder = ImageEncoder(recipe, online, clip_pretrained, device, cfg.data.max_images)
    # Several images per sample: each image's positions are in the prompt's ids, not added by the strategy.
    in_text = model.strategy.prefix_positions() if cfg.data.max_images > 1 else 0
    positions = model.llm.config.max_position_embeddings - (0 if in_text else model.strategy.prefix_positions())
    max_total = limits.max_total_tokens or positions
    if max_total > positions:
        raise ValueError(f"--max-total-tokens {max_total} exceeds the {positions} positions the LLM has "
                         "(less the strategy's visual prefix)")
    metrics = ServeMetrics()
    engine = Engine(model, tokenizer, encoder, limits, metrics.engine_stats())
    name = model_name or f"memvp_ds-{cfg.model.strategy}"
    return Service(engine, tokenizer, encoder, metrics, limits, name, cfg.data.prompt_format, max_total,
                   api_key, image_root, in_text)


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("memvp-serve", __doc__)
    parser.add_argument("--weights", required=True, help="export .safetensors written by training")
    parser.add_argument("--llm-path", help="another local copy of the base LLM (also the tokenizer); default: "
                        "the stored model.llm.path")
    parser.add_argument("--clip-pretrained", help="local CLIP checkpoint (default: the one in the stored recipe)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where the model runs (default: "
                        "cuda when there is a GPU, else cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--api-key", default=os.environ.get("MEMVP_API_KEY"),
                        help="require 'Authorization: Bearer <key>' (default: $MEMVP_API_KEY; unset: no key)")
    parser.add_argument("--model-name", help="the model id clients send (default: memvp_ds-<strategy>)")
    parser.add_argument("--image-root", help="folder whose files requests may name as image URLs (default: "
                        "none, data: URLs only)")
    defaults = ServeLimits()
    for name, spec in ServeLimits.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        kind = float if spec.type in ("float", float) else int
        doc = _field_doc(name)
        parser.add_argument(flag, type=kind, default=getattr(defaults, name), help=doc)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the export's stored config")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _field_doc(name: str) -> str:
    """The docstring under a ServeLimits field (the --help text, as configs document their keys)."""
    import ast
    import inspect

    source = ast.parse(inspect.getsource(ServeLimits))
    body = source.body[0].body
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and node.target.id == name and isinstance(following, ast.Expr):
            return " ".join(str(following.value.value).split())
    return ""


def serve(service, host: str, port: int) -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM; in-flight requests finish first (bounded)."""
    import uvicorn

    from memvp_ds.serve.api import create_app

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=max(1, round(service.limits.drain_timeout_s)))
    # uvicorn drains on SIGTERM and then re-raises it to the handler that was there before: with Python's
    # default the process would die by the signal. A drained shutdown is a success, so that handler is a no-op.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()


@command
def main(argv) -> int:
    args = build_parser().parse_args(argv)
    limits = ServeLimits(**{name: getattr(args, name) for name in ServeLimits.__dataclass_fields__})
    service = build_service(args.weights, llm_path_overrides(args.llm_path) + args.overrides, limits, args.api_key,
                            args.image_root, args.clip_pretrained, args.model_name, args.device)
    print(f"memvp-serve: {service.model_name} ({service.prompt_format} prompts) on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    serve(service, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
