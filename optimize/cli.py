"""``imagegenx optimize``: export, calibrate, quantize, build, verify.

This module imports only click at import time (``imagegenx --help`` stays fast
and torch-free); each command imports what it needs.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from optimize.choices import BACKENDS, COMPONENTS, EXPORTERS, PROMPT_FILES, PROMPT_SETS, RECIPES

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")

model_option = click.option(
    "--model", type=click.Path(path_type=Path),
    help="diffusers model folder or .safetensors checkpoint (default: IMAGEGENX_MODEL, the shipped shapes "
         "model unless set).")
device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                             help="auto: CUDA when available, else the CPU.")
prompt_set_option = click.option(
    "--prompt-set", type=click.Choice(PROMPT_SETS), default="shapes", show_default=True,
    help="Shipped prompts to use without --prompts: shapes (the shipped shapes model's grammar) or general "
         "(SD1.5-style prompts).")


def _model_dir(model: Path | None) -> Path:
    from imagegenx.engine.model_init import ensure_model
    from imagegenx.engine.quiet import silence_library_progress
    from imagegenx.engine.single_file import ModelLoadError
    from imagegenx.shapes.model_files import packaged

    silence_library_progress()
    if model is not None:
        model = packaged(model)
        if not ((model / "model_index.json").is_file() or (model.is_file() and model.suffix == ".safetensors")):
            raise click.BadParameter(f"{model} is neither a diffusers model folder (no model_index.json) "
                                     "nor a .safetensors checkpoint", param_hint="'--model'")
        return model
    from imagegenx.cli import load_settings

    try:
        return ensure_model(load_settings().model)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None


def _resolve(device: str, dtype: str = "auto") -> tuple[str, str]:
    from imagegenx.engine import resolve_device

    device, dtype = resolve_device(device, dtype)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter("no CUDA device is available", param_hint="'--device'")
    return device, dtype


def _load_engine(model: Path | None, device: str, dtype: str) -> Any:
    from optimize.backends import load_engine

    device, dtype = _resolve(device, dtype)
    return load_engine(_model_dir(model), device, dtype)


def _buckets(text: str, param: str) -> list[int]:
    try:
        values = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of sizes", param_hint=param) from None
    if not values or any(v < 1 for v in values) or values != sorted(set(values)):
        raise click.BadParameter("sizes must be distinct, positive and ascending", param_hint=param)
    return values


def _scorer_errors_as_usage(score: Any) -> Any:
    """``score``, with a ValueError it raises (e.g. prompts it cannot read) reported against --scorer."""
    def checked(images: Any, texts: Any) -> Any:
        try:
            return score(images, texts)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--scorer'") from None
    return checked


@click.group()
def optimize() -> None:
    """ONNX export, calibration, quantization, TensorRT builds, backend checks and compiled artifacts."""


@optimize.command()
@model_option
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("var/onnx"), show_default=True, help="Folder for <component>.onnx files.")
@click.option("--component", "components", multiple=True, type=click.Choice(COMPONENTS),
              help="Component to export (repeatable; default: all three).")
@click.option("--dtype", type=click.Choice(DTYPES[1:]), default="fp32", show_default=True,
              help="Precision of the exported graph (fp16 for TensorRT, exported on a GPU).")
@device_option
@click.option("--exporter", type=click.Choice(EXPORTERS), default="auto", show_default=True,
              help="auto: torch's dynamo exporter, falling back to the TorchScript exporter.")
@click.option("--opset", type=click.IntRange(13, 23), help="ONNX opset (default: 18 dynamo, 17 TorchScript).")
@click.option("--external-data", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="Weights in a <name>.onnx.data file (auto: past protobuf's 2 GB).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare with PyTorch in onnxruntime (CPU) at batch sizes 1 and 3.")
def export(model: Path | None, out_dir: Path, components: tuple[str, ...], dtype: str, device: str,
           exporter: str, opset: int | None, external_data: str, check: bool) -> None:
    """Export the UNet, VAE decoder and text encoder to ONNX with a dynamic batch axis."""
    from optimize.export import export_components
    from optimize.onnx_check import compare

    engine = _load_engine(model, device, dtype)
    external = {"auto": None, "always": True, "never": False}[external_data]
    failed = []
    for component in components or COMPONENTS:
        t0 = time.perf_counter()
        result = export_components(engine, out_dir, [component], exporter=exporter, opset=opset,
                                   external_data=external)[0]
        click.echo(f"{component:<13} {result.path}  {result.bytes / 1e6:.1f} MB  exporter {result.exporter}"
                   f"{'  external data' if result.external_data else ''}  {time.perf_counter() - t0:.1f} s")
        if not check:
            continue
        for r in compare(component, engine, result.path):
            verdict = "ok" if r.passed else "FAIL"
            click.echo(f"  batch {r.batch}: max|onnx-torch| {r.max_abs:.3g} (relative {r.max_rel:.3g}; "
                       f"allowed {r.tolerance.atol:g} + {r.tolerance.rtol:g} x {r.ref_max:.3g})  {verdict}")
            if not r.passed:
                failed.append(f"{component} at batch {r.batch}")
    if failed:
        raise click.ClickException("onnxruntime differs from PyTorch beyond tolerance: " + ", ".join(failed))


@optimize.command()
@model_option
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("var/calibration/unet-inputs.pt"), show_default=True, help="Calibration file to write.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt file, one a line (default: the --prompt-set's shipped calibration file).")
@prompt_set_option
@click.option("--num-prompts", type=click.IntRange(min=1), help="Use the first N prompts (default: all).")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--sampler", default="euler", show_default=True, help="euler, euler_a, ddim or dpmpp_2m.")
@click.option("--every", type=click.IntRange(min=1), default=2, show_default=True,
              help="Keep every N-th denoising step of each trajectory.")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Images per engine batch.")
@click.option("--guidance", type=click.FloatRange(min=0), default=7.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Prompt i uses seed + i.")
@device_option
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
def calibrate(model: Path | None, out: Path, prompts_file: Path | None, prompt_set: str, num_prompts: int | None,
              steps: int, sampler: str, every: int, batch: int, guidance: float, seed: int, device: str,
              dtype: str) -> None:
    """Record the UNet's inputs along real denoising trajectories of the calibration prompts."""
    from imagegenx.engine.samplers import SAMPLERS
    from optimize.calibration import capture, load_prompts

    if sampler not in SAMPLERS:
        raise click.BadParameter(f"{sampler!r} is not one of {', '.join(SAMPLERS)}", param_hint="'--sampler'")
    prompts = load_prompts(prompts_file or PROMPT_FILES[prompt_set])[:num_prompts]
    engine = _load_engine(model, device, dtype)
    t0 = time.perf_counter()
    calib = capture(engine, prompts, steps=steps, sampler=sampler, every=every, batch_size=batch,
                    guidance=guidance, seed=seed,
                    on_batch=lambda done, total: click.echo(f"batch {done}/{total}", err=True))
    calib.save(out)
    steps_kept = sorted({r.step for r in calib.records})
    click.echo(f"{len(calib)} UNet calls from {len(prompts)} prompts (steps {steps_kept} of {steps}) "
               f"in {time.perf_counter() - t0:.1f} s -> {out} ({out.stat().st_size / 1e6:.1f} MB)")


