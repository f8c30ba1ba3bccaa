"""A seeded synthetic counterfactual dataset: coloured shapes drawn with PIL.

Image counterfactuals keep the question text and change one attribute of the picture (the seed's red vs green
apple); text counterfactuals keep the picture and change the question. Each row's response describes the chosen
side only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What is shown in this image?"


def draw_shape(shape: str, colour: str, size: int = 32) -> Image.Image:
    """One ``shape`` filled with ``colour`` on a white square of ``size`` pixels."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    m, e = size // 8, size - size // 8 - 1
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((m, m, e, e), fill=fill)
    elif shape == "square":
        draw.rectangle((m, m, e, e), fill=fill)
    elif shape == "triangle":
        draw.polygon([(size // 2, m), (e, e), (m, e)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return image


def counterfactual_rows(n: int, seed: int = 0, kind: str = "image", size: int = 32) -> list[dict[str, Any]]:
    """``n`` ADPO rows with PIL images.

    kind ``image``: same question, the rejected picture differs from the chosen one in colour or shape.
    kind ``text``: same picture, the rejected question names another colour.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        chosen_image = draw_shape(shape, colour, size)
        response = f"A {colour} {shape}."
        if kind == "image":
            if rng.random() < 0.5:
                other = rng.choice([c for c in sorted(COLOURS) if c != colour])
                rejected_image = draw_shape(shape, other, size)
            else:
                other = rng.choice([s for s in SHAPES if s != shape])
                rejected_image = draw_shape(other, colour, size)
            chosen_text = rejected_text = QUESTION
        elif kind == "text":
            other = rng.choice([c for c in sorted(COLOURS) if c != colour])
            rejected_image = chosen_image
            chosen_text = f"Is the {shape} {colour}? Describe it."
            rejected_text = f"Is the {shape} {other}? Describe it."
        else:
            raise ValueError(f"unknown kind {kind!r}; expected image or text")
        rows.append({
            "response": response,
            "chosen": chosen_text,
            "chosen_images": [chosen_image],
            "rejected": rejected_text,
            "rejected_images": [rejected_image],
        })
    return rows


def write_jsonl(rows: list[dict[str, Any]], folder: str | Path, name: str = "train.jsonl") -> Path:
    """Write rows as JSONL with images saved as PNG files next to it (paths relative to the file)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("w") as f:
        for i, row in enumerate(rows):
            out = dict(row)
            for field in ("chosen_images", "rejected_images"):
                paths = []
                for j, image in enumerate(row[field]):
                    rel = f"images/{path.stem}_{i:05d}_{field.split('_')[0]}_{j}.png"
                    image.save(folder / rel)
                    paths.append(rel)
                out[field] = paths
            f.write(json.dumps(out) + "\n")
    return path
