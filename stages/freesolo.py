"""DVC stage `freesolo`: see efsolo.pipeline.freesolo. Several GPUs or nodes:
`torchrun --nproc_per_node=N stages/freesolo.py` (DDP; logs and checkpoints on rank 0)."""
import sys

from efsolo.pipeline import entry_point, freesolo

if __name__ == "__main__":
    entry_point(freesolo)(*sys.argv[1:])
