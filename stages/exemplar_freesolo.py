"""DVC stage `exemplar_freesolo`: see efsolo.pipeline.exemplar_freesolo."""
import sys

from efsolo.pipeline import exemplar_freesolo, entry_point

if __name__ == "__main__":
    entry_point(exemplar_freesolo)(*sys.argv[1:])
