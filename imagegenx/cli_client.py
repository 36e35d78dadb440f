"""The ``imagegenx`` commands that talk to the REST API: generate, status, cancel, download.

They share the API options and turn the client's errors into one-line messages
(a 422 names the option of each bad field); all go through ``imagegenx.client``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from imagegenx.client import READY, ApiError, Client, TaskFailed
from imagegenx.schemas import TaskStatus

F = TypeVar("F", bound=Callable[..., Any])

OPTION_OF_FIELD = {
    "prompt": "PROMPT", "negative_prompt": "--negative", "width": "--width", "height": "--height",
    "steps": "--steps", "guidance_scale": "--guidance", "guidance_interval": "--guidance-interval",
    "sampler": "--sampler", "seed": "--seed", "model": "--model",
    "num_images": "--num-images", "timeout_s": "--timeout", "postprocess.thumbnail": "--thumbnail",
    "postprocess.upscale": "--upscale", "postprocess.watermark.text": "--watermark",
}


def interval_option(text: str | None) -> list[float] | str | None:
    """``START,END`` as two numbers for the request; anything else goes as given, so
    the server's 422 names what is wrong with it."""
    if text is None:
        return None
    parts = text.strip().strip("[]").split(",")
    try:
        return [float(p) for p in parts]
    except ValueError:
        return text


def _default_key() -> str | None:
    path = Path(os.environ.get("IMAGEGENX_DATA_DIR", "var")) / "api-key"
    return path.read_text().strip() if path.exists() else None


def api_options(command: F) -> F:
    """--api-url and --api-key, read from IMAGEGENX_API_URL and IMAGEGENX_API_KEY too."""
    command = click.option("--api-key", envvar="IMAGEGENX_API_KEY",
                           help="API key; env IMAGEGENX_API_KEY (default: var/api-key).")(command)
    return click.option("--api-url", envvar="IMAGEGENX_API_URL", default="http://127.0.0.1:8000",
                        show_default=True, help="Base URL of the API; env IMAGEGENX_API_URL.")(command)


def make_client(api_url: str, api_key: str | None) -> Client:
    key = api_key or _default_key()
    if not key:
        raise click.UsageError("no API key: pass --api-key or set IMAGEGENX_API_KEY "
                               "(`imagegenx up` keeps one in var/api-key)")
    return Client(api_url, key)


@contextmanager
def api_errors(api_url: str, task_id: str | None = None) -> Iterator[None]:
    """The client's errors as click errors: 422 a usage error per option, others one line."""
    try:
        yield
    except ApiError as exc:
        if exc.status == 422 and exc.fields:
            lines = [f"  {OPTION_OF_FIELD.get(f['field'], f['field'])}: {f['reason']}" for f in exc.fields]
            raise click.UsageError("the server refused the request:\n" + "\n".join(lines)) from None
        if exc.status == 404 and task_id is not None:
            raise click.ClickException(f"no task {task_id} (for this API key)") from None
        raise click.ClickException(str(exc)) from None
    except TaskFailed as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach {api_url} (--api-url): {exc}") from None


def postprocess(thumbnail: int | None, upscale: int | None, watermark: str | None) -> dict[str, Any] | None:
    """The request's postprocess object from the options given (None: the server's defaults)."""
    out: dict[str, Any] = {}
    if thumbnail is not None:
        out["thumbnail"] = thumbnail
    if upscale is not None:
        out["upscale"] = upscale
    if watermark is not None:
        out["watermark"] = {"text": watermark}
    return out or None


def describe(status: TaskStatus) -> list[str]:
    """Lines for `imagegenx status`: the state (and step while running), then the image URLs
    or the error."""
    head = f"{status.task_id} {status.state}"
    if status.state not in READY and status.progress and status.progress.total:
        head += f" (step {status.progress.step}/{status.progress.total})"
    lines = [head]
    if status.result is not None:
        lines += [image.url for image in status.result.images]
    if status.error is not None:
        lines.append(f"{status.error.type}: {status.error.message}")
    return lines


def register(main: click.Group) -> None:
    """Add status, cancel and download to ``main``."""

    @main.command()
    @click.argument("task_id")
    @api_options
    def status(task_id: str, api_url: str, api_key: str | None) -> None:
        """Show TASK_ID's state, progress, and its image URLs or error."""
        with api_errors(api_url, task_id):
            current = make_client(api_url, api_key).status(task_id)
        click.echo("\n".join(describe(current)))

    @main.command()
    @click.argument("task_id")
    @api_options
    def cancel(task_id: str, api_url: str, api_key: str | None) -> None:
        """Revoke TASK_ID: a queued request never runs, a running one stops at its next step."""
        with api_errors(api_url, task_id):
            done = make_client(api_url, api_key).cancel(task_id)
        click.echo(f"{task_id} {done.state}")

    @main.command()
    @click.argument("task_id")
    @api_options
    @click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
                  show_default=True, help="Folder to write <TASK_ID>-<i>.png into.")
    def download(task_id: str, api_url: str, api_key: str | None, out_dir: Path) -> None:
        """Save the images of finished task TASK_ID as PNG files."""
        with api_errors(api_url, task_id):
            client = make_client(api_url, api_key)
            current = client.status(task_id)
            if current.state != "SUCCESS" or current.result is None:
                raise click.ClickException(f"task {task_id} is {current.state}: no images to download"
                                           + (f" ({current.error.message})" if current.error else ""))
            for i, image in enumerate(current.result.images):
                click.echo(str(client.download(image.url, out_dir / f"{task_id}-{i}.png")))
