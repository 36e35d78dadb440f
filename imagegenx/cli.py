"""The ``imagegenx`` command: run the service, manage models."""
from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import click
from pydantic import ValidationError

from imagegenx.cli_client import api_errors, api_options, interval_option, make_client, postprocess
from imagegenx.cli_client import register as register_api_commands
from imagegenx.settings import Settings


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  IMAGEGENX_{'_'.join(map(str, e['loc'])).upper() or 'CONFIG'}: {e['msg']}"
                 for e in exc.errors()]
        raise click.UsageError("invalid configuration:\n" + "\n".join(lines)) from None


@click.group()
def main() -> None:
    """ImageGenX: batching text-to-image serving."""


def api_env(env: dict[str, str], settings: Settings) -> dict[str, str]:
    """The API processes' environment: gunicorn runs several, so their Prometheus
    metrics are summed through a fresh multiprocess directory (unless one is given)."""
    if env.get("PROMETHEUS_MULTIPROC_DIR"):
        return env
    import shutil

    directory = settings.data_dir / "prometheus-api"
    shutil.rmtree(directory, ignore_errors=True)  # counts of an earlier run must not add up
    directory.mkdir(parents=True)
    return {**env, "PROMETHEUS_MULTIPROC_DIR": str(directory.resolve())}


def _ensure_model(path: Path) -> None:
    """``ensure_model``, with a bad single-file model reported as a one-line error."""
    from imagegenx.engine.model_init import ensure_model
    from imagegenx.engine.single_file import ModelLoadError

    try:
        ensure_model(path)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--flower/--no-flower", default=True, help="Also start the Flower dashboard.")
@click.option("--worker/--no-worker", default=True, help="Also start one worker.")
def up(flower: bool, worker: bool) -> None:
    """Start Redis (if none answers), the API, a worker and Flower; Ctrl-C stops all."""
    from imagegenx.launcher import (
        LaunchError, Supervisor, api_command, flower_command, flower_env, kept_secret, redis_answers,
        redis_command, worker_command,
    )

    settings = load_settings()
    env = dict(os.environ)
    if not settings.api_keys and not settings.api_key_hashes:
        key_file = settings.data_dir / "api-key"
        env["IMAGEGENX_API_KEYS"] = kept_secret(key_file, lambda: secrets.token_urlsafe(24))
        click.echo(f"API key (from {key_file}): {env['IMAGEGENX_API_KEYS']}")
    auth_file = settings.data_dir / "flower-auth"
    flower_auth = env.get("IMAGEGENX_FLOWER_AUTH") or kept_secret(
        auth_file, lambda: f"admin:{secrets.token_urlsafe(12)}")
    auth_from = "IMAGEGENX_FLOWER_AUTH" if env.get("IMAGEGENX_FLOWER_AUTH") else auth_file

    sup = Supervisor()
    sup.trap_signals()  # a signal while starting stops what has started, too
    try:
        if not redis_answers(settings.broker_url, sentinel_master=settings.sentinel_master):
            cmd = redis_command(settings.broker_url)
            if cmd is None:
                raise click.ClickException(f"no Redis answers at {settings.broker_url}")
            sup.spawn("redis", cmd)
            for _ in range(50):
                if redis_answers(settings.broker_url, sentinel_master=settings.sentinel_master):
                    break
                time.sleep(0.1)
            else:
                raise click.ClickException("redis-server did not start")
        served = settings.for_model()  # the worker runs the first served model
        if worker and served.engine == "diffusion":
            from imagegenx.engine.quiet import silence_library_progress

            silence_library_progress()
            _ensure_model(served.model)
        sup.spawn("api", api_command(settings), api_env(env, settings))
        if worker:
            sup.spawn("worker", worker_command(), env)
        if flower:
            sup.spawn("flower", flower_command(settings.flower_port), flower_env(env, flower_auth))
            click.echo(f"Flower: http://127.0.0.1:{settings.flower_port} (basic auth {flower_auth}, from {auth_from})")
    except LaunchError as exc:
        sup.stop_all()
        raise click.ClickException(str(exc)) from None
    base = f"http://{settings.api_host}:{settings.api_port}"
    click.echo(f"API: {base}/api/v1/images\nPlayground: {base}/\nAPI docs: {base}/api/v1/docs")
    sys.exit(sup.wait())


