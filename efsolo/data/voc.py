"""PASCAL VOC annotations (XML) as class-agnostic COCO ground truth, boxes only.

The multi-object discovery protocol (paper Table 3) trains without labels on VOC trainval07
and scores the predicted boxes against every annotated object, class-agnostic: box AP50,
AP75 and AP by COCOeval. VOC boxes are 1-based and inclusive (``xmin..xmax``); COCO's are
``[x, y, w, h]`` with ``x = xmin - 1`` and ``w = xmax - xmin + 1``. Objects marked
``difficult`` become ``iscrowd = 1``: COCOeval neither counts them as missed nor counts a
detection on them as false, as VOC's own evaluation ignores them.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from efsolo.data.coco_format import AGNOSTIC_CATEGORY
from efsolo.utils.errors import EfsoloError


class VOCError(EfsoloError):
    """A missing or malformed VOC annotation file or image set (one-line message naming it)."""


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise VOCError(f"{path}: no <{tag}> in <{node.tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    value = _text(node, tag, path)
    try:
        return float(value)
    except ValueError:
        raise VOCError(f"{path}: <{tag}> is not a number ({value!r})") from None


def read_annotation(path: str | Path) -> dict:
    """One VOC XML file -> ``{file_name, width, height, objects: [{name, bbox [x, y, w, h], difficult}]}``."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise VOCError(f"{path}: no such file") from None
    except ET.ParseError as err:
        raise VOCError(f"{path}: not valid XML ({err})") from None
    size = root.find("size")
    if size is None:
        raise VOCError(f"{path}: no <size>")
    width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
    objects = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        if box is None:
            raise VOCError(f"{path}: an <object> has no <bndbox>")
        x0, y0 = _number(box, "xmin", path), _number(box, "ymin", path)
        x1, y1 = _number(box, "xmax", path), _number(box, "ymax", path)
        if x1 < x0 or y1 < y0:
            raise VOCError(f"{path}: box ({x0}, {y0}, {x1}, {y1}) has xmax < xmin or ymax < ymin")
        difficult = obj.find("difficult")
        objects.append({"name": _text(obj, "name", path), "bbox": [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1],
                        "difficult": difficult is not None and (difficult.text or "0").strip() == "1"})
    return {"file_name": _text(root, "filename", path), "width": width, "height": height, "objects": objects}


def image_set(path: str | Path) -> list[str]:
    """The image ids listed in an ``ImageSets/Main/<set>.txt`` file (first column of each line)."""
    path = Path(path)
    if not path.is_file():
        raise VOCError(f"{path}: no such image-set file")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise VOCError(f"{path}: the image set is empty")
    return ids


def voc_dataset(annotations_dir: str | Path, ids: list[str] | None = None) -> dict:
    """Class-agnostic COCO ground truth (boxes only) from ``<annotations_dir>/<id>.xml``.

    ``ids`` (from :func:`image_set`) selects and orders the images; None takes every XML file.
    Image ids are 1..N in that order.
    """
    folder = Path(annotations_dir)
    if not folder.is_dir():
        raise VOCError(f"{folder}: no such annotations folder")
    paths = [folder / f"{i}.xml" for i in ids] if ids is not None else sorted(folder.glob("*.xml"))
    if not paths:
        raise VOCError(f"{folder}: no .xml annotation files")
    images, anns = [], []
    for image_id, p in enumerate(paths, start=1):
        a = read_annotation(p)
        images.append({"id": image_id, "file_name": a["file_name"], "width": a["width"], "height": a["height"]})
        for o in a["objects"]:
            x, y, w, h = o["bbox"]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": AGNOSTIC_CATEGORY["id"],
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(o["difficult"]), "voc_name": o["name"]})
    return {"info": {"description": f"PASCAL VOC {folder}", "has_ground_truth": True, "boxes_only": True},
            "images": images, "annotations": anns, "categories": [AGNOSTIC_CATEGORY]}
