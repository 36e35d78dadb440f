"""Portable compiled artifacts: build once, load on every fresh worker.

``imagegenx optimize warmup --out DIR`` compiles the fast path and saves
PyTorch's portable compile cache (``torch.compiler.save_cache_artifacts``:
Inductor graphs, AOTAutograd entries, Triton kernels, autotuning results) with
a manifest (``compile_manifest``). A worker with ``IMAGEGENX_COMPILE_CACHE``
(a folder, or ``s3://bucket/prefix`` read with the S3 settings) loads it into
its local caches before compiling (``load_cache_artifacts``), so its compile
is cache hits; a manifest that does not fit is refused with one log line and
the worker compiles from scratch.

Beside it, the UNet call precompiled (``engine/precompile.py``: traced graph,
guards and compiled code), so a fresh worker does not trace the UNet at all.
Where this torch cannot precompile, or the file does not load, the worker
traces it as before, on the cache's hits.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagegenx.compile_manifest import (
    ARTIFACT_FILE,
    MANIFEST_FILE,
    PRECOMPILED_UNET_FILE,
    CompileManifest,
    mismatch,
)
from imagegenx.errors import first_line

if TYPE_CHECKING:
    from imagegenx.settings import Settings

log = logging.getLogger(__name__)

_CONFIG_SUFFIXES = (".json", ".txt", ".yaml", ".yml")
_CONFIG_MAX_BYTES = 1 << 20


def model_identity(model: Path, model_config_dir: Path | None = None) -> str:
    """A cheap fingerprint of a model: its config files' contents and every other
    file's relative name and size (weights are not read). A single-file checkpoint
    adds the component configs it is loaded with."""
    from imagegenx.shapes.model_files import packaged

    digest = hashlib.sha256()
    roots = [packaged(Path(model))]
    if roots[0].is_file() and model_config_dir is not None:
        roots.append(packaged(Path(model_config_dir)))
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                      and not any(part.startswith(".") for part in
                                                                  p.relative_to(root).parts))
        for path in files:
            name = path.name if path == root else path.relative_to(root).as_posix()
            size = path.stat().st_size
            digest.update(f"{name}\0{size}\0".encode())
            if path.suffix.lower() in _CONFIG_SUFFIXES and size <= _CONFIG_MAX_BYTES:
                digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def device_facts(device: Any) -> tuple[str, str]:
    """(architecture, device name): ``sm_90`` and the card's name, or ``cpu-x86_64``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}", torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}", platform.processor() or platform.machine()


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return str(getattr(triton, "__version__", ""))


def engine_manifest(settings: Settings, engine: Any) -> CompileManifest:
    """The manifest of what this engine compiles: the artifact it may load must match it."""
    import torch

    from imagegenx.engine.diffusion import DTYPES

    options = getattr(engine, "fast_options", None)
    dtype_names = {v: k for k, v in DTYPES.items()}
    arch, name = device_facts(getattr(engine, "device", "cpu"))
    compile_options: dict[str, Any] = {}
    if options is not None:
        from imagegenx.engine.fastpath import BATCH_TRACING

        compile_options = {"compile": options.compile, "fuse_qkv": options.fuse_qkv,
                           "channels_last": options.channels_last, "conv_1x1_as_mm": True,
                           "batch_tracing": BATCH_TRACING}
    return CompileManifest(
        gpu_arch=arch, device_name=name, torch_version=torch.__version__, triton_version=triton_version(),
        model_id=model_identity(settings.model, settings.model_config_dir),
        buckets=tuple(options.buckets if options is not None else settings.batch_buckets),
        dtype=dtype_names.get(getattr(engine, "dtype", None), str(getattr(engine, "dtype", ""))),
        compile_options=compile_options,
    )


def compiles(engine: Any) -> bool:
    """Whether the engine's warm-up runs torch.compile (the CUDA fast path with compile on)."""
    options = getattr(engine, "fast_options", None)
    return options is not None and bool(options.compile)


# --- where artifacts live: a folder or s3://bucket/prefix ---------------------------------------

def _s3_parts(source: str) -> tuple[str, str]:
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    return bucket, (prefix.rstrip("/") + "/") if prefix else ""


def _s3_client(settings: Settings) -> Any:
    from imagegenx.storage import S3Storage

    return S3Storage("", endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                     addressing_style=settings.s3_addressing_style).client


def read_file(source: str, name: str, settings: Settings) -> bytes:
    """One file of an artifact; FileNotFoundError when it is missing."""
    if source.startswith("s3://"):
        from botocore.exceptions import ClientError

        bucket, prefix = _s3_parts(source)
        try:
            return _s3_client(settings).get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{source}/{name}") from None
            raise
    return (Path(source) / name).read_bytes()


def write_file(dest: str, name: str, data: bytes, settings: Settings) -> None:
    if dest.startswith("s3://"):
        bucket, prefix = _s3_parts(dest)
        _s3_client(settings).put_object(Bucket=bucket, Key=prefix + name, Body=data)
        return
    Path(dest).mkdir(parents=True, exist_ok=True)
    tmp = Path(dest) / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(Path(dest) / name)  # a reader never sees half a file


# --- save (optimize warmup) and load (worker) -----------------------------------------------------

