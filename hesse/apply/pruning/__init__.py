"""The machinery behind :mod:`hesse.apply.prune`.

* :mod:`~hesse.apply.pruning.masks`: which weights to prune, sparsity targets (global,
  per layer, N:M), schedules of gradual pruning, the result and :func:`apply_masks`;
* :mod:`~hesse.apply.pruning.fisher_inverse`: the inverse of the damped empirical Fisher
  from per-sample gradients (block-wise Woodbury as in WoodFisher, low-rank M-FAC) and the
  optimal brain surgeon update that removes several weights at once;
* :mod:`~hesse.apply.pruning.layerwise`: layer-wise OBS (OBC/SparseGPT) from calibration
  inputs collected by forward hooks.
"""
