"""Data: datasets (synthetic demo, COCO, image folders, VOC), image reading, COCO formats, pseudo-label batches, views."""
