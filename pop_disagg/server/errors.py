"""Why the serving layer refused or ended a request, with the status each front end reports.

The router and the servicers raise these; the gRPC servicer maps ``grpc_code`` (the name of a
``grpc.StatusCode``) and the HTTP front end maps ``http_status`` / ``openai_type`` (OpenAI's error
object). One table here keeps both protocols saying the same thing for the same failure.
"""

from __future__ import annotations


class ServingError(RuntimeError):
    """Base class: an expected failure with a message meant for the client."""

    grpc_code = "INTERNAL"
    http_status = 500
    openai_type = "internal_error"


class WorkerUnavailable(ServingError):
    """A worker died, a link broke or a transfer timed out."""

    grpc_code, http_status, openai_type = "UNAVAILABLE", 503, "service_unavailable"


class Overloaded(ServingError):
    """The admission queue is full: refused at once instead of queueing without bound."""

    grpc_code, http_status, openai_type = "RESOURCE_EXHAUSTED", 429, "rate_limit_exceeded"


class Draining(ServingError):
    """The server is shutting down and admits nothing new."""

    grpc_code, http_status, openai_type = "UNAVAILABLE", 503, "service_unavailable"


class DeadlineExceeded(ServingError):
    """The client's deadline passed before the request finished."""

    grpc_code, http_status, openai_type = "DEADLINE_EXCEEDED", 504, "timeout"


class Unauthenticated(ServingError):
    """Missing or wrong bearer token."""

    grpc_code, http_status, openai_type = "UNAUTHENTICATED", 401, "authentication_error"
