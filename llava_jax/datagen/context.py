"""Per-image text context for instruction generation: captions + object boxes, from COCO files.

The text-only LLM never sees pixels; it sees what a COCO annotator wrote (five captions) and where
the annotated objects are (category + box with corners normalized to [0, 1], 3 decimals).
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict


@dataclasses.dataclass(frozen=True)
class Box:
    category: str
    x1: float
    y1: float
    x2: float
    y2: float

    def text(self) -> str:
        return f"{self.category}: [{self.x1:.3f}, {self.y1:.3f}, {self.x2:.3f}, {self.y2:.3f}]"


@dataclasses.dataclass(frozen=True)
class ImageContext:
    image_id: int
    file_name: str
    captions: tuple[str, ...]
    boxes: tuple[Box, ...]

    def text(self) -> str:
        return format_context(self.captions, self.boxes)


def format_context(captions, boxes) -> str:
    """The block the LLM reads. Boxes are (x1, y1, x2, y2) with the origin at the top-left corner."""
    lines = ["Captions:"]
    lines += [f"- {c.strip()}" for c in captions]
    if boxes:
        lines += ["", "Objects (category: [x1, y1, x2, y2], corners as fractions of width/height, "
                      "origin at the top-left):"]
        lines += [b.text() for b in boxes]
    return "\n".join(lines)


def normalize_box(bbox, width: float, height: float, category: str) -> Box:
    """COCO [x, y, w, h] in pixels -> corners in [0, 1], rounded to 3 decimals."""
    x, y, w, h = (float(v) for v in bbox)

    def clip(v: float) -> float:
        return round(min(max(v, 0.0), 1.0), 3)

    return Box(category, clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height))


def _load_json(path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None


def _require(record: dict, keys, where: str):
    missing = [k for k in keys if k not in record]
    if missing:
        raise KeyError(f"{where}: missing key(s) {missing}; found {sorted(record)}")


def load_coco_contexts(annotations_path, captions_path, max_images: int | None = None) -> list[ImageContext]:
    """Join COCO instances (boxes) and captions by image id; images without captions are skipped.

    Returns contexts sorted by image id (a stable order makes runs and resumes reproducible).
    """
    inst = _load_json(annotations_path, "COCO annotations")
    caps = _load_json(captions_path, "COCO captions")
    for name, data, path in (("annotations", inst, annotations_path), ("captions", caps, captions_path)):
        if not isinstance(data, dict) or "annotations" not in data:
            raise ValueError(f"COCO {name} file {path}: expected an object with an 'annotations' list")

    images = {}
    for src, path in ((inst, annotations_path), (caps, captions_path)):
        for i, im in enumerate(src.get("images", [])):
            _require(im, ("id", "file_name"), f"{path} images[{i}]")
            images.setdefault(im["id"], im)
    categories = {}
    for i, c in enumerate(inst.get("categories", [])):
        _require(c, ("id", "name"), f"{annotations_path} categories[{i}]")
        categories[c["id"]] = c["name"]

    captions = defaultdict(list)
    for i, a in enumerate(caps["annotations"]):
        _require(a, ("image_id", "caption"), f"{captions_path} annotations[{i}]")
        captions[a["image_id"]].append(a["caption"])

    boxes = defaultdict(list)
    for i, a in enumerate(inst["annotations"]):
        _require(a, ("image_id", "category_id", "bbox"), f"{annotations_path} annotations[{i}]")
        im = images.get(a["image_id"])
        if im is None:
            raise KeyError(f"{annotations_path} annotations[{i}]: image_id {a['image_id']} not in 'images'")
        if "width" not in im or "height" not in im:
            raise KeyError(f"{annotations_path}: image {im['id']} lacks width/height needed to normalize boxes")
        if a["category_id"] not in categories:
            raise KeyError(f"{annotations_path} annotations[{i}]: category_id {a['category_id']} not in 'categories'")
        boxes[a["image_id"]].append(normalize_box(a["bbox"], im["width"], im["height"], categories[a["category_id"]]))

    out = []
    for image_id in sorted(captions):
        im = images.get(image_id)
        if im is None:
            raise KeyError(f"{captions_path}: captions for image_id {image_id}, which no 'images' list holds")
        out.append(ImageContext(image_id, im["file_name"], tuple(captions[image_id]), tuple(boxes.get(image_id, ()))))
        if max_images is not None and len(out) >= max_images:
            break
    return out


def parse_context(text: str) -> tuple[list[str], list[Box]]:
    """Inverse of format_context (used by the offline backend to write replies from the context)."""
    captions, boxes, section = [], [], None
    for line in text.splitlines():
        if line.startswith("Captions:"):
            section = "captions"
        elif line.startswith("Objects ("):
            section = "objects"
        elif section == "captions" and line.startswith("- "):
            captions.append(line[2:])
        elif section == "objects" and ": [" in line and line.endswith("]"):
            cat, coords = line.rsplit(": [", 1)
            x1, y1, x2, y2 = (float(v) for v in coords[:-1].split(","))
            boxes.append(Box(cat, x1, y1, x2, y2))
    return captions, boxes
