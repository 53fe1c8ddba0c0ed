"""Steppers: the step engine's mechanics, one per denoiser family (start / step / decode / preview)."""
