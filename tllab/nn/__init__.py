"""Layers: synchronized BatchNorm (``SyncBatchNorm``, also as PyTorch-Encoding's
``DistSyncBatchNorm``) and its converters; PyTorch-Encoding's ``Encoding``, ``GramMatrix``,
``Inspiration`` and ``UpsampleConv2d``."""

from tllab.nn.batchnorm import batch_stats
from tllab.nn.encoding import Encoding
from tllab.nn.style import GramMatrix, Inspiration
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
from tllab.nn.upsample import UpsampleConv2d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "DistSyncBatchNorm", "Encoding", "GramMatrix", "Inspiration",
           "SyncBatchNorm", "UpsampleConv2d", "batch_norm", "batch_stats", "convert_sync_batchnorm",
           "revert_sync_batchnorm"]