@main.command()
@click.option("--gpus", default="all", show_default=True,
              help="GPUs to serve: 'all', or comma-separated indices as nvidia-smi lists them, e.g. 0,1.")
@click.option("--loglevel", default="INFO", show_default=True, help="Celery log level of the workers.")
@click.option("--model", "model", default="",
              help="Served model to run (a name from IMAGEGENX_MODELS); default: the first.")
def worker(gpus: str, loglevel: str, model: str) -> None:
    """Start one Celery worker per GPU, all on one model's queue; Ctrl-C stops all.

    A worker that loses its GPU gives its requests back and exits with status 70;
    it is started again (at most 3 times in 10 minutes), the others go on serving.
    Any other exit stops them all.

    Worker i sees only its GPU (CUDA_VISIBLE_DEVICES=i), is named gpu<i>@<host> and
    serves Prometheus metrics on IMAGEGENX_WORKER_METRICS_PORT + i.
    Each loads the model and prepares the fast path before it takes work.
    """
    from imagegenx.launcher import (
        Supervisor, count_gpus, gpu_worker_env, parse_gpus, worker_command, worker_metrics_port,
    )

    try:
        indices = parse_gpus(gpus, count_gpus())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--gpus'") from None
    settings = load_settings()
    if model and model not in settings.served_models:
        raise click.BadParameter(f"{model!r} is not served; served models: "
                                 f"{', '.join(settings.served_models)}", param_hint="'--model'")
    settings = settings.for_model(model)
    if settings.engine == "diffusion":
        from imagegenx.engine.quiet import silence_library_progress

        silence_library_progress()
        _ensure_model(settings.model)  # once here, not raced by the workers
    env = {**os.environ, "IMAGEGENX_WORKER_MODEL": settings.worker_model}
    # A worker whose GPU was lost exits with 70 (EX_SOFTWARE) after giving its
    # requests back: start it again alone, while the other GPUs keep serving.
    sup = Supervisor(restart_codes=frozenset({os.EX_SOFTWARE}))
    sup.trap_signals()
    for index in indices:
        # One Prometheus port per worker process: the base port + the GPU index.
        port = worker_metrics_port(settings.worker_metrics_port, index)
        sup.spawn(f"gpu{index}", worker_command(f"gpu{index}@%h", loglevel),
                  {**gpu_worker_env(env, index), "IMAGEGENX_WORKER_METRICS_PORT": str(port)})
    click.echo(f"started {len(indices)} worker(s) of model {settings.worker_model} on GPU(s) "
               f"{','.join(map(str, indices))}")
    sys.exit(sup.wait())


@main.command()
@click.argument("prompt")
@api_options
@click.option("--negative", "negative_prompt", help="Negative prompt.")
@click.option("--width", type=int, help="Width in px (multiple of 8).")
@click.option("--height", type=int, help="Height in px (multiple of 8).")
@click.option("--steps", type=int, help="Denoising steps.")
@click.option("--guidance", "guidance_scale", type=float, help="Guidance scale.")
@click.option("--guidance-interval", "guidance_interval", callback=lambda _c, _p, v: interval_option(v),
              metavar="START,END", help="Fractions of the steps that run guidance, e.g. 0,0.4.")
