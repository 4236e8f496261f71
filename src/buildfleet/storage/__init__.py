"""Blob storage: one interface, small composable implementations."""

from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob
from buildfleet.storage.cas import Cas
from buildfleet.storage.disk import DiskStore
from buildfleet.storage.memory import MemoryStore
from buildfleet.storage.size_limited import SizeLimitedStore

__all__ = [
    "BlobReader", "BlobStore", "BlobWriter", "Cas", "DiskStore", "MemoryStore",
    "SizeLimitedStore", "StoredBlob",
]
