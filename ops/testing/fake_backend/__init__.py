"""Deterministic fake OpenAI-compatible backend (stands in for vLLM in tests/benchmarks).

Run:  python -m ops.testing.fake_backend --port PORT [--host 127.0.0.1] [--model NAME ...] [--ready-after S]
(``--port 0`` picks a free port). On startup it prints one stdout line
``FAKE_BACKEND_URL http://HOST:PORT`` before serving. Default model: ``fake-model``.
As a model's ``command`` (what an agent starts): ``FAKE_BACKEND_COMMAND``.

Modules: ``behaviour`` (what it answers; ``continuation``, to a continuation), ``parsing``
(requests, errors), ``knobs`` (holds, delays, what tests read), ``stats``, ``streaming``, ``app``
(routes), ``cli`` (running it).

In tests prefer ``running_fake_backend(models)`` (context manager: subprocess on a free
port, waits for /health, yields the base URL *without* ``/v1``, stops it on exit) or
``create_app(models)`` for in-process use.

Deterministic behaviour
-----------------------
* ``GET /health`` -> 200 ``{"status": "ok"}`` (503 ``loading`` for ``--ready-after`` seconds after start,
  as a model server loading its weights); ``GET /v1/models`` -> OpenAI list of models.
* Reply tokens for user text T (chat: content of the LAST ``user`` message, text parts of
  list-content joined by a space; completions: ``prompt``): ``["echo:"] + [" " + w[::-1]
  for w in T.split()]``, e.g. "hello world" -> ["echo:", " olleh", " dlrow"]. If
  ``max_tokens`` (chat also ``max_completion_tokens``) is given and smaller than that,
  truncate to it and finish_reason is "length"; otherwise "stop". The reply text is the
  concatenation. See ``expected_chat_tokens`` / ``expected_completion_tokens``.
* Continuations (what hotq sends to continue a stream another consumer started): a chat with
  ``continue_final_message`` whose last message is the assistant's continues that message, and
  a completions prompt holding ``echo:`` continues the text from there (the prompt before it is
  the user text); the reply is the tokens after that text (``max_tokens`` counts those only),
  and the text's tokens count as prompt tokens (a word a token), as a model continuing itself.
* usage: prompt_tokens = whitespace-separated words over all messages' contents (or the
  prompt), completion_tokens = reply tokens per choice * n, total = sum.
* ``n`` (default 1): choices 0..n-1 all carry the same text.
* Non-stream chat: ``chat.completion`` with id ``chatcmpl-<hex>``, choices[i] =
  {index, message {role: assistant, content}, finish_reason, logprobs: null}, usage.
  Non-stream completions: ``text_completion`` with id ``cmpl-<hex>``, choices[i] =
  {index, text, finish_reason, logprobs: null}, usage.
* Streaming (``stream: true``): SSE ``data: <json>\\n\\n`` chunks sharing one id/created.
  Chat: first one chunk per choice with delta {role: assistant, content: ""}, then per
  token one chunk per choice with delta {content: token}; finish_reason is set on each
  choice's LAST content chunk (no separate empty finish chunk), null elsewhere.
  Completions: per token one chunk per choice {index, text, finish_reason, logprobs: null}
  (no role chunk). With ``stream_options.include_usage`` every chunk has ``"usage": null``
  and one extra final chunk has ``"choices": []`` plus usage; with ``continuous_usage_stats``
  as well (vLLM's extension), every chunk carries the usage so far instead of null (the
  prompt, and the tokens of that chunk's choice so far, as vLLM counts them). Ends with
  ``data: [DONE]``. Started with ``--no-running-usage`` (``running_fake_backend(...,
  running_usage=False)``) it ignores ``continuous_usage_stats``, as OpenAI and most other
  OpenAI-compatible servers do: only the final usage chunk carries usage.
* ``POST /v1/embeddings``: ``input`` str or list[str]; each text -> ``expected_embedding``
  (8 floats in [-1, 1] from sha256, rounded to 6 decimals). ``encoding_format`` "float"
  (default when absent) or "base64" (little-endian float32, like OpenAI; the openai python
  client asks for base64 by default). usage: prompt_tokens = total words, total = same.
* Extension fields in the request body (send via ``extra_body``):
  ``fake_delay_ms``: sleep that long before every streamed content token (after the role
  chunk) and once before a non-stream answer. ``fake_tag``: label for the records below.
  ``fake_hold_file``: a path; the request is held before anything of its answer is sent
  until that file exists (or the client leaves), so a test decides when held work ends
  instead of guessing how long it takes.
  ``fake_break_after``: a stream drops its connection abruptly (no end of the chunked body)
  after that many content tokens, as a backend that crashes or loses its network does.
  ``fake_pause_file``: a path; a stream pauses after its first content token until that
  file exists (what reached the client meanwhile was relayed without waiting for the next token).
* Prefix cache (``ops.testing.prefix_cache``): prompts' blocks in an LRU, prefill time per
  uncached token (``HOTQ_FAKE_PREFILL_MS_PER_TOKEN``), vLLM's two counters at ``GET /metrics``.
* Error injection: chat last-user-message / completion prompt / any embedding input that
  starts with ``"FAIL <status>"`` (400..599) -> that status with
  ``{"error": {"message": "fake backend failure", "type": T, "param": null,
  "code": "fake_<status>"}}``, T = rate_limit_error (429), invalid_request_error (other
  4xx), server_error (5xx).
* Unknown model -> 404 ``{"error": {..., "type": "invalid_request_error", "param":
  "model", "code": "model_not_found"}}``. Malformed requests -> 400 invalid_request_error.
* Stats: ``GET /_stats`` -> ``{"started", "completed", "cancelled", "active",
  "cancelled_tags": {tag: time.time()}, "cancelled_tags_monotonic": {tag:
  time.monotonic()}}`` over inference POSTs (chat/completions/embeddings; error answers
  count as completed). "cancelled" = client went away mid-stream (or during a non-stream
  delay). ``POST /_reset`` zeroes the counters; "active" is always the true in-flight
  count, and requests started before a reset are not counted when they end.
  ``"cancelled_after_tokens": {tag: n}``: how many tokens (of each choice) a tagged stream
  had written when it was cancelled. ``"started_order": {tag: n}``: a tagged request was
  the n-th one started (the value "started" had right after it started).
"""

from __future__ import annotations

from ops.testing.fake_backend.app import create_app
from ops.testing.fake_backend.behaviour import (
    DEFAULT_MODEL,
    EMBEDDING_DIM,
    JsonObj,
    content_text,
    expected_chat_tokens,
    expected_completion_tokens,
    expected_embedding,
    last_user_text,
    reply_text,
)
from ops.testing.fake_backend.cli import FAKE_BACKEND_COMMAND, URL_LINE_PREFIX, main, running_fake_backend, serve
from ops.testing.fake_backend.knobs import Hold, fake_stats
from ops.testing.fake_backend.stats import FakeStats

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDING_DIM",
    "FAKE_BACKEND_COMMAND",
    "URL_LINE_PREFIX",
    "FakeStats",
    "Hold",
    "JsonObj",
    "content_text",
    "create_app",
    "expected_chat_tokens",
    "expected_completion_tokens",
    "expected_embedding",
    "fake_stats",
    "last_user_text",
    "main",
    "reply_text",
    "running_fake_backend",
    "serve",
]
