"""DVC stage `refine`: see efsolo.pipeline.refine."""
import sys

from efsolo.pipeline import refine, entry_point

if __name__ == "__main__":
    entry_point(refine)(*sys.argv[1:])
