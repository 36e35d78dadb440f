"""Browser pages: the playground at ``/`` and the API docs at ``/api/v1/docs``.

Plain HTML, CSS and JavaScript served from this package (no build step, no
CDN). The pages call the public REST API from the browser with the user's own
key, so they get no privileges the API does not already give that key.
"""
from __future__ import annotations

from flask import Blueprint, Response, render_template

from imagegenx import __version__
from imagegenx.api.services import services
from imagegenx.schemas import GenerateRequest, Sampler

# The app's own /static route exists (Flask adds it), so the pages' files live under /assets.
bp = Blueprint("playground", __name__, template_folder="templates", static_folder="static",
               static_url_path="/assets")

SAMPLER_LABELS = {
    Sampler.EULER: "Euler",
    Sampler.EULER_A: "Euler ancestral",
    Sampler.DDIM: "DDIM",
    Sampler.DPMPP_2M: "DPM++ 2M Karras",
}


def _page(html: str) -> Response:
    """An HTML page with a strict Content-Security-Policy: scripts only from here.

    Images may come from anywhere (result URLs can point at object storage or a
    CDN). Inline styles are allowed because the vendored Swagger UI sets some.
    """
    resp = Response(html, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src * data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


@bp.get("/")
def index() -> Response:
    settings = services().settings
    return _page(render_template(
        "playground/index.html",
        version=__version__,
        limits=settings.limits,
        samplers=[(s.value, SAMPLER_LABELS.get(s, s.value)) for s in Sampler],
        defaults={**{name: GenerateRequest.model_fields[name].default
                     for name in ("steps", "guidance_scale", "num_images", "sampler")},
                  "guidance_interval": settings.limits.guidance_interval},
    ))


@bp.get("/api/v1/docs")
def docs() -> Response:
    return _page(render_template("playground/docs.html", version=__version__))
