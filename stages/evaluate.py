"""DVC stage `evaluate@<model>`: class-agnostic COCO evaluation of one model (efsolo.pipeline.evaluate)."""
import sys
import time

from efsolo.config import load_params
from efsolo.utils.errors import EfsoloError
from efsolo.pipeline import evaluate, report_stage

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python stages/evaluate.py MODEL PREDICTIONS")
    t0 = time.perf_counter()
    try:
        evaluate(load_params(), sys.argv[1], sys.argv[2])
    except EfsoloError as err:
        sys.exit(f"error: {err}")
    report_stage(f"evaluate@{sys.argv[1]}", t0)
