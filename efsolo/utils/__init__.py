"""Helpers every stage uses: errors, atomic writes, the process's rank under torchrun, shards."""
