"""Layers: synchronized BatchNorm (``SyncBatchNorm``, also as PyTorch-Encoding's
``DistSyncBatchNorm``) and its converters."""

from tllab.nn.batchnorm import batch_stats
from tllab.nn.syncbn import (
    DistSyncBatchNorm,
    SyncBatchNorm,
    batch_norm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)

__all__ = ["DistSyncBatchNorm", "SyncBatchNorm", "batch_norm", "batch_stats", "convert_sync_batchnorm",
           "revert_sync_batchnorm"]
