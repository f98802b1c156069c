"""Analyses (layer 3): spectra, stability, sharpness, loss landscapes and a training monitor."""

from hesse.analysis.landscape import Landscape, interpolate, loss_landscape, normalize_direction, random_direction
from hesse.analysis.linear_stability import (
    BatchSharpnessResult,
    StabilityResult,
    batch_size_sharpness,
    stability,
    stability_threshold,
)
from hesse.analysis.monitor import SharpnessMonitor
from hesse.analysis.sharpness import (
    SharpnessResult,
    adaptive_sharpness,
    average_sharpness,
    eigenvalue_sharpness,
    sam_sharpness,
    trace_sharpness,
    worst_case_sharpness,
)
from hesse.analysis.spectrum import bulk_outlier_split, per_layer

__all__ = [
    "BatchSharpnessResult", "Landscape", "SharpnessMonitor", "SharpnessResult", "StabilityResult",
    "adaptive_sharpness", "average_sharpness", "batch_size_sharpness", "bulk_outlier_split",
    "eigenvalue_sharpness", "interpolate", "loss_landscape", "normalize_direction", "per_layer",
    "random_direction", "sam_sharpness", "stability", "stability_threshold", "trace_sharpness",
    "worst_case_sharpness",
]