@optimize.command()
@model_option
@click.option("--calib", "calib_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration file from `imagegenx optimize calibrate`.")
@click.option("--recipe", required=True, type=click.Choice(RECIPES),
              help="int8: SmoothQuant W8A8; fp8: FP8 (E4M3) weights and activations.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("var/quant"), show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="SmoothQuant migration strength (int8).")
@click.option("--calib-limit", type=click.IntRange(min=1), help="Replay at most N recorded UNet calls.")
@click.option("--onnx/--no-onnx", "write_onnx", default=True, show_default=True,
              help="Also export the Q/DQ ONNX graph of the quantized UNet.")
@device_option
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
def quantize(model: Path | None, calib_path: Path, recipe: str, out_dir: Path, alpha: float,
             calib_limit: int | None, write_onnx: bool, device: str, dtype: str) -> None:
    """Quantize the UNet with ModelOpt (fake quant), save its state and its Q/DQ ONNX."""
    from optimize.calibration import CalibrationSet
    from optimize.quantize import fp8_fake_quant_available, quantize_unet, save_state

    engine = _load_engine(model, device, dtype)
    if recipe == "fp8":
        ok, reason = fp8_fake_quant_available(engine.device)
        if not ok:
            raise click.BadParameter(reason, param_hint="'--recipe'")
    calib = CalibrationSet.load(calib_path)
    t0 = time.perf_counter()
    report = quantize_unet(engine.unet, calib, recipe, alpha=alpha, limit=calib_limit)
    state = out_dir / f"unet.{recipe}.modelopt.pth"
    save_state(engine.unet, state)
    click.echo(f"{recipe}: {report.enabled} quantizers on, {report.disabled} off "
               f"({len(report.skipped_layers)} layers kept in high precision by the recipe's skip list), "
               f"calibrated on {report.calibration_calls} UNet calls in {time.perf_counter() - t0:.1f} s -> {state}")
    if write_onnx:
        import collections

        import onnx

        from optimize.export import export_components

        result = export_components(engine, out_dir, ["unet"], exporter="torchscript", suffix=f".{recipe}")[0]
        ops = collections.Counter(n.op_type for n in onnx.load(str(result.path), load_external_data=False).graph.node)
        qdq = {k: v for k, v in ops.items() if k.endswith("uantizeLinear")}
        click.echo(f"Q/DQ ONNX -> {result.path} ({result.bytes / 1e6:.1f} MB): {qdq}")


@optimize.command()
@click.option("--onnx", "onnx_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="ONNX graph from `optimize export` or `optimize quantize`.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Engine file (default: the ONNX path with .plan).")
@click.option("--buckets", help="Batch buckets in images (default: IMAGEGENX_BATCH_BUCKETS).")
@click.option("--opt", "opt_images", type=click.IntRange(min=1),
              help="Batch (images) TensorRT tunes for (default: the middle bucket).")
@click.option("--cfg/--no-cfg", default=True, show_default=True,
              help="Two rows per image (the UNet under classifier-free guidance); --no-cfg for VAE/text encoder.")
@click.option("--workspace-gib", type=click.FloatRange(min=0.1), default=8.0, show_default=True,
              help="Workspace memory-pool limit.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("var/trt/timing.cache"), show_default=True, help="Read and updated by each build.")
@click.option("--optimization-level", type=click.IntRange(0, 5), help="Builder optimization level (TensorRT: 3).")
def build(onnx_path: Path, out: Path | None, buckets: str | None, opt_images: int | None, cfg: bool,
          workspace_gib: float, timing_cache: Path, optimization_level: int | None) -> None:
    """Build a strongly typed TensorRT engine whose profile covers the batch buckets."""
    from optimize.trt_build import BuildError, BuildOptions, build_engine
    from optimize.trt_common import TensorRTUnavailable, profile_for_buckets

    if buckets is None:
        from imagegenx.cli import load_settings

        sizes = load_settings().batch_buckets
    else:
        sizes = _buckets(buckets, "'--buckets'")
    try:
        profile = profile_for_buckets(sizes, opt_images, rows_per_image=2 if cfg else 1)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--opt'") from None
    options = BuildOptions(profile=profile, workspace_gib=workspace_gib, timing_cache=timing_cache,
                           optimization_level=optimization_level)
    try:
        report = build_engine(onnx_path, out or onnx_path.with_suffix(".plan"), options)
    except (TensorRTUnavailable, BuildError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"engine {report.engine} ({report.engine_bytes / 1e6:.1f} MB, TensorRT {report.tensorrt_version}) "
               f"in {report.seconds:.0f} s; rows {profile.min_rows}/{profile.opt_rows}/{profile.max_rows} "
               f"(min/opt/max)")


@optimize.command()
@click.argument("backend_a", metavar="BACKEND_A", type=click.Choice(BACKENDS))
@click.argument("backend_b", metavar="BACKEND_B", type=click.Choice(BACKENDS))
@model_option
@device_option
@click.option("--num-images", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--sampler", default="euler", show_default=True, help="euler, euler_a, ddim or dpmpp_2m.")
@click.option("--guidance", type=click.FloatRange(min=0), default=7.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Image i uses seed + i.")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Images per engine batch.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt file, one a line (default: --prompt-set's evaluation prompts, none of them used "
                   "for calibration).")
@prompt_set_option
@click.option("--onnx-unet", type=click.Path(dir_okay=False, path_type=Path),
              help="UNet graph for backend onnx (default: exported now).")
@click.option("--exporter", type=click.Choice(EXPORTERS), default="auto", show_default=True,
              help="Exporter when backend onnx exports the UNet now.")
@click.option("--int8-state", type=click.Path(dir_okay=False, path_type=Path),
              help="`optimize quantize --recipe int8` output for int8-fakequant (default: calibrate now).")
@click.option("--fp8-state", type=click.Path(dir_okay=False, path_type=Path),
              help="`optimize quantize --recipe fp8` output for fp8-fakequant (default: calibrate now).")
@click.option("--calib", "calib_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration file for fake-quant backends calibrated now (default: a short capture).")
@click.option("--calib-prompts", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts of the short capture.")
@click.option("--calib-steps", type=click.IntRange(min=1), default=8, show_default=True,
              help="Steps of the short capture.")
@click.option("--trt-engine", type=click.Path(dir_okay=False, path_type=Path), help="Engine for backend trt.")
@click.option("--scorer", help="module:function scoring images and prompts, e.g. a colour/shape classifier.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write JSON here.")
def verify(backend_a: str, backend_b: str, model: Path | None, device: str, num_images: int, steps: int,
           sampler: str, guidance: float, seed: int, batch: int, prompts_file: Path | None, prompt_set: str,
           onnx_unet: Path | None, exporter: str, int8_state: Path | None, fp8_state: Path | None,
           calib_path: Path | None, calib_prompts: int, calib_steps: int, trt_engine: Path | None,
           scorer: str | None, json_path: Path | None) -> None:
    """Draw the same images with BACKEND_A and BACKEND_B and compare them.

    Backends: torch-fp32, torch-fp16, torch-bf16 (CUDA), onnx, int8-fakequant,
    fp8-fakequant, trt (TensorRT, CUDA). Prints PSNR, SSIM and the largest pixel
    difference per image, and seconds per image per backend.
    """
    from imagegenx.engine.samplers import SAMPLERS
    from optimize.backends import BackendError, BackendOptions, make_engine, release
    from optimize.calibration import load_prompts
    from optimize.quality import load_scorer
    from optimize.verify import RunSettings, VerifyReport, compare_images, evaluation_set, format_table, \
        prompts_for, run_backend, to_json

    if sampler not in SAMPLERS:
        raise click.BadParameter(f"{sampler!r} is not one of {', '.join(SAMPLERS)}", param_hint="'--sampler'")
    score_fn = None
    if scorer:
        try:
            score_fn = _scorer_errors_as_usage(load_scorer(scorer))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--scorer'") from None
    if prompts_file:
        prompts = prompts_for(num_images, load_prompts(prompts_file))
    else:
        prompts = evaluation_set(prompt_set, num_images)
    resolved, _ = _resolve(device)
    run = RunSettings(num_images=num_images, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                      batch=batch)
    runs = []
    with tempfile.TemporaryDirectory(prefix="imagegenx-verify-") as workdir:
        opts = BackendOptions(model=_model_dir(model), device=resolved, onnx_unet=onnx_unet,
                              quant_states={k: v for k, v in (("int8", int8_state), ("fp8", fp8_state)) if v},
                              calibration=calib_path, calib_prompts=calib_prompts, calib_steps=calib_steps,
                              calib_prompt_file=PROMPT_FILES[prompt_set],
                              trt_engine=trt_engine, exporter=exporter, workdir=Path(workdir))
        for name in (backend_a, backend_b):
            try:
                engine = make_engine(name, opts)
            except BackendError as exc:
                raise click.UsageError(str(exc)) from None
            runs.append(run_backend(name, engine, prompts, run, score_fn))
            release(engine)
    rows = compare_images(runs[0].images, runs[1].images, prompts, seed)
    report = VerifyReport(runs[0], runs[1], rows, run, resolved, opts.model.name)
    click.echo(format_table(report))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(to_json(report), indent=2) + "\n")
        click.echo(f"wrote {json_path}")


@optimize.command()
@click.option("-o", "--out", required=True, metavar="DIR",
              help="Folder or s3://bucket/prefix (written with the IMAGEGENX_S3_* settings) to save the artifact to.")
def warmup(out: str) -> None:
    """Compile the fast path once (every bucket) and save it for fresh workers.

    Builds the engine the workers build (the IMAGEGENX_* settings: model, dtype,
    buckets, compile), prepares it as a worker does, and writes PyTorch's portable
    compile cache with a manifest.json of what it fits (GPU architecture, torch and
    Triton versions, model, buckets, dtype, compile options). Point workers at it
    with IMAGEGENX_COMPILE_CACHE=DIR. Run it on the GPU kind the workers use.
    """
    from imagegenx.cli import _ensure_model, load_settings
    from imagegenx.compile_cache import compiles, engine_manifest, save_compile_cache
    from imagegenx.engine.quiet import silence_library_progress
    from imagegenx.pipeline_factory import build_pipeline

    # Built from scratch, not from an artifact named for the workers.
    settings = load_settings().model_copy(update={"compile_cache": ""})
    if settings.engine != "diffusion":
        raise click.UsageError("IMAGEGENX_ENGINE is not diffusion: there is nothing to compile")
    silence_library_progress()
    _ensure_model(settings.model)
    t0 = time.perf_counter()
    engine = build_pipeline(settings).engine
    t_loaded = time.perf_counter()
    report = engine.warmup()
    build_s = time.perf_counter() - t_loaded
    manifest = save_compile_cache(out, engine_manifest(settings, engine), settings, build_s=build_s, engine=engine)
    click.echo(f"engine loaded in {t_loaded - t0:.1f} s, warm-up {build_s:.1f} s "
               f"(UNet {report.get('unet_s', 0):.1f} s, VAE {report.get('vae_s', 0):.1f} s, "
               f"{report.get('compiled_graphs', 0)} graphs compiled)")
    if not compiles(engine):
        click.echo("note: this engine compiles nothing (CPU, or IMAGEGENX_COMPILE=false): the artifact "
                   "holds no compiled code and workers will refuse it")
    click.echo(f"{manifest.gpu_arch} ({manifest.device_name}), torch {manifest.torch_version}, "
               f"model {manifest.model_id}, buckets {','.join(map(str, manifest.buckets))}, {manifest.dtype}: "
               f"{manifest.artifact_bytes / 1e6:.1f} MB"
               + (f" + precompiled UNet {manifest.precompiled_unet_bytes / 1e6:.1f} MB" if manifest.precompiled_unet
                  else "") + f" -> {out}")
