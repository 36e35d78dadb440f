"""Build the engine and the batch pipeline from ``Settings``: one factory for
the worker and the in-process path, so both serve the same engine options
(fast path, buckets, backend, LoRAs, upscaler)."""
from __future__ import annotations

from imagegenx.engine import create_engine
from imagegenx.model_version import derived_version
from imagegenx.pipeline import BatchPipeline, render_pool
from imagegenx.settings import Settings
from imagegenx.shapes.model_files import is_shipped_shapes_model
from imagegenx.shapes.vocabulary import prompt_warnings
from imagegenx.storage import create_storage
from imagegenx.upscale import load_upscaler


def build_pipeline(settings: Settings) -> BatchPipeline:
    """The configured engine (loaded, not yet warmed up) behind a pipeline."""
    s = settings
    engine = create_engine(s.engine, s.model, s.device, s.dtype, s.synthetic_cost,
                           compile=s.compile, cuda_graphs=s.cuda_graphs, decode_stream=s.decode_stream,
                           batch_buckets=s.batch_buckets, synthetic_faults=s.synthetic_faults,
                           model_config_dir=s.model_config_dir, lora_dir=s.lora_dir,
                           unet_backend=s.unet_backend, trt_engine=s.trt_engine)
    if s.compile_cache:
        from imagegenx.compile_cache import use_compile_cache

        use_compile_cache(engine, s)  # before warm-up compiles: its compile becomes cache hits
    upscaler = load_upscaler(s.upscaler_model, getattr(engine, "device", s.device),
                             getattr(engine, "dtype", s.dtype), executor=render_pool())
    shapes = s.engine == "diffusion" and is_shipped_shapes_model(s.model)
    version = s.model_version or derived_version(s.engine, s.model)
    return BatchPipeline(engine, create_storage(s), s.public_base, s.served_model_name,
                         model_version=version, upscaler=upscaler, prompt_warnings=prompt_warnings if shapes else None,
                         png_compression=s.png_compression)
