"""The answers other than success, raised wherever a request is decided."""

from __future__ import annotations


class HttpError(Exception):
    """An answer other than success: status, the message the client reads, headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None
                 ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
