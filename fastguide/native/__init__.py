"""The native sampling loop (``fastguide.sample``): built once (``spec``), run stage by stage (``loop``),
eagerly, compiled per stage kind (``inductor``) or captured whole as one CUDA graph (``cudagraph``)."""

from .sampling import clear_caches, sample

__all__ = ["clear_caches", "sample"]
