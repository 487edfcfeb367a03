"""memvp-info: where an export came from, in one command.

    memvp-info runs/x/export/trainable.safetensors
    memvp-info runs/x/export/trainable.safetensors --json     # the whole record, machine-readable

Prints the model (LLM, strategy, trainable tensors), the feature recipe its images need, and its provenance:
the git commit of the code that trained it (and whether that checkout had uncommitted changes), the package
versions, the resolved config's hash (locations left out, so a moved run keeps it), the data manifest's hash
and the seed. Reads only the file's header: no model is built.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memvp_ds.cli import command, parser as cli_parser  # noqa: E402


def describe(path: str) -> Dict[str, Any]:
    """The export's config summary, tensors, feature recipe and provenance."""
    from safetensors import safe_open

    from memvp_ds.export import RECIPE_KEY, read_export_metadata, read_provenance

    config = read_export_metadata(path)
    with safe_open(path, framework="pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
        metadata = f.metadata() or {}
    llm = config["model"]["llm"]
    return {
        "export": os.path.abspath(path),
        "strategy": config["model"]["strategy"],
        "llm": llm.get("path") or f"inline config ({llm.get('config', {}).get('model_type', '?')})",
        "prompt_format": config["data"]["prompt_format"],
        "trainable_tensors": len(shapes),
        "trainable_parameters": sum(math.prod(shape) for shape in shapes.values()),
        "feature_recipe": json.loads(metadata[RECIPE_KEY]) if RECIPE_KEY in metadata else None,
        "provenance": read_provenance(path),
    }


def format_text(info: Dict[str, Any]) -> str:
    lines = [f"export: {info['export']}",
             f"model: {info['strategy']} on {info['llm']}; prompt format {info['prompt_format']}; "
             f"{info['trainable_parameters']:,} trainable parameters in {info['trainable_tensors']} tensors"]
    recipe = info["feature_recipe"]
    if recipe:
        lines.append("features: " + ", ".join(f"{k}={v}" for k, v in sorted(recipe.items())))
    prov = info["provenance"]
    if prov is None:
        lines.append("provenance: not recorded (an export from before memvp_ds stored it)")
        return "\n".join(lines)
    commit = prov["git_commit"] or "unknown (installed package, no git checkout)"
    if prov["git_dirty"]:
        commit += " with uncommitted changes"
    lines += [f"code: {commit}",
              "versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v),
              f"config sha256: {prov['config_sha256']}",
              f"data manifest sha256: {prov['data_manifest_sha256'] or 'unknown (no manifest)'}",
              f"seed: {prov['seed']}; trained from {prov['created_utc']}"]
    if "started_by" in prov:
        first = prov["started_by"]
        lines.append(f"resumed: the first steps ran on code {first['git_commit'] or 'unknown'} from {first['created_utc']}")
    return "\n".join(lines)


@command
def main(argv) -> int:
    parser = cli_parser("memvp-info", __doc__)
    parser.add_argument("export", help="an export .safetensors written by training")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.export):
        raise FileNotFoundError(f"{args.export}: no such export file")
    info = describe(args.export)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
