"""Bulk rows are checked by the HTTP API's own rules (the same messages as a 422), seeded from their index,
and read from JSONL and CSV with one index per row."""

from __future__ import annotations

import json

import pytest

from serve_app.bulk.rows import BulkRequest, check_row, image_path
from serve_app.bulk.source import InputError, _records, format_of
from serve_app.config import RequestLimits
from serve_app.pipeline.params import SEED_MAX

LIMITS = RequestLimits()


def test_a_row_without_a_seed_gets_base_seed_plus_its_index_and_its_own_seed_otherwise():
    assert check_row(7, {"prompt": "a"}, LIMITS, base_seed=100).request.seed == 107
    assert check_row(7, {"prompt": "a", "seed": 3}, LIMITS, base_seed=100).request.seed == 3
    assert check_row(5, {"prompt": "a"}, LIMITS, base_seed=SEED_MAX).request.seed == 4  # modulo 2^32


def test_every_parameter_of_generate_is_a_column_and_nulls_mean_not_given():
    fields = {
        "prompt": "a fox",
        "negative_prompt": "blurry",
        "width": 128,
        "height": 64,
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "scheduler": "euler_a",
        "seed": 9,
        "num_images": 2,
        "output_format": "webp",
        "quality": 70,
        "loras": ({"name": "ink", "scale": 0.5},),
    }
    checked = check_row(0, {**fields, "strength": None}, LIMITS, base_seed=0)
    assert checked.error is None
    assert checked.request.model_dump(exclude_none=True) == {**fields, "controlnet": ()}  # units: not in bulk
    refused = check_row(1, {"prompt": "a", "controlnet": [{"name": "edges", "image": "x"}]}, LIMITS, base_seed=0)
    assert refused.error_field == "controlnet" and "not offered in bulk" in refused.error


def test_row_defaults_fill_what_a_row_leaves_out_and_the_row_wins():
    defaults = {"num_inference_steps": 4, "output_format": "jpeg"}
    checked = check_row(0, {"prompt": "a", "num_inference_steps": 6}, LIMITS, 0, defaults)
    assert checked.request.num_inference_steps == 6 and checked.request.output_format == "jpeg"


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"prompt": "a", "width": 30}, "width", "width: must be a multiple of 8 from 64 to 1024 (got 30)"),
        ({"width": 64}, "prompt", "prompt: Field required"),
        ({"prompt": "a", "strength": 0.5}, "strength", "strength: applies to image-to-image only (POST /img2img)"),
        ({"prompt": "a", "colour": "red"}, "colour", "colour: unknown field"),
        ({"prompt": "a", "steps": 4}, "steps", None),  # "did you mean num_inference_steps?", as over HTTP
        ({"prompt": "a", "scheduler": "nope"}, "scheduler", None),
        ({"prompt": "a", "response_format": "zip"}, "response_format", "response_format: unknown field"),
    ],
)
def test_a_row_the_api_would_refuse_is_refused_with_its_422_message(fields, field, message):
    checked = check_row(3, fields, LIMITS, base_seed=0)
    assert checked.request is None
    assert checked.error_code == "invalid_request" and checked.error_field == field
    if message:
        assert checked.error == message
    assert json.loads(checked.fields) == fields  # the row as given, for the manifest


