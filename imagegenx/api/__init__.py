"""Flask REST API (app factory + blueprints). Never imports torch."""
from imagegenx.api.app import create_app

__all__ = ["create_app"]
