"""wan-opt: Wan 2.2 text-to-video with per-GPU Hydra profiles, auto-selected through NVML."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["WanOptPipeline", "__version__"]


def __getattr__(name: str):
    # The pipeline pulls in diffusers and transformers: import it only when asked for.
    if name == "WanOptPipeline":
        from wan_opt.pipeline import WanOptPipeline

        return WanOptPipeline
    raise AttributeError(name)
