"""ControlNet preprocessors that run on the CPU without weights, and fitting a control image to the output size.

A ControlNet reads a map (edges, lines, a scribble): a caller sends the map itself (`none`) or a picture for a
preprocessor to make it from. Through OpenCV (`opencv-python-headless`), as AUTOMATIC1111's ControlNet extension
computes them, each returning RGB uint8 (height, width, 3):

  canny          `cv2.Canny(image, threshold_a, threshold_b)` (low 100, high 200), white edges on black
  invert         255 - image: a drawing of black lines on white made white on black (A1111's
                 "invert (from white bg & black line)")
  scribble_xdog  difference of Gaussians (sigma 0.5 and 5), lines where it exceeds threshold_a (32)

Preprocessors that need weights (depth, pose, line art models) are not offered: no weights are configured.

Torch-free: the ingress runs these on the control images it decodes (and `/controlnet/detect` answers with them).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .params import PREPROCESSOR_NAMES, ResizeMode

# AUTOMATIC1111's module names for the same preprocessors (its `/controlnet/module_list` and `module` field).
A1111_MODULES = {
    "none": "none",
    "canny": "canny",
    "invert (from white bg & black line)": "invert",
    "invert": "invert",
    "scribble_xdog": "scribble_xdog",
}
A1111_MODULE_NAMES = ("none", "canny", "invert (from white bg & black line)", "scribble_xdog")
DEFAULT_THRESHOLDS = {"canny": (100.0, 200.0), "scribble_xdog": (32.0, None)}
# What `/controlnet/module_list` details: each preprocessor's sliders, as the A1111 extension describes them.
MODULE_DETAIL = {
    "none": [],
    "canny": [
        {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048},
        {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
        {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255},
    ],
    "invert (from white bg & black line)": [{"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048}],
    "scribble_xdog": [
        {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048},
        {"name": "XDoG Threshold", "value": 32, "min": 1, "max": 64},
    ],
}


def preprocess(
    image: np.ndarray, name: str, threshold_a: float | None = None, threshold_b: float | None = None
) -> np.ndarray:
    """The map preprocessor `name` makes of an RGB uint8 image (height, width, 3), at the image's size."""
    if name not in PREPROCESSOR_NAMES:
        raise ValueError(f"unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSOR_NAMES)}")
    if name == "none":
        return image
    if name == "invert":
        return 255 - image
    import cv2

    try:
        return _with_opencv(cv2, image, name, threshold_a, threshold_b)
    except cv2.error as exc:
        raise ValueError(f"OpenCV could not run {name}: {exc}") from None


def _with_opencv(cv2, image: np.ndarray, name: str, threshold_a: float | None, threshold_b: float | None) -> np.ndarray:
    default_a, default_b = DEFAULT_THRESHOLDS[name]
    a = default_a if threshold_a is None else threshold_a
    if name == "canny":
        b = default_b if threshold_b is None else threshold_b
        edges = cv2.Canny(np.ascontiguousarray(image), a, b)
        return np.ascontiguousarray(np.repeat(edges[..., None], 3, axis=2))
    # scribble_xdog
    pixels = image.astype(np.float32)
    g1 = cv2.GaussianBlur(pixels, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(pixels, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    lines = np.where(2 * (255 - dog.astype(np.int32)) > a, 255, 0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(lines[..., None], 3, axis=2))


def at_resolution(picture: Image.Image, short_side: int) -> Image.Image:
    """The picture resized so that its short side is `short_side` (the preprocessor's resolution)."""
    scale = short_side / min(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture if size == picture.size else picture.resize(size, Image.Resampling.LANCZOS)


def fit(picture: Image.Image, width: int, height: int, mode: ResizeMode) -> Image.Image:
    """The picture at width x height: stretched (resize), its aspect kept and cropped to the output's (crop), or
    kept whole inside it with its edge pixels extended over the rest (fill)."""
    if picture.size == (width, height):
        return picture
    if mode == "resize":
        return picture.resize((width, height), Image.Resampling.LANCZOS)
    cover = mode == "crop"
    scale = (max if cover else min)(width / picture.width, height / picture.height)
    inner = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    resized = np.asarray(picture.resize(inner, Image.Resampling.LANCZOS))
    if cover:
        left, top = (inner[0] - width) // 2, (inner[1] - height) // 2
        return Image.fromarray(resized[top : top + height, left : left + width])
    pad_x, pad_y = width - inner[0], height - inner[1]
    pad = ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0))
    return Image.fromarray(np.pad(resized, pad, mode="edge"))


def control_map(picture: Image.Image, width: int, height: int, unit) -> np.ndarray:
    """A decoded control image (RGB) as the engines take it: preprocessed as `unit` (a `params.ControlNetUnit`)
    says, at its processor_res or else at the output size, and fitted to width x height."""
    if unit.preprocess != "none" and unit.processor_res:
        scaled = np.asarray(at_resolution(picture, unit.processor_res))
        detected = preprocess(scaled, unit.preprocess, unit.threshold_a, unit.threshold_b)
        return np.asarray(fit(Image.fromarray(detected), width, height, unit.resize_mode))
    fitted = np.asarray(fit(picture, width, height, unit.resize_mode))
    return preprocess(fitted, unit.preprocess, unit.threshold_a, unit.threshold_b)
