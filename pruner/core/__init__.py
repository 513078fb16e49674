"""Pruning one model: the model adapter, the calibration runner, specs and masks, importance metrics, SparseGPT,
the block-by-block prune.
"""
