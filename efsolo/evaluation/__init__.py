"""Evaluation and reports: class-agnostic COCOeval, overlays, the report, efsolo predict, seeds."""