def test_the_deployment_limits_apply_as_on_the_server():
    limits = RequestLimits(max_width=256, max_height=256, max_pixels=65536, max_steps=50)
    checked = check_row(0, {"prompt": "a", "width": 512}, limits, base_seed=0)
    assert checked.error == "width: must be a multiple of 8 from 64 to 256 (got 512)" and checked.error_field == "width"
    assert check_row(0, {"prompt": "a", "num_inference_steps": 51}, limits, 0).error_field == "num_inference_steps"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "a", "guidance_scale": -1},  # a bound of the request model
        {"prompt": "a", "width": 512},  # a limit of the deployment (the demo config's 256)
        {"prompt": "a", "num_images": 9},
        {"prompt": "a", "seed": -1, "scheduler": "nope"},  # two problems, one message
        {"prompt": "a", "num_inference_steps": 0},  # a bound, stated as this deployment's range
        {"prompt": "a", "promt": "b"},  # unknown: what was meant
    ],
)
def test_the_same_body_gets_the_same_message_in_bulk_and_over_http(client, service, body):
    response = client.post("/generate", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    checked = check_row(0, body, service.published_limits, base_seed=0)
    assert (checked.error, checked.error_field) == (error["message"], error["field"])


def test_a_line_that_cannot_be_read_is_a_refused_row_not_a_failed_run():
    checked = check_row(4, "{oops", LIMITS, 0, read_error="not JSON: ...")
    assert checked.request is None and checked.error_code == "malformed_request" and checked.fields == "{oops"


def test_rows_that_can_share_model_calls_share_a_sort_key():
    def key(**fields):
        return check_row(0, {"prompt": "p", **fields}, LIMITS, 0).key

    assert key(seed=1) == key(seed=2, prompt="other")  # per image, not per call
    assert key(width=128) != key(width=64) != key(num_inference_steps=3)
    assert key(scheduler="euler") != key() and key(negative_prompt="x") != key()
    assert check_row(0, {}, LIMITS, 0).key == ""  # refused rows sort first


def test_bulk_requests_are_the_native_apis_request_model():
    from serve_app.api.native.protocol import OutputOptions, TextToImageRequest

    assert issubclass(BulkRequest, TextToImageRequest) and issubclass(BulkRequest, OutputOptions)
    assert set(BulkRequest.model_fields) == set(TextToImageRequest.model_fields) | set(OutputOptions.model_fields)


def test_images_go_to_folders_of_a_thousand_rows_named_by_row_and_seed():
    assert image_path(12, 12, "png") == "images/0000/00000012-12.png"
    assert image_path(1_234_567, 5, "jpeg") == "images/1234/01234567-5.jpg"


# -- reading rows -------------------------------------------------------------------------------


def test_jsonl_rows_are_the_lines_that_are_not_blank_and_a_bad_line_is_one_bad_row():
    data = b'{"prompt": "a"}\n\n{"prompt": "b\\u2028c"}\r\nnot json\n[1, 2]\n  \n{"prompt": "d"}'
    records = list(_records("jsonl", data))
    assert [r for r, error in records if error is None] == [{"prompt": "a"}, {"prompt": "b\u2028c"}, {"prompt": "d"}]
    assert [(r, error.split(":")[0]) for r, error in records if error] == [
        ("not json", "not JSON"),
        ("[1, 2]", "a row must be a JSON object, not list"),
    ]
    assert [r for r, _ in records].index({"prompt": "d"}) == 4  # rows are counted, blank lines are not


def test_csv_cells_are_text_empty_ones_are_not_given_and_a_record_may_span_lines():
    data = b'prompt,width,seed\n"a, b",128,\n"two\nlines",,5\nc,64,1,extra\n'
    records = list(_records("csv", data))
    assert records[0] == ({"prompt": "a, b", "width": "128"}, None)
    assert records[1] == ({"prompt": "two\nlines", "seed": "5"}, None)
    assert records[2][1] == "the row has more cells than the header has columns"
    checked = check_row(0, records[0][0], LIMITS, 0)
    assert checked.request.width == 128  # "128" read as the API reads JSON numbers given as text


def test_the_input_format_comes_from_the_file_name():
    assert format_of("s3://b/x/prompts.JSONL") == "jsonl"
    assert format_of("p.ndjson.gz") == "jsonl"
    assert format_of("/d/part-0.parquet") == "parquet"
    assert format_of("p.csv") == "csv"
    with pytest.raises(InputError, match="--input-format"):
        format_of("prompts.txt")
