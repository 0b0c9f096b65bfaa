"""COCO-style annotations -> the symbolic context a text-only LLM sees instead of the image.

LLaVA's instruction data comes from an LLM that never sees pixels: it reads the image's five
captions, one per line, and for detailed descriptions and complex reasoning one line per object
``category: [x1, y1, x2, y2]``, the box's top-left and bottom-right corners normalised to [0, 1]
by the image's width and height, three decimals::

    A man riding a horse on a beach.
    ...
    person: [0.681, 0.242, 0.774, 0.694]

:func:`load_coco` reads a COCO 2017 ``instances_*.json`` and ``captions_*.json`` pair (local or
``s3://``) into :class:`ImageAnnotations`, in the order of the instances file's ``images``;
:func:`build_context` renders one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from llava_ray.utils.storage import filesystem


class AnnotationError(ValueError):
    """An annotations file that cannot be read as COCO; the message names the file and the fix."""


@dataclass(frozen=True)
class ObjectBox:
    """One annotated object: its category name and COCO box ``[x, y, width, height]`` in pixels."""

    category: str
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageAnnotations:
    """Everything the context of one image is made from."""

    image_id: int
    file_name: str
    width: int
    height: int
    captions: tuple[str, ...]
    objects: tuple[ObjectBox, ...]


def load_coco(instances_path: str, captions_path: str) -> list[ImageAnnotations]:
    """Join a COCO instances file and a captions file by image id.

    Images come in the instances file's order; captions and objects in annotation order. An image
    without captions is kept (with none) so the caller can count it as skipped.
    """
    instances = _read_json(instances_path)
    captions_file = _read_json(captions_path)
    _require(instances, instances_path, ("images", "annotations", "categories"))
    _require(captions_file, captions_path, ("annotations",))
    categories = {category["id"]: category["name"] for category in instances["categories"]}

    objects: dict[int, list[ObjectBox]] = defaultdict(list)
    for annotation in instances["annotations"]:
        category = categories.get(annotation["category_id"])
        if category is None:
            raise AnnotationError(
                f"{instances_path}: annotation {annotation.get('id')} has category_id "
                f"{annotation['category_id']}, which 'categories' does not define; fix the file"
            )
        x, y, w, h = (float(v) for v in annotation["bbox"])
        objects[annotation["image_id"]].append(ObjectBox(category, (x, y, w, h)))

    captions: dict[int, list[str]] = defaultdict(list)
    for annotation in captions_file["annotations"]:
        # COCO captions carry stray newlines and spaces; one caption must stay one line.
        text = " ".join(str(annotation["caption"]).split())
        if text:
            captions[annotation["image_id"]].append(text)

    for image in instances["images"]:
        if not (image.get("width", 0) > 0 and image.get("height", 0) > 0):
            raise AnnotationError(
                f"{instances_path}: image {image.get('id')} has width {image.get('width')} and height "
                f"{image.get('height')}; boxes are normalised by them, so both must be positive"
            )
    return [
        ImageAnnotations(
            image_id=int(image["id"]),
            file_name=str(image["file_name"]),
            width=int(image["width"]),
            height=int(image["height"]),
            captions=tuple(captions.get(image["id"], ())),
            objects=tuple(objects.get(image["id"], ())),
        )
        for image in instances["images"]
    ]


def normalized_box(bbox: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    """COCO ``[x, y, w, h]`` in pixels -> ``[x1, y1, x2, y2]`` in [0, 1] (clamped: COCO boxes may overhang)."""
    x, y, w, h = bbox
    corners = (x / width, y / height, (x + w) / width, (y + h) / height)
    return [min(1.0, max(0.0, value)) for value in corners]


def box_line(obj: ObjectBox, width: int, height: int) -> str:
    """``category: [x1, y1, x2, y2]`` with three decimals."""
    coordinates = ", ".join(f"{value:.3f}" for value in normalized_box(obj.bbox, width, height))
    return f"{obj.category}: [{coordinates}]"


def build_context(image: ImageAnnotations, with_boxes: bool) -> str:
    """The captions, one per line, then (``with_boxes``) one line per object."""
    lines = list(image.captions)
    if with_boxes:
        lines += [box_line(obj, image.width, image.height) for obj in image.objects]
    return "\n".join(lines)


def _read_json(path: str) -> dict[str, Any]:
    fs, inner = filesystem(path)
    try:
        with fs.open(inner, "r") as handle:
            content = json.load(handle)
    except FileNotFoundError:
        raise AnnotationError(f"{path} does not exist; point the config at a COCO annotations file") from None
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path} is not valid JSON ({error}); use a COCO annotations file") from None
    if not isinstance(content, dict):
        raise AnnotationError(f"{path} holds a {type(content).__name__}, not a COCO annotations object")
    return content


def _require(content: dict[str, Any], path: str, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in content]
    if missing:
        raise AnnotationError(
            f"{path} lacks {missing}: expected a COCO file with {list(keys)} "
            "(instances_*.json for boxes, captions_*.json for captions)"
        )
