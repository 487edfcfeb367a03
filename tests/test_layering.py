"""The import graph follows the architecture: every import points down the layers, and there is no cycle.

Layers, bottom to top (docs/architecture.md): config and the leaf helpers; the run folder's layout and the
answer scorers; vision (the CLIP recipe and the online tower); model and data (which do not import each other;
data does not import vision); search; schema and evaluation; the export format; engine; the applications (train,
evaluate, predict, serve); the plug-ins for other tools (lmms-eval), built from the applications' parts; the
data_prep tool; the demo. Every import counts, also those deferred into functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("memvp_ds", "data_prep", "memvp_demo")

LAYERS = [
    ("memvp_ds.config", "memvp_ds.atomic_io", "memvp_ds.distributed", "memvp_ds.recipes", "memvp_ds.cli",
     "memvp_ds.progress", "memvp_ds.run_lock", "memvp_ds.stop_signals", "memvp_ds.schedule",
     "memvp_ds.scalar_logger"),
    ("memvp_ds.run_folder", "memvp_ds.scoring", "memvp_ds.gguf_files"),
    ("memvp_ds.vision",),
    ("memvp_ds.model", "memvp_ds.data"),
    ("memvp_ds.search",),
    ("memvp_ds.schema", "memvp_ds.evaluation"),
    ("memvp_ds.export", "memvp_ds.provenance"),
    ("memvp_ds.engine",),
    ("memvp_ds.train", "memvp_ds.evaluate", "memvp_ds.predict", "memvp_ds.info", "memvp_ds.serve", "memvp_ds"),
    ("memvp_ds.integrations",),
    ("data_prep",),
    ("memvp_demo",),
]
# Independent of each other: the model needs no data code and vice versa; the data stream delivers stored
# pixels or features without CLIP code (the online tower normalises pixels itself).
SIBLINGS_THAT_MUST_NOT_MEET = [("memvp_ds.model", "memvp_ds.data"), ("memvp_ds.data", "memvp_ds.vision")]
# Readers of an export (evaluation, prediction, the demo) reach it through memvp_ds.export, never the training engine.
ENGINE_FREE = ("memvp_ds.evaluate", "memvp_ds.predict", "memvp_ds.evaluation", "memvp_ds.serve", "memvp_ds.info",
               "memvp_ds.integrations", "memvp_demo")
# Each name of the run folder and the shard folder is spelled in one module, which everything else asks.
OWNED_LITERALS = ("status.json", "trainable.safetensors", "search.json", "manifest.json", "config.yaml")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = _module_name(path)
            targets = graph.setdefault(module, set())
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets.add(node.module)
                elif isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
            graph[module] = {t for t in targets if t.split(".")[0] in PACKAGES}
    return graph


def _layer_of(module: str) -> tuple:
    """(layer index, component) of the most specific component that contains ``module``."""
    best = None
    for index, components in enumerate(LAYERS):
        for component in components:
            if module == component or module.startswith(component + "."):
                if best is None or len(component) > len(best[1]):
                    best = (index, component)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def _owning_module(name: str, graph: Dict[str, Set[str]]) -> str:
    """``from pkg.mod import name`` may name a function: the importable module is the longest known prefix."""
    while name not in graph and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_every_import_points_down_the_layers():
    graph = _import_graph()
    upward = []
    for module, targets in graph.items():
        layer, component = _layer_of(module)
        for target in targets:
            target = _owning_module(target, graph)
            target_layer, target_component = _layer_of(target)
            if target_component == component:
                continue
            if target_layer > layer or (target_layer == layer and target_component != component):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(sorted(upward))


def test_siblings_do_not_import_each_other():
    graph = _import_graph_cache
    met = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
           for a, b in SIBLINGS_THAT_MUST_NOT_MEET for x, y in ((a, b), (b, a))
           if _layer_of(module)[1] == x and _layer_of(_owning_module(target, graph))[1] == y]
    assert not met, "imports between independent components:\n" + "\n".join(sorted(met))


def test_there_is_no_import_cycle():
    graph = {m: {_owning_module(t, _import_graph_cache) for t in ts} for m, ts in _import_graph_cache.items()}
    state: Dict[str, int] = {}
    stack = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target == module or target.startswith(module + ".") and module in PACKAGES:
                continue  # a package __init__ re-exporting its own submodules
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_export_readers_do_not_import_the_engine():
    graph = _import_graph_cache
    found = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
             if _layer_of(module)[1] in ENGINE_FREE and _layer_of(_owning_module(target, graph))[1] == "memvp_ds.engine"]
    assert not found, "imports of the training engine by export readers:\n" + "\n".join(sorted(found))


def _code_strings(tree: ast.AST):
    """String constants of code (f-string parts included), not docstrings or other bare string statements."""
    documentation = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in documentation:
            yield node.value


def test_each_folder_name_is_spelled_in_one_module():
    spelled_in: Dict[str, Set[str]] = {literal: set() for literal in OWNED_LITERALS}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for text in _code_strings(ast.parse(path.read_text())):
                for literal in OWNED_LITERALS:
                    if literal in text:
                        spelled_in[literal].add(_module_name(path))
    assert all(len(modules) == 1 for modules in spelled_in.values()), spelled_in


def test_prompt_formats_are_compared_by_name_only_in_their_module():
    """A format's behaviour lives in its class (memvp_ds/data/prompts.py); nobody else switches on its name."""
    import re

    comparison = re.compile(r"prompt_format\w*\s*[!=]=|[!=]=\s*[\w.]*prompt_format")
    found = [f"{path.relative_to(REPO)}: {line.strip()}" for package in PACKAGES
             for path in sorted((REPO / package).rglob("*.py")) if path != REPO / "memvp_ds/data/prompts.py"
             for line in path.read_text().splitlines() if comparison.search(line)]
    assert not found, "format names compared outside memvp_ds/data/prompts.py:\n" + "\n".join(found)


def test_light_modules_do_not_load_torch():
    """data_prep's sources need one regex from the prompt code: that must not import torch or transformers."""
    import subprocess

    code = ("import sys; import memvp_ds.data.prompts, memvp_ds.config; "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


_import_graph_cache = _import_graph()
