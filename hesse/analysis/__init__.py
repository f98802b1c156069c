"""Analyses (layer 3): spectra, stability, sharpness, loss landscapes and a training monitor."""

from hesse.analysis.landscape import Landscape, interpolate, loss_landscape, normalize_direction, random_direction
from hesse.analysis.monitor import SharpnessMonitor
from hesse.analysis.sharpness import SharpnessResult, sharpness
from hesse.analysis.spectrum import bulk_outlier_split, per_layer
from hesse.analysis.stability import (
    BatchSharpnessResult,
    StabilityResult,
    batch_size_sharpness,
    stability,
)
from hesse.linalg import DensityResult, density  # moved to hesse.linalg; re-exported for existing callers

__all__ = [
    "BatchSharpnessResult", "DensityResult", "Landscape", "SharpnessMonitor", "SharpnessResult",
    "StabilityResult", "batch_size_sharpness", "bulk_outlier_split", "density", "interpolate",
    "loss_landscape", "normalize_direction", "per_layer", "random_direction", "sharpness", "stability",
]
