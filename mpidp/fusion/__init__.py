"""Gradient buckets and wire compression (arrays and parameters only, no models)."""
from .bucket import Bucket
from .compression import Compression, Compressor
from .plan import buffer_kind, plan_buckets, signature
from .ready import ReadyCounts

__all__ = ["Bucket", "Compression", "Compressor", "ReadyCounts", "buffer_kind", "plan_buckets", "signature"]
