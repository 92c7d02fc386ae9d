"""One exception tree for hotq.

Every failure a client can see is a `HotqError` carrying the HTTP status and the
OpenAI error fields it maps to, so the API turns any of them into the same
`{"error": {"message", "type", "param", "code"}}` object without guessing.
"""

from __future__ import annotations

from typing import Any


class HotqError(Exception):
    """Base of every error hotq reports; subclasses set the OpenAI mapping."""

    status: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type

    def to_openai(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class ConfigError(HotqError):
    """The configuration file is missing, unreadable or invalid."""


class WireError(HotqError):
    """A message on RabbitMQ could not be decoded (bad bytes, version or shape)."""


class InvalidRequest(HotqError):
    status = 400
    error_type = "invalid_request_error"


class ModelNotFound(HotqError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(HotqError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(HotqError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(HotqError):
    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class ServiceUnavailable(HotqError):
    """hotq cannot take the request now; `retry_after_s` tells the client when to retry."""

    status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class BrokerUnavailable(ServiceUnavailable):
    code = "broker_unavailable"


class NoCapacity(ServiceUnavailable):
    """No consumer picked the request up within the configured maximum wait."""

    code = "no_capacity"


class RateLimited(HotqError):
    """The caller is over one of their `[limits]`; `retry_after_s` says when a retry can pass."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendError(HotqError):
    """The model's backend answered with an error; status and fields are the backend's."""

    error_type = "server_error"
    code = "backend_error"


class WorkerLost(HotqError):
    """The consumer streaming a response died after tokens reached the client."""

    status = 502
    error_type = "server_error"
    code = "worker_lost"


class DeadlineExceeded(HotqError):
    status = 504
    error_type = "timeout"
    code = "deadline_exceeded"


class AuthenticationError(HotqError):
    """Missing, malformed, unknown, revoked, inactive or expired credentials."""

    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(HotqError):
    """A valid caller without access to what it asked for (e.g. the model)."""

    status = 403
    error_type = "invalid_request_error"
    code = "permission_denied"
