"""Keys that moved: a params file written before a move gets a pointer to the new key, not just
"unknown key"."""
from __future__ import annotations

from efsolo.config.schema import InputSettings, LossSettings, ModelSettings, SolverSettings, TestSettings

# keys that moved (params files written before the move get a pointer, not just "unknown"): the
# runtime section, and FreeSOLO's flat keys that became the model / input / loss / solver / test sections
MOVED_KEYS = {"freemask.feature_stride": "freemask.trunk_output_stride", "device": "runtime.device", "backbone.pretrain.log_every": "runtime.pretrain.log_every",
              "backbone.pretrain.checkpoint_every": "runtime.pretrain.checkpoint_every",
              "freemask.batch_size": "runtime.freemask.batch_size", "freemask.shard_size": "runtime.freemask.shard_size",
              "freesolo.log_every": "runtime.freesolo.log_every",
              "freesolo.checkpoint_every": "runtime.freesolo.checkpoint_every",
              "freesolo.eval_every": "runtime.freesolo.eval_every",
              **{f"freesolo.{name}": f"freesolo.{section}.{name}"
                 for section, cls in (("model", ModelSettings), ("input", InputSettings), ("loss", LossSettings),
                                      ("solver", SolverSettings)) for name in cls.__dataclass_fields__},
              **{f"freesolo.test_{name}": f"freesolo.test.{name}" for name in TestSettings.__dataclass_fields__}}
