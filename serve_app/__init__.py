"""Stable Diffusion served on Ray Serve, with dynamic batching."""

__version__ = "0.1.0"
