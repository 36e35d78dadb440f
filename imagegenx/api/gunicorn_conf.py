"""How gunicorn serves the API, for the Procfile and ``imagegenx up`` alike.

gevent workers: a connection waiting for its headers (or idle between
keep-alive requests) holds a greenlet, not one of a few threads, so slow or
idle clients cannot starve the others (with gthread, eight half-sent requests
blocked the API). gunicorn patches the worker (sockets, threads, select) before
the app is loaded; redis-py, kombu and flask-limiter then cooperate through the
patched sockets. Read by ``gunicorn -c python:imagegenx.api.gunicorn_conf``;
command-line options (``--bind``) win over these values.
"""
from __future__ import annotations

import os

worker_class = "gevent"
workers = 2
# Open connections per worker process, idle ones included.
worker_connections = 2000
# Idle keep-alive connections are closed after this many seconds.
keepalive = 5
# On SIGTERM, requests in flight get this long before the workers are killed.
graceful_timeout = 10
bind = [f"{os.environ.get('IMAGEGENX_API_HOST', '127.0.0.1')}:"
        f"{os.environ.get('IMAGEGENX_API_PORT', '8000')}"]