def precompiled_unet_bytes(engine: Any) -> bytes | None:
    """The warmed-up engine's UNet call, precompiled and serialised; None where there is no
    compiled fast path, or (logged) where this torch cannot precompile it."""
    fast = getattr(engine, "fast", None)
    if fast is None or not compiles(engine):
        return None
    import tempfile

    import torch

    from imagegenx.engine.fastpath import example_rows
    from imagegenx.engine.precompile import compile_unet_call

    bucketed = fast.unet
    try:
        # Inference tensors, as the fast path's buffers are (the guards check the dispatch keys);
        # any example above 1 row, since the batch is dynamic.
        with torch.inference_mode():
            x, t, ctx = example_rows(4, bucketed.sample_shape, bucketed.context_shape, device=bucketed.device,
                                     dtype=bucketed.dtype)
            compiled = compile_unet_call(bucketed.unet, x, t, ctx)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / PRECOMPILED_UNET_FILE
            compiled.save_compiled_function(str(path))
            return path.read_bytes()
    except Exception as exc:  # noqa: BLE001 - an artifact without it still saves the compile
        log.warning("UNet not precompiled (%s); workers will trace it at start", first_line(exc))
        return None


def save_compile_cache(dest: str, manifest: CompileManifest, settings: Settings,
                       build_s: float | None = None, engine: Any = None) -> CompileManifest:
    """Write this process's compile artifacts and their manifest to ``dest``; with the
    warmed-up ``engine``, its precompiled UNet call too."""
    import torch

    unet = precompiled_unet_bytes(engine) if engine is not None else None
    saved = torch.compiler.save_cache_artifacts()
    data = saved[0] if saved is not None else None
    manifest = manifest.model_copy(update={
        "artifact": ARTIFACT_FILE if data else None, "artifact_bytes": len(data or b""),
        "precompiled_unet": PRECOMPILED_UNET_FILE if unet else None, "precompiled_unet_bytes": len(unet or b""),
        "precompiled_unet_code": _code_id() if unet else "",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_s": build_s,
    })
    if data:
        write_file(dest, ARTIFACT_FILE, data, settings)
    if unet:
        write_file(dest, PRECOMPILED_UNET_FILE, unet, settings)
    # The manifest last: a reader that sees it finds the artifact complete.
    write_file(dest, MANIFEST_FILE, (manifest.model_dump_json(indent=2) + "\n").encode(), settings)
    return manifest


def load_compile_cache(source: str, expected: CompileManifest, settings: Settings,
                       engine: Any = None) -> str | None:
    """Load the artifact at ``source`` into the local compile caches when its manifest
    fits ``expected``. None when loaded, else the one-line reason it was not. With
    ``engine``, its precompiled UNet call is loaded too (``load_precompiled_unet``)."""
    import torch

    try:
        found = CompileManifest.model_validate(json.loads(read_file(source, MANIFEST_FILE, settings)))
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} at {source}"
    except (ValueError, TypeError) as exc:
        return f"unreadable {MANIFEST_FILE}: {str(exc).splitlines()[0]}"
    except Exception as exc:  # noqa: BLE001 - storage errors (network, credentials) must not stop the worker
        return f"{MANIFEST_FILE} not read: {first_line(exc)}"
    reason = mismatch(expected, found)
    if reason is not None:
        return reason
    assert found.artifact is not None
    try:
        data = read_file(source, found.artifact, settings)
        info = torch.compiler.load_cache_artifacts(data)
    except Exception as exc:  # noqa: BLE001 - a broken artifact means compiling, not failing
        return f"artifact not loaded: {first_line(exc)}"
    if info is None:
        return "artifact not loaded: PyTorch found no cache entries in it"
    if engine is not None and found.precompiled_unet:
        load_precompiled_unet(source, found, engine, settings)
    return None


def load_precompiled_unet(source: str, found: CompileManifest, engine: Any, settings: Settings) -> bool:
    """Give ``engine`` the artifact's precompiled UNet call; False (logged) when it does
    not fit this code or does not load, and the worker traces the UNet as without it."""
    import io

    from imagegenx.engine.precompile import load_unet_call

    name = found.precompiled_unet
    here = _code_id()
    if found.precompiled_unet_code != here:
        log.warning("precompiled UNet %s/%s not loaded (built from other code: %s, this worker %s); tracing it",
                    source, name, found.precompiled_unet_code or "unknown", here)
        return False
    t0 = time.perf_counter()
    try:
        data = read_file(source, name, settings)
        if len(data) != found.precompiled_unet_bytes:  # e.g. a copy that stopped part way
            raise ValueError(f"{len(data)} bytes, the manifest says {found.precompiled_unet_bytes}")
        engine.precompiled_unet = load_unet_call(io.BytesIO(data), engine.unet)
    except Exception as exc:  # noqa: BLE001 - tracing the UNet is the fallback, not failing the worker
        log.warning("precompiled UNet %s/%s not loaded (%s); tracing it", source, name, first_line(exc))
        return False
    log.info("precompiled UNet loaded in %.2f s", time.perf_counter() - t0)
    return True


def _code_id() -> str:
    from imagegenx.engine.precompile import code_id

    return code_id()


def use_compile_cache(engine: Any, settings: Settings) -> bool:
    """Load ``settings.compile_cache`` for this engine before it compiles; logs one line."""
    source = settings.compile_cache
    if not source:
        return False
    if not compiles(engine):
        log.info("compile cache %s not used: this worker compiles nothing (CPU, or compile off)", source)
        return False
    t0 = time.perf_counter()
    reason = load_compile_cache(source, engine_manifest(settings, engine), settings, engine=engine)
    if reason is not None:
        log.warning("compile cache %s refused (%s); compiling from scratch", source, reason)
        return False
    log.info("compile cache %s loaded in %.2f s", source, time.perf_counter() - t0)
    return True
