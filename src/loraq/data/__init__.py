"""Datasets in, masked training sequences out: formats, chat templates, masking, packing, batches.

The train loop needs :func:`build_data` (-> :class:`DataBundle`), its
``train_batches(...)`` (a :class:`BatchIterator` of :class:`Batch`) and
``val_batches(...)``, and :func:`exact_match` for the references.
"""
from loraq.data.batches import BatchIterator
from loraq.data.dataset import DataBundle, DataStats, build_data
from loraq.data.packing import Batch, collate, pack
from loraq.data.references import EvalReference, exact_match

__all__ = ["Batch", "BatchIterator", "DataBundle", "DataStats", "EvalReference", "build_data", "collate",
           "exact_match", "pack"]
