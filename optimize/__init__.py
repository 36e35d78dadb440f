"""Offline optimisation of the diffusion engine's networks.

ONNX export of the UNet, VAE decoder and text encoder (``export``), checked
against PyTorch with onnxruntime (``onnx_check``); calibration data captured on
real denoising trajectories (``calibration``); INT8 SmoothQuant and FP8
quantization with NVIDIA ModelOpt (``quantize``); TensorRT engine builds
(``trt_build``) and the ``trt`` UNet backend of the worker (``trt_backend``);
side-by-side comparison of backends (``verify``, ``quality``).

Nothing here is imported by the API or the worker unless a TensorRT UNet is
configured, and TensorRT itself is imported lazily: every module imports on a
machine without it.
"""