@click.option("--sampler", help="euler, euler_a, ddim or dpmpp_2m.")
@click.option("--model", help="A served model (GET /api/v1/models); default: the server's first.")
@click.option("--seed", type=int, help="Seed (the server picks one when omitted).")
@click.option("--num-images", type=int, help="Images to draw.")
@click.option("--timeout", "timeout_s", type=float, help="Give up (server side) after this many s.")
@click.option("--thumbnail", type=int, help="Longest side of the thumbnail, px.")
@click.option("--upscale", type=click.Choice(["1", "2", "4"]), help="Enlarge the images this many times.")
@click.option("--watermark", metavar="TEXT", help="Write TEXT on the images (bottom right).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the images.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write the image here (image i of several gets -i before the suffix).")
def generate(prompt: str, api_url: str, api_key: str | None, wait: bool, output: Path | None,
             thumbnail: int | None, upscale: str | None, watermark: str | None, **params: object) -> None:
    """Submit PROMPT; with --wait, show progress and save the PNG(s)."""
    from tqdm import tqdm

    from imagegenx.client import TaskFailed

    client = make_client(api_url, api_key)
    with api_errors(api_url):
        sub = client.submit(prompt, **params, postprocess=postprocess(
            thumbnail, None if upscale is None else int(upscale), watermark))
    click.echo(f"task {sub.task_id} (seed {sub.seed})", err=True)
    if not wait:
        click.echo(sub.task_id)
        return
    bar = tqdm(total=None, unit="step", desc="queued", leave=False)
    try:
        status = None
        with api_errors(api_url, sub.task_id):
            for status in client.progress(sub.task_id):
                bar.set_description(status.state.lower())
                if status.progress and status.progress.total:
                    bar.total = status.progress.total
                    bar.n = status.progress.step or 0
                    bar.refresh()
    finally:
        bar.close()
    assert status is not None
    if status.state != "SUCCESS" or status.result is None:
        raise click.ClickException(str(TaskFailed(status)))
    images = status.result.images
    for i, image in enumerate(images):
        if output is None:
            click.echo(image.url)
            continue
        path = output if len(images) == 1 else output.with_name(f"{output.stem}-{i}{output.suffix}")
        with api_errors(api_url):
            client.download(image.url, path)
        click.echo(str(path))


register_api_commands(main)


BENCHMARKS = {
    "overhead": "bench.queue_overhead",
    "batching": "bench.batching_peers",
    "load": "bench.load_test",
    "gpu": "bench.gpu_benchmark",
    "gpu-oom": "bench.gpu_oom",
}


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.argument("name", metavar="NAME", type=click.Choice(sorted(BENCHMARKS)))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name: str, args: tuple[str, ...]) -> None:
    """Run benchmark NAME: overhead, batching, load, gpu or gpu-oom (`imagegenx bench NAME --help`).

    Each prints a table and writes JSON; see docs/BENCHMARKS.md.
    """
    import importlib

    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ImportError as exc:
        raise click.ClickException(f"benchmark {name!r} is not installed: {exc}") from None
    sys.exit(module.main(list(args)))


@main.group()
def model() -> None:
    """Create model folders."""


@model.command("init")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tiny", "arch", flag_value="tiny", default=True,
              help="A tiny model of the SD1.5 classes, random weights (CPU tests).")
@click.option("--arch", "arch", type=click.Choice(["tiny", "sd15"]),
              help="Architecture to write: tiny, or the full SD1.5 architecture.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--force", is_flag=True, help="Overwrite a model already at PATH.")
@click.option("--single-file", is_flag=True,
              help="Write one original-layout .safetensors checkpoint to PATH instead of a folder.")
def model_init(path: Path, arch: str, seed: int, force: bool, single_file: bool) -> None:
    """Write a diffusers-layout model folder (or a single file) with random weights to PATH."""
    from imagegenx.engine.model_init import write_sd15_model, write_single_file_model, write_tiny_model
    from imagegenx.engine.quiet import silence_library_progress

    silence_library_progress()
    if single_file and path.suffix.lower() != ".safetensors":
        raise click.BadParameter("with --single-file, PATH must end in .safetensors", param_hint="PATH")
    if ((path / "model_index.json").exists() or (single_file and path.exists())) and not force:
        raise click.UsageError(f"{path} already holds a model (use --force to overwrite)")
    t0 = time.perf_counter()
    if single_file:
        write_single_file_model(path, arch=arch, seed=seed)
    elif arch == "sd15":
        write_sd15_model(path)
    else:
        write_tiny_model(path, seed=seed)
    click.echo(f"wrote {arch} model to {path} in {time.perf_counter() - t0:.1f} s")


def _add_optimize_commands() -> None:
    """`imagegenx optimize ...` lives in the optimize package (imports only click here)."""
    from optimize.cli import optimize

    main.add_command(optimize)


_add_optimize_commands()


if __name__ == "__main__":
    main()
