"""A small ScienceQA-format dataset whose answers need the image: coloured shapes at positions.

Each image shows one or two shapes; questions ask for the colour of a shape, the shape at a position, or
the position of a coloured shape. The options always include plausible distractors present in the
question's vocabulary, so a model that ignores the image scores near chance (1 / number of options).
A tenth of the questions are text-only (answerable from the context), like ScienceQA's TXT/NO problems.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw

from memvp_ds.atomic_io import atomic_open

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
_SUBJECTS = {"colour": "natural science", "shape": "language science", "position": "social science"}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, position: str, size: int) -> None:
    cx, cy = (int(c * size) for c in _CENTRES[position])
    r = size // 6
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _options(answer: str, pool: Tuple[str, ...]) -> Tuple[List[str], int]:
    """All values of the asked attribute, in a fixed order: the letter identifies the value, so only the
    image (or the text context) can tell which letter is right."""
    return list(pool), pool.index(answer)


def _question(kind: str, colour: str, shape: str, position: str) -> Tuple[str, List[str], int]:
    """(question, choices, answer index) asking for one attribute of a shape with the given attributes."""
    if kind == "colour":
        return (f"What colour is the {shape}?", *_options(colour, tuple(COLOURS)))
    if kind == "shape":
        return (f"Which shape is at the {position}?", *_options(shape, SHAPES))
    return (f"Where is the {colour} {shape}?", *_options(position, POSITIONS))


def _image_problem(rng: random.Random, size: int, max_shapes: int) -> Tuple[Dict, Image.Image]:
    count = rng.randint(1, max_shapes)
    positions = rng.sample(POSITIONS, count)
    colours = rng.sample(list(COLOURS), count)
    shapes = rng.sample(SHAPES, count)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for shape, colour, position in zip(shapes, colours, positions):
        draw_shape(draw, shape, colour, position, size)
    target = rng.randrange(count)
    kind = rng.choice(("colour", "shape", "position"))
    question, choices, answer = _question(kind, colours[target], shapes[target], positions[target])
    problem = {"question": question, "choices": choices, "answer": answer, "hint": "", "image": "image.png",
               "subject": _SUBJECTS[kind], "category": kind, "topic": "shapes"}
    return problem, image


def _text_problem(rng: random.Random) -> Dict:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    hint = f"Sam drew a {colour} {shape} on the board."
    if rng.random() < 0.5:
        question = "What colour did Sam use?"
        choices, answer = _options(colour, tuple(COLOURS))
    else:
        question = "What shape did Sam draw?"
        choices, answer = _options(shape, SHAPES)
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": None,
            "subject": "language science", "category": "reading", "topic": "reading"}


def make_synthetic_scienceqa(
    out_dir: str, num_train: int = 2000, num_val: int = 200, num_test: int = 500, image_size: int = 64,
    text_only_fraction: float = 0.1, seed: int = 0, max_shapes: int = 2,
) -> Dict[str, int]:
    """Write problems.json, pid_splits.json and images/{split}/{pid}/image.png; return counts per split.

    ``max_shapes=1`` gives one shape per image (no need to tell two shapes apart: an easier task)."""
    rng = random.Random(seed)
    problems: Dict[str, Dict] = {}
    splits: Dict[str, List[str]] = {"train": [], "val": [], "test": [], "minival": []}
    pid = 0
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        for _ in range(count):
            pid += 1
            key = str(pid)
            if rng.random() < text_only_fraction:
                problem = _text_problem(rng)
            else:
                problem, image = _image_problem(rng, image_size, max_shapes)
                image_dir = os.path.join(out_dir, "images", split, key)
                os.makedirs(image_dir, exist_ok=True)
                image.save(os.path.join(image_dir, "image.png"))
            problem.update(split=split, grade=f"grade{rng.randint(1, 12)}", lecture="", solution="")
            problems[key] = problem
            splits[split].append(key)
    splits["minival"] = splits["val"][: max(1, num_val // 4)] if num_val else []
    os.makedirs(out_dir, exist_ok=True)
    for name, data in (("problems.json", problems), ("pid_splits.json", splits)):
        with atomic_open(os.path.join(out_dir, name)) as f:
            json.dump(data, f)
    return {split: len(ids) for split, ids in splits.items()}


def described_scene_problems(count: int, seed: int = 1) -> List[Dict]:
    """Text-only problems with the image questions' wording whose context describes a random scene ("The
    picture shows a red circle at the left."): a reading-comprehension corpus for pre-training the demo's
    stand-in LLM, so that, like LLaMA, it can answer these questions when told what a picture shows.

    The scenes are drawn afresh (``seed`` differs from the dataset's): no image of the dataset is described,
    and a prompt without a description (an image question's "Context: N/A") still cannot tell the answer.
    """
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS)
        kind = rng.choice(("colour", "shape", "position"))
        question, choices, answer = _question(kind, colour, shape, position)
        problems.append({"question": question, "choices": choices, "answer": answer, "image": None,
                         "hint": f"The picture shows a {colour} {shape} at the {position}.",
                         "subject": _SUBJECTS[kind], "category": "described", "topic": "shapes"})
    return problems
