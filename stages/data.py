"""DVC stage `data`: see efsolo.pipeline.data."""
import sys

from efsolo.pipeline import data, entry_point

if __name__ == "__main__":
    entry_point(data)(*sys.argv[1:])
