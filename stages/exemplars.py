"""DVC stage `exemplars`: see efsolo.pipeline.exemplars."""
import sys

from efsolo.pipeline import exemplars, entry_point

if __name__ == "__main__":
    entry_point(exemplars)(*sys.argv[1:])
