"""mosaic_ray: serving runtime for streaming long-video understanding with cross-modal clustered KV caches."""

__version__ = "0.1.0"
