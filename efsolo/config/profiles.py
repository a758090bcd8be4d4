"""The paper's settings as a complete params file, for COCO, UVO or PASCAL VOC.

The params dataclasses' defaults are the paper's (ResNet-50 DenseCL, 800 px short side / 1333
long, Free Mask on C5, batch 8, lr 0.001, lambda_eec 1.3, gamma 0.1, mu 0.4, ...; the EEC
temperature is 0.5, not the paper's 0.02, at which the loss as written is capped at 1.4e-11, and
the EEC thresholds are quantiles of the measured cosines (alpha 0.5, beta 0.3), not the paper's
absolute cosines 0.8 and 0.3, which a trunk need not reach: docs/eec.md); a profile is those defaults plus where the data and the
DenseCL checkpoint are. ``efsolo profile`` writes one over ``params.yaml``; ``dvc repro`` then runs
the paper's pipeline.

Datasets (paper section 4.1):
- coco: train on train2017 + unlabeled2017 (no labels read), test on val2017.
- uvo: train on COCO as above, test on UVO val (a COCO-format json of its frames).
- voc: multi-object discovery, train and test on VOC trainval07 (boxes only).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from efsolo.config import Params, params_from_dict, to_dict
from efsolo.utils import atomic
from efsolo.utils.errors import EfsoloError

DATASETS = ("coco", "uvo", "voc")

HEADER = """\
# efsolo parameters: the paper's settings (Exemplar-FreeSOLO, CVPR 2023), dataset {dataset}.
# Written by `efsolo profile {dataset} ...`; every value not about paths is the paper's, except the
# EEC loss's temperature, thresholds (quantiles of the measured cosines), centring and exemplar view
# (docs/eec.md; `eec.thresholds: absolute` with alpha 0.8 gives the paper's literal thresholds).
# Run: dvc repro   (on a GPU box; several GPUs: see the README's torchrun notes)
"""


def _data_section(dataset: str, coco_root: str, val_images: str, val_annotations: str, voc_root: str) -> dict:
    if dataset in ("coco", "uvo"):
        if not coco_root:
            raise EfsoloError(f"profile {dataset}: --coco-root is needed (the COCO folder with train2017, "
                              "unlabeled2017, val2017 and annotations/)")
        root = Path(coco_root)
        data = {"source": "coco", "train_images": [str(root / "train2017"), str(root / "unlabeled2017")],
                "val_images": [str(root / "val2017")],
                "val_annotations": str(root / "annotations" / "instances_val2017.json")}
        if dataset == "uvo":
            if not (val_images and val_annotations):
                raise EfsoloError("profile uvo: --val-images (the UVO frames folder) and --val-annotations "
                                  "(the UVO val COCO-format json) are needed")
            data.update(val_images=[val_images], val_annotations=val_annotations)
        return data
    if dataset == "voc":
        if not voc_root:
            raise EfsoloError("profile voc: --voc-root is needed (VOCdevkit/VOC2007)")
        root = Path(voc_root)
        return {"source": "voc", "train_images": [], "val_images": [str(root / "JPEGImages")],
                "val_annotations": str(root / "Annotations"),
                "voc_image_set": str(root / "ImageSets" / "Main" / "trainval.txt")}
    raise EfsoloError(f"unknown profile dataset {dataset!r}; one of {list(DATASETS)}")


def paper_params(dataset: str, weights: str, coco_root: str = "", val_images: str = "", val_annotations: str = "",
                 voc_root: str = "", arch: str = "resnet50") -> dict:
    """The paper's params (as a plain dict) for ``dataset``, validated."""
    raw = to_dict(Params())
    raw["data"].update(_data_section(dataset, coco_root, val_images, val_annotations, voc_root))
    raw["data"].pop("synthetic")
    raw["backbone"].update(arch=arch, weights=weights)
    raw["backbone"].pop("pretrain")
    params_from_dict(raw)  # validate
    return raw


def write_profile(path: str | Path, dataset: str, weights: str, **kwargs: str) -> dict:
    """Write the paper profile for ``dataset`` to ``path`` (atomically); returns it."""
    if not weights:
        raise EfsoloError("the paper profile needs --weights: a DenseCL ResNet-50 checkpoint (.pth or detectron2 "
                          ".pkl); nothing is downloaded")
    raw = paper_params(dataset, weights, **kwargs)
    atomic.write_text(path, HEADER.format(dataset=dataset) + yaml.safe_dump(raw, sort_keys=False))
    return raw
