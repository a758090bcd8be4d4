"""Exemplars: GrabCut crops, FreeSOLO refinement, the exemplar pool, the EEC module and loss."""
