"""ControlNet preprocessors (serve_app/pipeline/preprocessors.py): OpenCV's maps, fitting to the output size."""

import cv2
import numpy as np
import pytest
from PIL import Image

from serve_app.pipeline.params import ControlNetUnit
from serve_app.pipeline.preprocessors import at_resolution, control_map, fit, preprocess


def picture() -> np.ndarray:
    image = np.full((96, 128, 3), 230, dtype=np.uint8)
    image[20:70, 30:90] = (20, 40, 200)  # a blue box on light grey
    cv2.circle(image, (100, 30), 12, (0, 0, 0), 2)  # a black ring drawn on it
    return image


def test_canny_is_opencvs_edges_with_a1111s_thresholds():
    image = picture()
    edges = preprocess(image, "canny")
    assert edges.shape == image.shape and edges.dtype == np.uint8
    assert np.array_equal(edges[..., 0], cv2.Canny(image, 100, 200))
    assert np.array_equal(edges[..., 0], edges[..., 2])
    assert set(np.unique(edges)) == {0, 255}
    assert np.array_equal(preprocess(image, "canny", 10, 20)[..., 0], cv2.Canny(image, 10, 20))
    # The box's outline, not its inside.
    assert edges[45, 60].max() == 0 and edges[20:23, 30:90].max() == 255


def test_invert_and_none_and_scribble():
    image = picture()
    assert np.array_equal(preprocess(image, "none"), image)
    assert np.array_equal(preprocess(image, "invert"), 255 - image)
    lines = preprocess(image, "scribble_xdog")
    assert set(np.unique(lines)) <= {0, 255} and lines.shape == image.shape
    assert lines[18:23, 30:90].max() == 255  # the box's edge is a line
    assert lines[90:, :20].max() == 0  # flat background is not
    with pytest.raises(ValueError, match="unknown preprocessor"):
        preprocess(image, "depth_midas")


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_fit_gives_the_output_size(mode):
    fitted = np.asarray(fit(Image.fromarray(picture()), 64, 64, mode))
    assert fitted.shape == (64, 64, 3)
    if mode == "fill":  # kept whole: the grey above and below it is the edge's pixels repeated
        assert np.array_equal(fitted[0], fitted[5])


def test_control_map_preprocesses_at_the_processor_resolution_then_fits():
    unit = ControlNetUnit(name="x", preprocess="canny", processor_res=64)
    small = at_resolution(Image.fromarray(picture()), 64)
    assert small.size == (85, 64)
    made = control_map(Image.fromarray(picture()), 128, 96, unit)
    assert made.shape == (96, 128, 3)
    at_output = control_map(Image.fromarray(picture()), 128, 96, ControlNetUnit(name="x", preprocess="canny"))
    assert np.array_equal(at_output[..., 0], cv2.Canny(picture(), 100, 200))
    assert not np.array_equal(made, at_output)
