"""DVC stage `pool`: see efsolo.pipeline.pool."""
import sys

from efsolo.pipeline import pool, entry_point

if __name__ == "__main__":
    entry_point(pool)(*sys.argv[1:])
