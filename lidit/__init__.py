"""LI-DiT model library: prompt encoders with usage guidance, token refiners, the LI-DiT backbone,
the inference pipeline, the feature-cache contract and the offline starter assets.

This package never imports Ray: the platform stages (`pipelines`, `training`, `serving`) build on it.
"""

__version__ = "0.1.0"
