"""Errors meant for a person. The CLI prints them as one line; services map the request errors to
HTTP statuses and gRPC codes (see http_util / grpc_util)."""


class UserError(Exception):
    """Bad input or configuration that the user can fix (message is one line, no traceback)."""


class RequestError(Exception):
    """A request the service refuses; `http_status` and `grpc_code` (a grpc.StatusCode name) map it."""

    http_status = 422
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(RequestError):
    """Missing, mistyped or malformed fields."""


class TooLarge(RequestError):
    """Over a size limit (tokens, items, bytes): refused, never truncated silently."""

    http_status = 413
    grpc_code = "INVALID_ARGUMENT"


class Overloaded(RequestError):
    """The queue is full: shed load fast instead of timing out."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(RequestError):
    """Not ready yet (model loading) or shutting down."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
