"""HTTP clients for tests that make one per request.

httpx builds a TLS context for every client it makes, loading the system's CA bundle (about 25 ms
of CPU), although the suite's URLs are plain HTTP. Made per request, that was most of the CPU of
the test processes themselves (py-spy over a whole `make test`); these clients share one context.
"""

from __future__ import annotations

import functools
import ssl

import openai

from ops.testing.deadlines import EVENTUALLY_S


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One context for every client of the process (httpx's `verify`), made when first asked for."""
    return ssl.create_default_context()


def openai_client(base_url: str, api_key: str = "unused", timeout_s: float = EVENTUALLY_S) -> openai.OpenAI:
    """The official client as the tests use it: no retries (a test sees every error), and the shared
    TLS context."""
    http_client = openai.DefaultHttpxClient(verify=tls_context())
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s, http_client=http_client)
