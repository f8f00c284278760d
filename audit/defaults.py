"""Every default of model-audit, defined once: the spec, the plugin, the CLI and the report read them here."""
from __future__ import annotations

#: size of the top-k the prediction expectations look at
TOP_K = 5
#: images per forward pass (plugin ``--audit-batch-size`` and CLI ``--batch-size``)
BATCH_SIZE = 16
#: how an image becomes the model's input: ``squash`` (resize to a square) or ``weights`` (resize + crop)
PREPROCESS = "squash"
#: the CAM method of a model that names none
CAM_METHOD = "gradcam"
#: focus: share of the heat that must lie inside the region when the spec names no metric
MIN_ENERGY = 0.5
#: focus: ceiling of the heat inside an avoid region when the spec gives none
MAX_ENERGY_IN_AVOID = 0.2
#: focus: the hot area of ``min_iou`` is heat >= this fraction of the maximum
IOU_THRESHOLD = 0.5
#: seed of a random initialisation on the command line
SEED = 0
#: heatmap colours, the classic notebook's first
COLORMAPS = ("jet", "turbo", "viridis", "inferno", "magma")
COLORMAP = COLORMAPS[0]
