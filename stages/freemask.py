"""DVC stage `freemask`: see efsolo.pipeline.freemask."""
import sys

from efsolo.pipeline import freemask, entry_point

if __name__ == "__main__":
    entry_point(freemask)(*sys.argv[1:])
