"""gunicorn's master imports the config before its gevent workers patch the
standard library: the config must not pull in the libraries that need the patch."""
from __future__ import annotations

import subprocess
import sys

# Each of these keeps references to blocking socket/select/thread functions when
# imported before gevent's patch (kombu's poller then held a whole API process).
MUST_LOAD_AFTER_PATCH = ("kombu", "celery", "redis", "flask", "flask_limiter", "imagegenx.api.app")


def test_importing_the_gunicorn_config_loads_no_io_library() -> None:
    code = ("import sys, imagegenx.api.gunicorn_conf as conf; "
            f"names = {MUST_LOAD_AFTER_PATCH!r}; "
            "print(conf.worker_class); "
            "print(' '.join(m for m in names if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    worker_class, loaded = (out.stdout.splitlines() + [""])[:2]
    assert worker_class == "gevent"
    assert loaded == "", f"imported before gevent patches the standard library: {loaded}"


def test_the_package_still_offers_create_app() -> None:
    from imagegenx.api import create_app
    from imagegenx.api.app import create_app as direct

    assert create_app is direct
