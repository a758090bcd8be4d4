"""efsolo: Exemplar-FreeSOLO, unsupervised class-agnostic instance segmentation, as a DVC pipeline."""

__version__ = "0.1.0"
