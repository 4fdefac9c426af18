"""The data pipeline: shards written by `xkd-shard` -> `Batch` of synchronised audio-visual global and local views.

Public API (used by `train.py` and `eval.py`)::

    from xkd.pipeline import DataConfig, make_train_loader, make_eval_loader, Batch
    it = make_train_loader(cfg, rank=0, world_size=1, seed=0, step=0)   # endless iterator of Batch
    for batch in make_eval_loader(cfg, split="test", fold=1, clips=3, crops=1, rank=0, world_size=1): ...

See `loader.py` for the backend choice (DALI `mixed` / `cpu`, or PyAV) and `../shared/contracts.md` for the rules.
"""

from xkd.pipeline.batch import Batch
from xkd.pipeline.config import DataConfig
from xkd.pipeline.loader import (
    count_samples,
    dataset_info,
    make_eval_loader,
    make_train_loader,
    mel_stats,
    resolve_backend,
)

__all__ = [
    "Batch",
    "DataConfig",
    "count_samples",
    "dataset_info",
    "make_eval_loader",
    "make_train_loader",
    "mel_stats",
    "resolve_backend",
]
