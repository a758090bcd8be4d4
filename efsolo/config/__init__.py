"""Typed, frozen parameters loaded once from ``params.yaml`` and validated on load.

``schema`` holds the dataclasses (one per section), ``loading`` turns YAML into them, and
``moved_keys`` points old keys to their new place. Every problem is one line naming the key, e.g.
``params.yaml: freemask.score_threshold must be in [0, 1], got 1.5``.
"""
from efsolo.config.loading import load_params, params_from_dict, to_dict
from efsolo.config.moved_keys import MOVED_KEYS
from efsolo.config.schema import (DATA_METRICS, MODELS, OVERLAY_MIN_SCORE, BackboneParams, DataParams, EECParams,
                                  ExemplarParams, FreeMaskParams, FreeMaskRuntime, FreeSOLOParams, InputSettings,
                                  LossSettings, ModelSettings, Params, ParamsError, PathSettings, PretrainParams,
                                  PretrainRuntime, ReportParams, RuntimeParams, SolverSettings, SyntheticParams,
                                  TestSettings, TrainingRuntime)

__all__ = ["DATA_METRICS", "MODELS", "MOVED_KEYS", "OVERLAY_MIN_SCORE", "BackboneParams", "DataParams", "EECParams",
           "ExemplarParams", "FreeMaskParams", "FreeMaskRuntime", "FreeSOLOParams", "InputSettings", "LossSettings",
           "ModelSettings", "Params", "ParamsError", "PathSettings", "PretrainParams", "PretrainRuntime",
           "ReportParams", "RuntimeParams", "SolverSettings", "SyntheticParams", "TestSettings", "TrainingRuntime",
           "load_params", "params_from_dict", "to_dict"]
