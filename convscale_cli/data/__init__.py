"""Grain input pipelines: training and evaluation loaders, augmentation, exact resume, multi-host sharding."""
