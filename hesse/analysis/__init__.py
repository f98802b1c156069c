"""Spectral analysis (layer 3): densities, outliers, per-layer spectra and stability."""

from hesse.analysis.spectrum import DensityResult, bulk_outlier_split, density, per_layer
from hesse.analysis.stability import (
    BatchSharpnessResult,
    StabilityResult,
    batch_size_sharpness,
    stability,
)

__all__ = [
    "BatchSharpnessResult", "DensityResult", "StabilityResult",
    "batch_size_sharpness", "bulk_outlier_split", "density", "per_layer", "stability",
]
