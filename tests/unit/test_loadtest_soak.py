from loadtest.soak import FIELDS, sample
from loadtest.sweep import LevelResult


def test_a_sample_joins_the_load_with_the_servers_own_account():
    level = LevelResult(concurrency=4, requests=10, errors=1, images=9, seconds=3.0, latencies_s=[0.1] * 9 + [0.5])
    info = {
        "responses_by_status": {"200": 9, "503": 1},
        "generator": {
            "replica": "abc",
            "memory_rss_bytes": 512 * 2**20,
            "images": {"succeeded": 14},
            "gpu": {"memory_used_bytes": 3 * 2**30},
        },
    }
    row = sample(info, 61.4, level)
    assert set(row) == set(FIELDS)
    assert row["images_per_s"] == 3.0 and row["p50_ms"] == 100.0 and row["errors"] == 1
    assert row["replica_rss_mib"] == 512.0 and row["gpu_used_mib"] == 3072.0
    assert row["images_made"] == 14 and row["responses_by_status"] == "200:9 503:1"
    del info["generator"]["gpu"]
    assert sample(info, 1, level)["gpu_used_mib"] == ""
