"""A procedural world of coloured shapes: images, COCO-like annotations and questions with known answers.

Each scene puts one to four objects on a plain background, one object per quadrant, so objects never
overlap and every object is named uniquely both by its shape and by its colour. Everything is a pure
function of (seed, split, index): a scene does not depend on how many others were generated.

Annotations mirror what LLaVA's instruction generator reads for a COCO image: five captions and the
object boxes (category + box). The question types with known answers are what the quickstart evaluates.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from llava_jax.data.conversation import IMAGE_PLACEHOLDER

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 10),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (15, 15, 15)}
# Quadrants in row-major order; an object's position is the quadrant holding its centre.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
MAX_OBJECTS = len(POSITIONS)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
_SPLIT_CODES = {"train": 0, "eval": 1, "test": 2}
# Object extent as a fraction of the quadrant side.
_SIZE_RANGE = {"small": (0.38, 0.50), "large": (0.66, 0.86)}
JITTER = 0.08


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str
    box: tuple  # (x1, y1, x2, y2) in pixels, x2/y2 exclusive: the tight extent of the drawn pixels
    center: tuple  # drawing geometry: centre (x, y) and half-extent, in pixels
    half: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    id: str
    seed: int
    split: str
    index: int
    image_size: int
    background: str
    objects: tuple

    @property
    def file_name(self) -> str:
        return f"{self.id}.png"

    def object_by(self, *, shape: Optional[str] = None, color: Optional[str] = None) -> SceneObject:
        found = [o for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)]
        if len(found) != 1:
            raise KeyError(f"scene {self.id}: {len(found)} objects match shape={shape} color={color}")
        return found[0]


@dataclasses.dataclass(frozen=True)
class Question:
    type: str
    question: str
    answer: str


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_CODES)}")
    return np.random.default_rng([seed, _SPLIT_CODES[split], index, stream])


# ----- geometry and rendering -------------------------------------------------------------------

def _shape_polygon(shape: str, cx: float, cy: float, half: float):
    """Vertices of the polygon shapes; None for the circle (drawn as an ellipse)."""
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    if shape == "cross":
        t = half / 3.0
        return [(cx - t, cy - half), (cx + t, cy - half), (cx + t, cy - t), (cx + half, cy - t),
                (cx + half, cy + t), (cx + t, cy + t), (cx + t, cy + half), (cx - t, cy + half),
                (cx - t, cy + t), (cx - half, cy + t), (cx - half, cy - t), (cx - t, cy - t)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    polygon = _shape_polygon(shape, cx, cy, half)
    if polygon is None:
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def _shape_mask(size: int, shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, half, 255)
    return np.asarray(canvas) > 0


def _tight_box(mask: np.ndarray) -> tuple:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def make_scene(seed: int, index: int, split: str = "train", image_size: int = 64) -> Scene:
    """Scene `index` of `split` for `seed`: 1-4 objects with distinct shapes, colours and quadrants."""
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    rng = _rng(seed, split, index, 0)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    shapes = rng.choice(len(SHAPES), count, replace=False)
    colors = rng.choice(len(COLORS), count, replace=False)
    cells = rng.choice(len(POSITIONS), count, replace=False)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    quad = image_size / 2.0
    objects = []
    for shape_i, color_i, cell in zip(shapes, colors, cells):
        shape, color = SHAPES[shape_i], list(COLORS)[color_i]
        size = SIZES[int(rng.integers(len(SIZES)))]
        half = quad * float(rng.uniform(*_SIZE_RANGE[size])) / 2.0
        # Centre jittered around the quadrant's centre by at most JITTER of the quadrant side (small
        # enough that a tiny vision tower learns shapes quickly), keeping a one-pixel margin so
        # objects never touch.
        row, col = divmod(int(cell), 2)
        cx, cy = (col + 0.5) * quad, (row + 0.5) * quad
        slack_x = min(JITTER * quad, cx - col * quad - half - 1, (col + 1) * quad - half - 2 - cx)
        slack_y = min(JITTER * quad, cy - row * quad - half - 1, (row + 1) * quad - half - 2 - cy)
        cx += float(rng.uniform(-1, 1)) * max(0.0, slack_x)
        cy += float(rng.uniform(-1, 1)) * max(0.0, slack_y)
        box = _tight_box(_shape_mask(image_size, shape, cx, cy, half))
        objects.append(SceneObject(shape, color, size, POSITIONS[int(cell)], box, (cx, cy), half))
    objects.sort(key=lambda o: POSITIONS.index(o.position))  # reading order
    return Scene(id=f"{split}_{seed}_{index:06d}", seed=seed, split=split, index=index,
                 image_size=image_size, background=background, objects=tuple(objects))


def with_other_shapes(scene: Scene) -> Scene:
    """The same scene with every object's shape replaced by another (colours, sizes, places kept):
    a hard negative whose captions differ from the scene's only in the shapes."""
    rng = _rng(scene.seed, scene.split, scene.index, 5)
    used = {o.shape for o in scene.objects}
    objects = []
    for obj in scene.objects:
        options = [s for s in SHAPES if s != obj.shape and s not in {o.shape for o in objects}]
        fresh = [s for s in options if s not in used] or options
        objects.append(dataclasses.replace(obj, shape=fresh[int(rng.integers(len(fresh)))]))
    return dataclasses.replace(scene, objects=tuple(objects))


