"""A seeded synthetic counterfactual dataset: coloured shapes drawn with PIL.

Image counterfactuals keep the question text and change one attribute of the picture (the seed's red vs green
apple); text counterfactuals keep the picture and change the question. Each row's response describes the chosen
side only.

- :func:`counterfactual_rows`: the original one-shape rows (colour or shape changes), kept for existing tests.
- :func:`scene_rows`: scenes of 1-3 shapes with a colour, a count and a position on a 3 × 3 grid; each pair
  differs in exactly one named attribute, recorded in the row (``kind``, ``attribute``, ``chosen_scene``,
  ``rejected_scene``). :func:`to_dataset` / :func:`write_jsonl` store them; ``python -m adpo.synthetic`` too.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
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


# ---------------------------------------------------------------------------------------------------------------
# Scenes: shapes with a colour, a count and a position, and counterfactual pairs that differ in ONE attribute.
# ---------------------------------------------------------------------------------------------------------------

COUNT_WORDS = ("zero", "one", "two", "three")
COUNTS = (1, 2, 3)
POSITIONS = ("left", "right")
ATTRIBUTES = ("colour", "shape", "count", "position")
SCENE_QUESTION = "Describe the shapes in this image."
# Text counterfactuals: the same picture; the two questions name different values of one attribute.
TEXT_TEMPLATES = {
    "colour": "Describe the {} shapes.",
    "shape": "Describe the {}s.",
    "count": "Describe the {} shapes.",
    "position": "Describe the shapes on the {}.",
}


@dataclass(frozen=True)
class Scene:
    """``count`` copies of one ``shape`` in one ``colour``, stacked in the ``position`` half of the canvas.

    ``position`` is ``left``, ``right`` or ``centre`` (used when position is not a varied attribute).
    """

    shape: str
    colour: str
    count: int = 1
    position: str = "centre"

    def value(self, attribute: str) -> Any:
        return getattr(self, attribute)

    def describe(self, attributes: tuple[str, ...] = ATTRIBUTES) -> str:
        """The answer text, e.g. ``Two red circles on the left.`` (count/position only when they vary)."""
        if "count" in attributes:
            head = f"{COUNT_WORDS[self.count].capitalize()} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"
        else:
            head = f"A {self.colour} {self.shape}"
        where = f" on the {self.position}" if "position" in attributes else ""
        return f"{head}{where}."

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def attribute_values(attribute: str) -> tuple[Any, ...]:
    """The values an attribute can take."""
    table: dict[str, tuple[Any, ...]] = {
        "colour": tuple(sorted(COLOURS)), "shape": SHAPES, "count": COUNTS, "position": POSITIONS,
    }
    if attribute not in table:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
    return table[attribute]


def random_scene(rng: random.Random, attributes: tuple[str, ...] = ATTRIBUTES) -> Scene:
    """Colour and shape are always drawn; count and position only when they are among ``attributes``."""
    return Scene(
        shape=rng.choice(SHAPES),
        colour=rng.choice(attribute_values("colour")),
        count=rng.choice(COUNTS) if "count" in attributes else 1,
        position=rng.choice(POSITIONS) if "position" in attributes else "centre",
    )


def change(scene: Scene, attribute: str, rng: random.Random) -> Scene:
    """A copy of ``scene`` with ``attribute`` set to another value (drawn from ``rng``)."""
    other = rng.choice([v for v in attribute_values(attribute) if v != scene.value(attribute)])
    return replace(scene, **{attribute: other})


def render_scene(scene: Scene, size: int = 48, slots: int = 3) -> Image.Image:
    """Draw ``scene`` on a white ``size`` × ``size`` canvas divided into a 3 × 3 grid of cells.

    The shapes stand in one column (``left``, ``centre`` or ``right``) and fill its first ``count`` cells from the
    top; with ``slots=1`` (the count never changes) the single shape sits in the middle row, and a ``centre``
    scene with ``slots=1`` is one shape as large as the canvas. So changing the count only adds or removes cells,
    changing the position only moves the column, and changing the colour or the shape leaves every other pixel
    alone. At ``size=48`` a cell is 16 pixels: exactly one image token of a model with 8-pixel patches and a
    pixel-shuffle factor of 2 (SmolVLM's connector), so no shape is split between tokens.
    """
    if not 1 <= scene.count <= slots:
        raise ValueError(f"a scene of {scene.count} shapes needs 1 <= count <= slots={slots}")
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    if slots == 1 and scene.position == "centre":
        canvas.paste(draw_shape(scene.shape, scene.colour, size), (0, 0))
        return canvas
    cell = size // 3
    tile = draw_shape(scene.shape, scene.colour, cell)
    column = {"left": 0, "centre": 1, "right": 2}[scene.position]
    rows = [1] if slots == 1 else range(scene.count)
    for row in rows:
        canvas.paste(tile, (column * cell, row * cell))
    return canvas


def scene_pair_row(
    rng: random.Random, kind: str, attributes: tuple[str, ...], size: int
) -> dict[str, Any]:
    """One ADPO row: an image or a text counterfactual in one attribute drawn from ``attributes``."""
    scene = random_scene(rng, attributes)
    attribute = rng.choice(attributes)
    slots = len(COUNTS) if "count" in attributes else 1
    image = render_scene(scene, size, slots)
    row: dict[str, Any] = {"response": scene.describe(attributes), "kind": kind, "attribute": attribute}
    if kind == "image":
        other = change(scene, attribute, rng)
        row |= {"chosen": SCENE_QUESTION, "chosen_images": [image],
                "rejected": SCENE_QUESTION, "rejected_images": [render_scene(other, size, slots)]}
    elif kind == "text":
        other = change(scene, attribute, rng)
        word = TEXT_TEMPLATES[attribute]
        row |= {"chosen": word.format(_word(scene, attribute)), "chosen_images": [image],
                "rejected": word.format(_word(other, attribute)), "rejected_images": [image]}
    else:
        raise ValueError(f"unknown kind {kind!r}; expected image or text")
    row |= {"chosen_scene": scene.to_json(), "rejected_scene": other.to_json()}
    return row


def _word(scene: Scene, attribute: str) -> str:
    value = scene.value(attribute)
    return COUNT_WORDS[value] if attribute == "count" else str(value)


def scene_rows(
    n: int,
    seed: int = 0,
    kinds: tuple[str, ...] = ("image",),
    attributes: tuple[str, ...] = ATTRIBUTES,
    size: int = 48,
) -> list[dict[str, Any]]:
    """``n`` ADPO rows of scene counterfactuals, the same for the same arguments.

    Each row: ``response`` (describes the chosen scene), ``chosen``/``rejected`` (questions),
    ``chosen_images``/``rejected_images`` (one PIL image each), and metadata columns ``kind`` (image: same
    question, the rejected picture differs in one attribute; text: same picture, the rejected question names another
    value of one attribute), ``attribute`` (which one), ``chosen_scene``/``rejected_scene`` (JSON of the
    :class:`Scene` behind each side). Kinds alternate in the order given, so each is ``n / len(kinds)`` rows.
    """
    for attribute in attributes:
        attribute_values(attribute)  # fail on a typo before drawing anything
    rng = random.Random(seed)
    return [scene_pair_row(rng, kinds[i % len(kinds)], tuple(attributes), size) for i in range(n)]


def corpus(attributes: tuple[str, ...] = ATTRIBUTES) -> list[str]:
    """Every question and answer text the scene generator can produce (to train a tiny model's tokenizer)."""
    texts = [SCENE_QUESTION]
    for attribute, template in TEXT_TEMPLATES.items():
        texts += [template.format(COUNT_WORDS[v] if attribute == "count" else v) for v in attribute_values(attribute)]
    for shape in SHAPES:
        for colour in attribute_values("colour"):
            for count in COUNTS:
                for position in POSITIONS:
                    texts.append(Scene(shape, colour, count, position).describe(attributes))
    return texts


def to_dataset(rows: list[dict[str, Any]]) -> Any:
    """Rows (PIL images) → a ``datasets.Dataset`` with ``List(Image())`` image columns (PNG bytes embedded)."""
    from .datasets_tools import rows_to_dataset

    return rows_to_dataset(rows)


if __name__ == "__main__":  # python -m adpo.synthetic
    import sys

    # The CLI imports this module by name: hand it this copy, so the module is not executed a second time.
    sys.modules.setdefault("adpo.synthetic", sys.modules[__name__])
    from .cli.synthetic import main

    raise SystemExit(main())
