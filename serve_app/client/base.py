"""What the sync and async clients share besides the plans: how they are built and configured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import httpx

from .core import ClientCore
from .errors import DEFAULT_RETRY, RetryPolicy


class ClientBase:
    """The constructor of both clients. `url` defaults to $SD_SERVE_URL, then http://127.0.0.1:8000;
    `api_key` to $SD_SERVE_API_KEY (sent as `Authorization: Bearer`). `transport` and `sleep` replace
    httpx's transport and the pause between retries (tests script the server and skip the waits)."""

    _http_client: ClassVar[type[httpx.Client] | type[httpx.AsyncClient]]
    _default_sleep: ClassVar[Callable[[float], Any]]

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] | None = None,
        max_connections: int = 100,
    ):
        self.core = ClientCore(url, api_key=api_key, timeout_s=timeout_s, retry=retry)
        self._sleep = sleep or type(self)._default_sleep
        limits = httpx.Limits(max_connections=max_connections)
        self._http = self._http_client(transport=transport, limits=limits, **self.core.http_options())

    @property
    def base_url(self) -> str:
        return self.core.base_url

    @property
    def retry(self) -> RetryPolicy:
        return self.core.retry

    @retry.setter
    def retry(self, policy: RetryPolicy) -> None:
        self.core.retry = policy

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"