def make_scenes(seed: int, count: int, split: str = "train", image_size: int = 64, start: int = 0) -> list:
    return [make_scene(seed, i, split, image_size) for i in range(start, start + count)]


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image, drawn without anti-aliasing so every pixel has an exact palette colour."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, *obj.center, obj.half, COLORS[obj.color])
    return image


# ----- language about a scene -------------------------------------------------------------------

def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _count_phrase(n: int, noun: str = "shape") -> str:
    return f"{NUMBER_WORDS[n]} {noun}" + ("s" if n != 1 else "")


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def captions(scene: Scene) -> list:
    """Five captions in five different phrasings, each listing the objects in its own random order."""
    rng = _rng(scene.seed, scene.split, scene.index, 1)
    objs = list(scene.objects)
    n, bg = len(objs), scene.background

    def order():
        return [objs[i] for i in rng.permutation(n)]

    plain = _join([_a(o.name) for o in order()])
    sized = _join([_a(f"{o.size} {o.name}") for o in order()])
    placed = _join([f"{_a(o.name)} at the {o.position}" for o in order()])
    full = _join([f"{_a(f'{o.size} {o.name}')} in the {o.position}" for o in order()])
    first, *rest = order()
    corner = f"{_a(first.name)} in the {first.position} corner of {_a(bg)} image"
    templates = [
        f"{_capital(plain)} on {_a(bg)} background.",
        f"{_capital(_count_phrase(n))} on {_a(bg)} background: {placed}.",
        (f"There is {sized} in this {bg} image." if n == 1 else
         f"There are {_count_phrase(n)} in this {bg} image: {sized}."),
        f"{_capital(_a(bg))} picture showing {full}.",
        _capital(corner) + (f", together with {_join([_a(o.name) for o in rest])}." if rest else "."),
    ]
    return [templates[i] for i in rng.permutation(len(templates))]


# Question types with a known short answer. Every answer is one of the type's options, so chance
# accuracy is 1 / len(options).
QUESTION_OPTIONS = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": tuple(str(i) for i in range(1, MAX_OBJECTS + 1)),
    "position": POSITIONS,
}
_PHRASINGS = {
    "color": ("What color is the {shape}?", "What is the color of the {shape}?", "Which color does the {shape} have?"),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?", "What is the shape of the {color} object?"),
    "count": ("How many objects are in the image?", "How many shapes are there?", "Count the shapes in the picture."),
    "position": ("Where is the {name}?", "In which part of the image is the {name}?", "Where is the {name} located?"),
}


# What one quadrant can hold, as short texts: every '<colour> <shape>' and "nothing".
REGION_TEXTS = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES) + ("nothing",)


def region_labels(scene: Scene) -> np.ndarray:
    """(4,) indices into REGION_TEXTS: what each quadrant holds, in POSITIONS order."""
    at = {o.position: REGION_TEXTS.index(o.name) for o in scene.objects}
    return np.asarray([at.get(p, len(REGION_TEXTS) - 1) for p in POSITIONS], np.int32)


def chance_accuracy(question_type: str) -> float:
    return 1.0 / len(QUESTION_OPTIONS[question_type])


def questions(scene: Scene, canonical: bool = False) -> list:
    """One question of each type about every object (colour/shape/position) and one count question.

    `canonical` uses the first phrasing of each type (the evaluation's fixed wording); otherwise the
    phrasing is drawn per question, deterministically from the scene.
    """
    rng = _rng(scene.seed, scene.split, scene.index, 2)

    def ask(kind: str, **fields) -> str:
        options = _PHRASINGS[kind]
        return options[0 if canonical else int(rng.integers(len(options)))].format(**fields)

    out = [Question("count", ask("count"), str(len(scene.objects)))]
    for obj in scene.objects:
        out.append(Question("color", ask("color", shape=obj.shape), obj.color))
        out.append(Question("shape", ask("shape", color=obj.color), obj.shape))
        out.append(Question("position", ask("position", name=obj.name), obj.position))
    return out


_NUMBER_TO_DIGIT = {word: str(i) for i, word in enumerate(NUMBER_WORDS)}


