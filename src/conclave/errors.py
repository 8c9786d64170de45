"""One error hierarchy for the whole project.

Every error carries a message a user can act on: what went wrong and, where
there is one, the fix (``hint``).  The CLI and the API server print
``str(error)`` and never a traceback, so the message must stand alone.
Secrets never go into a message: callers pass key *names*, not values.
"""

from __future__ import annotations


class ConclaveError(Exception):
    """Base class: ``str()`` gives the message followed by the hint."""

    #: short machine-readable code, used in JSON output and API error bodies
    code: str = "conclave_error"
    #: HTTP status the API server maps this error to
    http_status: int = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, object]:
        return {"type": self.code, "message": str(self)}


# --- configuration and input ----------------------------------------------------------


class ConfigError(ConclaveError):
    code = "config_error"
    http_status = 500


class InvalidRequest(ConclaveError):
    code = "invalid_request"
    http_status = 400


class ModelNotFound(InvalidRequest):
    code = "model_not_found"
    http_status = 404


class MissingCredentials(ConfigError):
    code = "missing_credentials"
    http_status = 401


class PricingError(ConfigError):
    """A model has no price and no explicit default is configured: never a silent $0."""

    code = "pricing_error"


# --- privacy --------------------------------------------------------------------------


class PrivacyViolation(ConclaveError):
    """Privacy mode refused a connection or a model that would leave the machine."""

    code = "privacy_violation"
    http_status = 403


# --- providers ------------------------------------------------------------------------


class ProviderError(ConclaveError):
    """A provider call failed.  ``retryable`` tells the router whether to try again."""

    code = "provider_error"
    http_status = 502
    retryable: bool = False
    #: answer text that had streamed before the failure (set by providers when any arrived)
    partial_text: str = ""

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        status_code: int | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.provider = provider
        self.status_code = status_code
        self.retry_after = retry_after


class RateLimited(ProviderError):
    code = "rate_limited"
    http_status = 429
    retryable = True


class Overloaded(ProviderError):
    code = "overloaded"
    http_status = 503
    retryable = True


class AuthenticationFailed(ProviderError):
    code = "authentication_failed"
    http_status = 401


class ContextTooLong(ProviderError):
    code = "context_too_long"
    http_status = 400


class ProviderTimeout(ProviderError):
    code = "timeout"
    http_status = 504
    retryable = True


class ConnectionLost(ProviderError):
    """The connection failed or dropped mid-stream.  ``partial`` holds what arrived."""

    code = "connection_lost"
    retryable = True

    def __init__(self, message: str, *, partial_text: str = "", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.partial_text = partial_text


class MalformedResponse(ProviderError):
    code = "malformed_response"


class BadProviderRequest(ProviderError):
    """The provider rejected the request itself (HTTP 400/404/422): not retryable."""

    code = "bad_provider_request"
    http_status = 400


class NoProviderAvailable(ConclaveError):
    """Routing found nothing that may serve the request, or every candidate failed."""

    code = "no_provider_available"
    http_status = 503


class LocalRuntimeError(ConclaveError):
    code = "local_runtime_error"
    http_status = 503


class NotBuiltYet(ConclaveError):
    """A feature named in the docs that this version does not have yet."""

    code = "not_built_yet"
    http_status = 501


# --- accounting -----------------------------------------------------------------------


class BudgetExceeded(ConclaveError):
    """A reservation would take a budget over its limit.

    HTTP 402 (Payment Required), not 429: the refusal does not clear by
    retrying in a moment, it clears when someone raises the limit or the
    period rolls over.  The official SDKs retry 429 automatically (openai
    and anthropic retry 408/409/429/5xx), which would only hammer a budget
    that is spent; 402 is not retried and tells the caller it is about money.
    """

    code = "budget_exceeded"
    http_status = 402

    def __init__(
        self,
        message: str,
        *,
        budget_id: str,
        limit_micros: int,
        spent_micros: int,
        reserved_micros: int,
        requested_micros: int,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.budget_id = budget_id
        self.limit_micros = limit_micros
        self.spent_micros = spent_micros
        self.reserved_micros = reserved_micros
        self.requested_micros = requested_micros


class BudgetNotFound(InvalidRequest):
    code = "budget_not_found"
    http_status = 404


class BudgetAlreadyExists(InvalidRequest):
    code = "budget_already_exists"
    http_status = 409


class RateLimitExceeded(ConclaveError):
    """Conclave's own per-key rate limit refused a request (not a provider's 429).

    ``headers`` holds ``Retry-After`` and ``X-RateLimit-*`` for the API server.
    """

    code = "rate_limit_exceeded"
    http_status = 429

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        headers: dict[str, str] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after
        self.headers = headers or {}


class BackendUnavailable(ConclaveError):
    """A storage backend (Redis, PostgreSQL, SQLite) cannot be reached: fail closed.

    ``backend`` names it and ``url`` is its address with any credentials removed.
    """

    code = "backend_unavailable"
    http_status = 503

    def __init__(
        self, message: str, *, backend: str, url: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.backend = backend
        self.url = url


# --- event bus ------------------------------------------------------------------------


class InvalidTopic(InvalidRequest):
    """A topic, subscription pattern or group name the bus cannot route."""

    code = "invalid_topic"


class InvalidEvent(InvalidRequest):
    """An event that cannot travel: payload not JSON-serializable, or too large."""

    code = "invalid_event"


class BusError(ConclaveError):
    """The event bus could not do what was asked (see the subclasses)."""

    code = "bus_error"
    http_status = 503


class BusClosed(BusError):
    code = "bus_closed"


class RequestTimeout(BusError):
    """No reply to a bus request arrived in time."""

    code = "bus_request_timeout"
    http_status = 504


class RequestFailed(BusError):
    """The handler of a bus request failed on every delivery; the event was dead-lettered."""

    code = "bus_request_failed"
    http_status = 502
