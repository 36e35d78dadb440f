"""The GPU worker: batching consumer (Celery/kombu I/O), GPU pinning, lifecycle."""
