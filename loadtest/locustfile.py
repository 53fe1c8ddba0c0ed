"""Locust users posting realistic traffic, under a staged load shape.

Run it through `python -m loadtest.run_locust` (headless, its own process,
CSV and HTML report), or directly from the repository root:

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --load-profile spike --peak-users 32

Every option below can also be set as an environment variable (LOCUST_LOAD_PROFILE=spike ...).
The request mix is loadtest/traffic.py's, the same one the sweep and the benchmark send.

Profiles (loadtest/shapes.py; each stops by itself after its last stage):
    ramp   users rise in steps of a quarter of --peak-users, one stage each
    hold   up to --peak-users quickly, then hold for three stages
    spike  a quarter of --peak-users, a spike to --peak-users, back to a quarter
"""

from __future__ import annotations

import itertools

from locust import FastHttpUser, LoadTestShape, between, events, task

from loadtest.shapes import PROFILES, stage_at
from loadtest.traffic import DEFAULT, REALISTIC_ENDPOINTS, RequestMix, RequestStream


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--load-profile", choices=sorted(PROFILES), default="ramp", env_var="LOCUST_LOAD_PROFILE")
    parser.add_argument("--peak-users", type=int, default=16, env_var="LOCUST_PEAK_USERS")
    parser.add_argument(
        "--stage-seconds", type=float, default=20, env_var="LOCUST_STAGE_SECONDS", help="length of one stage"
    )
    parser.add_argument("--mix-sizes", default=DEFAULT, env_var="LOCUST_MIX_SIZES", help='e.g. "64x64:3,128x128:1"')
    parser.add_argument("--mix-steps", default=DEFAULT, env_var="LOCUST_MIX_STEPS", help='e.g. "2:3,4:1"')
    parser.add_argument(
        "--mix-endpoints", default=REALISTIC_ENDPOINTS, env_var="LOCUST_MIX_ENDPOINTS", help="see traffic.ENDPOINTS"
    )
    parser.add_argument("--mix-negative-share", type=float, default=0.25, env_var="LOCUST_MIX_NEGATIVE_SHARE")
    parser.add_argument(
        "--think-time", type=float, default=0.0, env_var="LOCUST_THINK_TIME", help="max seconds between requests"
    )


_mix: RequestMix | None = None
_user_seeds = itertools.count()  # each user its own stream; the same streams in every run


@events.init.add_listener
def _check_mix(environment, **_) -> None:
    """Parse the mix once, so a typo stops Locust at start rather than failing every request."""
    global _mix
    options = environment.parsed_options
    if options is None:  # used as a library without a command line
        _mix = RequestMix.from_specs()
        return
    _mix = RequestMix.from_specs(
        options.mix_sizes, options.mix_steps, options.mix_endpoints, options.mix_negative_share
    )


class ImageClient(FastHttpUser):
    """One person asking for images, back to back (or with up to --think-time seconds between)."""

    def wait_time(self):
        options = self.environment.parsed_options
        return between(0, options.think_time)(self) if options and options.think_time else 0

    def on_start(self) -> None:
        self.requests = RequestStream(_mix or RequestMix.from_specs(), seed=next(_user_seeds))

    @task
    def generate(self) -> None:
        request = self.requests.next()
        name = f"{request.method} {request.path} [{request.endpoint}]"
        with self.client.request(
            request.method, request.path, json=request.body, name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif request.endpoint == "png":
                if not response.content.startswith(b"\x89PNG"):
                    response.failure("not a PNG")
            elif not (response.json().get("images") or response.json().get("data")):
                response.failure("no images in the JSON answer")


class StagedShape(LoadTestShape):
    """The stages of --load-profile (loadtest/shapes.py), each --stage-seconds long; stops after the last."""

    def tick(self):
        options = self.runner.environment.parsed_options
        return stage_at(options.load_profile, options.peak_users, options.stage_seconds, self.get_run_time())
