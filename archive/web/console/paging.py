"""Paged lists (search, series, audit): the page number and size a request asks for."""

from __future__ import annotations

from archive.web.errors import HttpError

#: Rows per page of a list (the search's studies, the audit's entries) unless asked.
STUDIES_PER_PAGE = 50
MAX_PER_PAGE = 500


def page_number(value: str | None) -> int:
    """1 to 100000; HttpError 400 otherwise."""
    try:
        page = int(value or "1")
    except ValueError:
        raise HttpError(400, f"page: {value[:20]!r} is not a page number") from None
    if not 1 <= page <= 100_000:
        raise HttpError(400, "page: out of range")
    return page


def page_size(value: str | None) -> int:
    """Rows a page shows: ``limit``, 1 to :data:`MAX_PER_PAGE`."""
    if value is None or value == "":
        return STUDIES_PER_PAGE
    if not value.isdigit() or not 1 <= int(value) <= MAX_PER_PAGE:
        raise HttpError(400, f"limit: expected 1 to {MAX_PER_PAGE}, got {value[:20]!r}")
    return int(value)
