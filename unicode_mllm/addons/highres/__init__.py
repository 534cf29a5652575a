"""High-resolution views: one image -> several encoder views, each tokenized and read as its own span.

View generators (`views.py`, see its docstring): `single`, `s2` (S^2, arXiv 2403.13043; scales are integer
multiples of the encoder's view size; merge 'token' (default) or 'channel') and `inf_llava` (INF-LLaVA,
arXiv 2407.21416: dual-perspective crops + the DEM fusion in `dual_perspective.py`; the reference's
hard-coded 1008/336 px, d = 1024 and 24x24 are parameters). Each takes an `encode` function
(b, 3, H, W) -> (b, h*w, c) and returns `ViewFeatures(tokens, grids)`; `compress_view_features` runs a
compressor (`unicode_mllm.addons.compression`) per grid and concatenates. `ViewGeneratorConfig` stores the
choice like `CompressorConfig`. The `make_views` / `fuse` split lets `evaluation/highres.py` encode views to
token ids once and fuse their embeddings at every step.
"""

from unicode_mllm.addons.highres.config import ViewGeneratorConfig
from unicode_mllm.addons.highres.dual_perspective import (
    DualPerspectiveAttention,
    DualPerspectiveEnhancement,
    dual_perspective_crops,
)
from unicode_mllm.addons.highres.views import (
    VIEW_GENERATORS,
    CompressedViews,
    InfLlavaDualPerspective,
    S2MultiScale,
    SingleView,
    ViewFeatures,
    ViewGenerator,
    build_view_generator,
    compress_view_features,
    resize_images,
)

__all__ = [
    "VIEW_GENERATORS",
    "CompressedViews",
    "DualPerspectiveAttention",
    "DualPerspectiveEnhancement",
    "InfLlavaDualPerspective",
    "S2MultiScale",
    "SingleView",
    "ViewFeatures",
    "ViewGenerator",
    "ViewGeneratorConfig",
    "build_view_generator",
    "compress_view_features",
    "dual_perspective_crops",
    "resize_images",
]
