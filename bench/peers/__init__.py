"""Peer implementations the batching benchmark compares our worker against.

Each module is a self-contained Celery app configured from ``PEER_*``
environment variables, started by ``bench.batching_peers`` as its own
``celery worker`` process. They import only the synthetic engine (numpy and
Pillow), so they also run from a virtualenv that lacks the service's other
dependencies.
"""
