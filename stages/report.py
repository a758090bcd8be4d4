"""DVC stage `report`: see efsolo.pipeline.report."""
import sys

from efsolo.pipeline import report, entry_point

if __name__ == "__main__":
    entry_point(report)(*sys.argv[1:])