def grade(question_type: str, reply: str, answer: str) -> bool:
    """True when the reply names the expected option and no other option of the type.

    Accepts a bare word ("red"), a phrase ("top left") or a sentence ("The circle is red.");
    number words count as digits.
    """
    text = " " + re.sub(r"[^a-z0-9 ]+", " ", reply.lower()) + " "
    text = re.sub(r" +", " ", text)
    for word, digit in _NUMBER_TO_DIGIT.items():
        text = text.replace(f" {word} ", f" {digit} ")
    named = {opt for opt in QUESTION_OPTIONS[question_type] if f" {opt} " in text}
    return named == {answer}


def mentioned_objects(text: str) -> set:
    """The (colour, shape) pairs a text names as '<colour> <shape>' (optionally with a size between)."""
    pattern = r"\b(" + "|".join(COLORS) + r")\s+(?:(?:small|large)\s+)?(" + "|".join(SHAPES) + r")s?\b"
    return {(c, s) for c, s in re.findall(pattern, text.lower())}


# ----- annotations and files --------------------------------------------------------------------

CATEGORIES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)


def coco_annotations(scenes: Sequence[Scene]) -> tuple:
    """(instances, captions): the two COCO JSON documents for `scenes`.

    Image ids are the scene indices; categories are '<colour> <shape>' so that the boxes alone say
    what each object looks like. Image entries also carry the scene id and background (extra keys
    COCO readers ignore).
    """
    images, boxes, caption_entries = [], [], []
    for scene in scenes:
        images.append({"id": scene.index, "file_name": scene.file_name, "width": scene.image_size,
                       "height": scene.image_size, "scene_id": scene.id, "background": scene.background})
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            boxes.append({"id": len(boxes) + 1, "image_id": scene.index,
                          "category_id": CATEGORIES.index(obj.name) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                          "area": int(_object_area(scene, obj)), "iscrowd": 0,
                          "size": obj.size, "position": obj.position})
        for caption in captions(scene):
            caption_entries.append({"id": len(caption_entries) + 1, "image_id": scene.index, "caption": caption})
    categories = [{"id": i + 1, "name": name, "supercategory": name.split()[1]} for i, name in enumerate(CATEGORIES)]
    return ({"images": images, "annotations": boxes, "categories": categories},
            {"images": images, "annotations": caption_entries})


def _object_area(scene: Scene, obj: SceneObject) -> int:
    return int(_shape_mask(scene.image_size, obj.shape, *obj.center, obj.half).sum())


def write_world(folder: str, scenes: Sequence[Scene]) -> tuple:
    """Render every scene to folder/<id>.png and write folder/instances.json and folder/captions.json.

    Returns the two annotation paths (instances, captions).
    """
    os.makedirs(folder, exist_ok=True)
    for scene in scenes:
        render(scene).save(os.path.join(folder, scene.file_name))
    paths = (os.path.join(folder, "instances.json"), os.path.join(folder, "captions.json"))
    for path, doc in zip(paths, coco_annotations(scenes)):
        with open(path, "w") as f:
            json.dump(doc, f)
    return paths


# ----- the built-in training source (`data.source = "synthetic"`) --------------------------------

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class SyntheticSource:
    """A LLaVA-JSON-shaped dataset over this world, generated on access: scene `index` of the
    "train" split with one of its questions (short answer; rows stay under ~100 tokens), plus an eighth of text-only
    arithmetic rows (the pipeline's image-free path). `captions_only=True` gives single-turn caption
    samples, all with an image (the shape the stage-1 'plain' template takes). Deterministic in
    (seed, index); images are uint8 (image_size, image_size, 3)."""

    def __init__(self, size: int = 256, seed: int = 0, image_size: int = 28, captions_only: bool = False):
        self.size, self.seed, self.image_size, self.captions_only = int(size), int(seed), int(image_size), captions_only

    def __len__(self):
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic record {index} out of range [0, {self.size})")
        rng = _rng(self.seed, "train", index, 3)
        record_id = f"synthetic-{index}"
        if not self.captions_only and rng.random() < 0.125:
            a, b = (int(x) for x in rng.integers(0, 5, size=2))
            conversations = [{"from": "human", "value": f"What is {_NUMBERS[a]} plus {_NUMBERS[b]}?"},
                             {"from": "gpt", "value": f"{_capital(_NUMBERS[a + b])}."}]
            return {"id": record_id, "conversations": conversations, "image": None}
        scene = make_scene(self.seed, index, "train", self.image_size)
        image = np.asarray(render(scene))
        if self.captions_only:
            conversations = [{"from": "human", "value": f"Describe the image briefly.\n{IMAGE_PLACEHOLDER}"},
                             {"from": "gpt", "value": min(captions(scene), key=len)}]
        else:
            asked = questions(scene)[int(rng.integers(len(scene.objects) * 3 + 1))]
            conversations = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{asked.question}"},
                             {"from": "gpt", "value": _capital(asked.answer) + "."}]
        return {"id": record_id, "conversations": conversations, "image": image}
