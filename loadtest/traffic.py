"""The request mix that every load test sends.

Locust users, the concurrency sweep and the benchmark all draw their requests
from a `RequestMix`, so "the same request mix" is the same code everywhere.
A mix is a few weighted choices written as text, so that they fit in a
command-line option or an environment variable:

    sizes      "default" or "64x64:3,128x128:1"   (default: the model's own size)
    steps      "default" or "2:3,4:1"             (default: the model's own steps)
    endpoints  "png:7,json:1,openai:1,a1111:1"      (see ENDPOINTS)

Prompts come from prompts.txt next to this file; a share of requests also
carries a negative prompt. Every choice comes from one seeded random stream,
so two runs with the same seed send the same requests.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
DEFAULT = "default"  # leave the parameter out of the request: the server's model default applies
NEGATIVE_PROMPTS = ("blurry, low quality", "text, watermark", "oversaturated", "deformed, extra limbs")


def _native(response_format: str):
    def body(params: dict) -> dict:
        return {**params, "response_format": response_format}

    return body


def _openai(params: dict) -> dict:
    body = {key: params[key] for key in ("prompt", "negative_prompt", "seed", "num_inference_steps") if key in params}
    if "width" in params:
        body["size"] = f"{params['width']}x{params['height']}"
    return {**body, "n": 1, "response_format": "b64_json"}


def _a1111(params: dict) -> dict:
    names = {"num_inference_steps": "steps"}
    return {names.get(key, key): value for key, value in params.items()}


@dataclass(frozen=True)
class Endpoint:
    """One kind of request: where it goes, and how it spells the common parameters."""

    method: str
    path: str
    body: Callable[[dict], dict]


ENDPOINTS = {
    "png": Endpoint("POST", "/generate", _native("image")),
    "json": Endpoint("POST", "/generate", _native("json")),
    "openai": Endpoint("POST", "/v1/images/generations", _openai),
    "a1111": Endpoint("POST", "/sdapi/v1/txt2img", _a1111),
}
# The unbatched baseline (baseline_server.py) speaks only these.
NATIVE_ENDPOINTS = ("png", "json")
# Locust's default: mostly the native API, some clients of each compatible API.
REALISTIC_ENDPOINTS = "png:7,json:1,openai:1,a1111:1"


@dataclass(frozen=True)
class Request:
    endpoint: str  # a key of ENDPOINTS: the name load tests report it under
    method: str
    path: str
    body: dict


@dataclass(frozen=True)
class Weighted:
    """A weighted choice among strings, written "a:3,b:1" (a weight left out counts 1)."""

    choices: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str, what: str) -> Weighted:
        choices, weights = [], []
        for part in spec.split(","):
            name, _, weight = part.strip().partition(":")
            if not name:
                raise ValueError(f"{what}: empty choice in {spec!r}")
            try:
                value = float(weight) if weight else 1.0
            except ValueError:
                raise ValueError(f"{what}: weight {weight!r} of {name!r} is not a number") from None
            if value <= 0:
                raise ValueError(f"{what}: weight of {name!r} must be positive, got {weight}")
            choices.append(name)
            weights.append(value)
        return cls(tuple(choices), tuple(weights))

    def pick(self, rng: random.Random) -> str:
        return rng.choices(self.choices, self.weights)[0] if len(self.choices) > 1 else self.choices[0]


def _size(text: str) -> tuple[int, int] | None:
    if text == DEFAULT:
        return None
    width, sep, height = text.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise ValueError(f"sizes: {text!r} is not WIDTHxHEIGHT (e.g. 64x64) or {DEFAULT!r}")
    return int(width), int(height)


def _steps(text: str) -> int | None:
    if text == DEFAULT:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"steps: {text!r} is not a positive whole number or {DEFAULT!r}")
    return int(text)


@dataclass(frozen=True)
class RequestMix:
    sizes: Weighted
    steps: Weighted
    endpoints: Weighted
    negative_share: float = 0.25  # requests that also carry a negative prompt

    @classmethod
    def from_specs(
        cls, sizes: str = DEFAULT, steps: str = DEFAULT, endpoints: str = "png", negative_share: float = 0.25
    ) -> RequestMix:
        """Parse and check a mix; a bad spec raises ValueError naming the part that is wrong."""
        mix = cls(
            Weighted.parse(sizes, "sizes"),
            Weighted.parse(steps, "steps"),
            Weighted.parse(endpoints, "endpoints"),
            negative_share,
        )
        for size in mix.sizes.choices:
            _size(size)
        for steps_text in mix.steps.choices:
            _steps(steps_text)
        unknown = [e for e in mix.endpoints.choices if e not in ENDPOINTS]
        if unknown:
            raise ValueError(f"endpoints: unknown {', '.join(unknown)}; choose from {', '.join(ENDPOINTS)}")
        if not 0 <= negative_share <= 1:
            raise ValueError(f"negative_share must be between 0 and 1, got {negative_share}")
        return mix

    def describe(self) -> str:
        def text(weighted: Weighted) -> str:
            return ",".join(f"{c}:{w:g}" for c, w in zip(weighted.choices, weighted.weights))

        return (
            f"sizes={text(self.sizes)} steps={text(self.steps)} endpoints={text(self.endpoints)} "
            f"negative_share={self.negative_share:g}"
        )


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


class RequestStream:
    """An endless, reproducible stream of requests drawn from a mix."""

    def __init__(self, mix: RequestMix, seed: int = 0, prompts: list[str] | None = None):
        self.mix = mix
        self.prompts = prompts or load_prompts()
        self._rng = random.Random(seed)

    def next(self) -> Request:
        rng = self._rng
        body: dict = {"prompt": rng.choice(self.prompts), "seed": rng.randrange(2**32)}
        if rng.random() < self.mix.negative_share:
            body["negative_prompt"] = rng.choice(NEGATIVE_PROMPTS)
        size = _size(self.mix.sizes.pick(rng))
        if size:
            body["width"], body["height"] = size
        steps = _steps(self.mix.steps.pick(rng))
        if steps:
            body["num_inference_steps"] = steps
        name = self.mix.endpoints.pick(rng)
        endpoint = ENDPOINTS[name]
        return Request(name, endpoint.method, endpoint.path, endpoint.body(body))
