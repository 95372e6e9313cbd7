"""Layers: synchronized BatchNorm (``SyncBatchNorm``, also as PyTorch-Encoding's
``DistSyncBatchNorm``) and its converters."""

from tllab.nn.batchnorm import batch_stats
from tllab.nn.syncbn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    DistSyncBatchNorm,
    SyncBatchNorm,
    batch_norm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "DistSyncBatchNorm", "SyncBatchNorm", "batch_norm",
           "batch_stats", "convert_sync_batchnorm", "revert_sync_batchnorm"]
