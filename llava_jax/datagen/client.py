"""A small OpenAI-compatible chat client: retries with exponential backoff, rate limiting, usage.

Standard library only (urllib), safe to share between threads. A backend for the generation core
is any callable `messages -> Reply | str`; `ChatClient` is the HTTP one.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request


@dataclasses.dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RequestError(RuntimeError):
    """A request that ran out of retries, or (fatal=True) one that cannot succeed (4xx except 429)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, timeout, dropped connection, garbled body)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    """Spaces request starts at least 60/requests_per_minute seconds apart, across threads."""

    def __init__(self, requests_per_minute: float, clock=time.monotonic, sleep=time.sleep):
        if requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be > 0, got {requests_per_minute}")
        self.interval = 60.0 / requests_per_minute
        self._clock, self._sleep = clock, sleep
        self._next = None
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:  # reserve a slot under the lock, wait for it outside
            now = self._clock()
            slot = now if self._next is None else max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self._sleep(slot - now)


class ChatClient:
    """POST {base_url}/chat/completions (base_url includes the version, e.g. https://host/v1)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 120.0,
                 max_retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0,
                 requests_per_minute: float | None = None, temperature: float | None = None,
                 max_tokens: int | None = None, sleep=time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.params = {k: v for k, v in (("temperature", temperature), ("max_tokens", max_tokens)) if v is not None}
        self.limiter = RateLimiter(requests_per_minute) if requests_per_minute else None
        self._sleep = sleep
        self._lock = threading.Lock()
        self.requests = 0  # HTTP attempts, retries included
        self.retries = 0

    def __call__(self, messages: list[dict]) -> Reply:
        body = json.dumps({"model": self.model, "messages": messages, **self.params}).encode()
        for attempt in range(self.max_retries + 1):
            if self.limiter is not None:
                self.limiter.acquire()
            with self._lock:
                self.requests += 1
            try:
                return self._post(body)
            except _Transient as e:
                if attempt == self.max_retries:
                    raise RequestError(f"{self.url}: giving up after {attempt + 1} attempts; last error: {e}") from None
                with self._lock:
                    self.retries += 1
                delay = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                if e.retry_after is not None:
                    delay = min(self.max_backoff, max(delay, e.retry_after))
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> Reply:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code == 429 or e.code >= 500:
                retry_after = e.headers.get("Retry-After") if e.headers else None
                try:
                    retry_after = float(retry_after) if retry_after is not None else None
                except ValueError:
                    retry_after = None
                raise _Transient(f"HTTP {e.code}: {detail}", retry_after) from None
            raise RequestError(f"{self.url}: HTTP {e.code}: {detail}", fatal=True) from None
        except (TimeoutError, socket.timeout) as e:
            raise _Transient(f"timed out after {self.timeout}s ({e})") from None
        except urllib.error.URLError as e:
            raise _Transient(f"connection failed: {e.reason}") from None
        except (http.client.HTTPException, ConnectionError) as e:
            raise _Transient(f"connection dropped: {e!r}") from None
        return _parse_completion(raw)


def _parse_completion(raw: bytes) -> Reply:
    try:
        data = json.loads(raw)
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Transient(f"malformed completion body: {raw[:200]!r}") from None
    usage = data.get("usage") or {}
    return Reply(text=message.get("content") or "",
                 prompt_tokens=int(usage.get("prompt_tokens") or 0),
                 completion_tokens=int(usage.get("completion_tokens") or 0))
