"""ImageGenX: a batching text-to-image serving system."""

__version__ = "0.1.0"
