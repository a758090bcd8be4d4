"""Benchmark Free Mask, the FreeSOLO training step and inference; write metrics/bench.json.

    python benchmarks/bench.py                 # demo and paper sizes, CPU (and CUDA when present)
    python benchmarks/bench.py --sizes demo    # a quick look
    python benchmarks/bench.py --readme README.md   # also put the table in the README

Each figure is measured in its own process (its own peak memory); compare ratios measured in
one run, not figures from different machines or days.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from efsolo.utils import atomic  # noqa: E402
from efsolo import benchmark  # noqa: E402
from efsolo.pipeline import replace_between_markers  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["demo", "paper"], choices=benchmark.SIZE_NAMES,
                    help="demo: the sizes of --params; paper: the paper profile's")
    ap.add_argument("--params", default="params.yaml", help="the params file the demo sizes come from")
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--loops", nargs="+", default=None, choices=sorted(benchmark.MEASURES))
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                    help="the training loops' precisions (demo size; other sizes on the CPU: float32)")
    ap.add_argument("--out", default="metrics/bench.json")
    ap.add_argument("--readme", default=None, help="write the table between the README's bench markers")
    a = ap.parse_args()
    result = benchmark.run_benchmarks(a.sizes, a.devices, a.loops, precisions=tuple(a.precisions), params=a.params)
    atomic.write_json(a.out, result, indent=1)
    text = benchmark.table(result)
    print(text)
    if a.readme:
        replace_between_markers(a.readme, START, END, text)


if __name__ == "__main__":
    main()
