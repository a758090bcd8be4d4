"""DVC stage `backbone`: see efsolo.pipeline.backbone."""
import sys

from efsolo.pipeline import backbone, entry_point

if __name__ == "__main__":
    entry_point(backbone)(*sys.argv[1:])
