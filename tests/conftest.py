import os
import sys
import uuid
from pathlib import Path

import pytest

# Ray 2.60 turns on token auth once ~/.ray/auth_token exists; local test clusters run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).parent))

E2E_DIR = Path(__file__).parent / "e2e"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test under tests/e2e is marked `e2e` and `slow`: `-m "not slow"` leaves out everything that starts Ray.

    (A `pytestmark` in a conftest.py has no effect: pytest reads it from test modules only.)
    Runs before pytest's own -m filtering, which reads the marks added here.
    """
    for item in items:
        if E2E_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)
            # A Ray cluster takes tens of seconds to start on 2 cores: the fast loop runs without one.
            item.add_marker(pytest.mark.slow)
    # The order, each group in file order (the sort is stable):
    # 1. tests without Ray (two cores: a Ray instance idling beside them slows them);
    # 2. modules that use the demo config as it is;
    # 3. modules that deploy variants of it: the session's Serve then switches config once per variant
    #    module, not back and forth (a switch restarts replicas: tens of seconds each);
    # 4. tests that start a Ray instance of their own (`own_ray`): the session's is stopped before them
    #    (tests/e2e/conftest.py), as two instances on two cores starve each other.
    # Each module still deploys what it needs, so each passes alone.
    variant_modules = {item.path for item in items if "deployed_variant" in getattr(item, "fixturenames", ())}
    items.sort(
        key=lambda item: (
            E2E_DIR in Path(item.path).parents,
            item.get_closest_marker("own_ray") is not None,
            item.path in variant_modules,
            VARIANT_ORDER.index(item.path.name) if item.path.name in VARIANT_ORDER else len(VARIANT_ORDER),
        )
    )


# These variant modules first, in this order, the others after them: test_user_config's variant is a user_config,
# which Serve applies to the running replicas, so it runs on the demo config as the demo modules left it; modules
# that deploy one variant (harness.with_every_family) run one after the other, so only the first deploys it (and
# test_metrics, which counts on a fresh replica, is that first); so do test_auth and test_fairness (with_tenants).
VARIANT_ORDER = (
    "test_user_config.py",
    *("test_metrics.py", "test_families.py", "test_edits.py"),
    *("test_auth.py", "test_fairness.py"),
)


def pytest_terminal_summary(terminalreporter):
    """Times that tests measure (record_property) but never assert, listed at the end of the run."""
    measured = [
        (report.nodeid.split("::")[-1], name, value)
        for report in terminalreporter.stats.get("passed", [])
        for name, value in report.user_properties
    ]
    if measured:
        terminalreporter.section("measurements")
        for test, name, value in measured:
            terminalreporter.write_line(f"{name}: {value}    [{test}]")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3-protocol server (moto, `loadtest/servers.py`) on 127.0.0.1 for the session, stopped by its PID.
    Its AWS variables (endpoint, region, test credentials) are set in this process while it runs, as a deployment
    sets them: anything that talks to S3 here finds it, a Ray started after it too (others: `s3_env`)."""
    from loadtest.servers import s3_env
    from loadtest.servers import s3_server as s3_process

    server = s3_process(tmp_path_factory.mktemp("s3-server")).start(timeout_s=120)
    env = s3_env(server)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server: its URL, s3://<name>."""
    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"
