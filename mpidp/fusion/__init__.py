"""Gradient buckets and wire compression (arrays and parameters only, no models)."""
from .bucket import Bucket
from .compression import Compression, Compressor
from .plan import plan_buckets, signature

__all__ = ["Bucket", "Compression", "Compressor", "plan_buckets", "signature"]
