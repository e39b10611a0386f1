"""Inference: pure planning, the one-image pipeline, the batch runner and the tiled upscaler they drive."""
