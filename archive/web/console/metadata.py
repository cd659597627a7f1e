"""The console's metadata queries page, ``/query``: counts of patients, studies, series
or instances matching keys on any attribute, grouped by others, as a table or as CSV
(``format=csv``, an attachment).

The ``Query`` service, as the other pages: the caller's counts are over the instances
her Query rules let her see (:meth:`acl.rules.Decision.instance_filter`, decided on
each document before her keys: :func:`archive.metadata_query.count`), so what is
hidden changes neither her counts nor her errors, which depend on the form only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from acl.rules import QUERY
from archive import metadata_query
from archive.metadata_query import MetadataQueryError
from archive.web.app import Caller, Service
from archive.web.errors import HttpError

#: Groups shown on the page (the CSV has them all).
ROWS_SHOWN = 1000
#: Longest form field read (a key per line, at most metadata_query.MAX_KEYS lines).
MAX_FIELD = 4000
LEVEL_CHOICES = tuple(metadata_query.LEVELS)
DEFAULT_LEVEL = "series"
EXAMPLES = (
    ("series", "SeriesDescription", "Modality=MR"),
    ("series", "Modality", ""),
    ("instances", "StationName", "StudyDate=20240101-20241231"),
    ("series", "SeriesDescription", "ImageType=*LOCALIZER*"),
)

#: A key to group by: a tag (its comma included) or a word between commas and spaces.
_GROUP_KEY = re.compile(r"\(?[0-9A-Fa-f]{4}\s*,\s*[0-9A-Fa-f]{4}\)?|[^,\s]+")

Page = Callable[[Request, str, Callable[[Caller], Response]], Response]
Html = Callable[..., Response]


def form_values(params: Any) -> dict[str, str]:
    """The form as sent, each field cut to :data:`MAX_FIELD` characters."""
    return {"level": params.get("level", DEFAULT_LEVEL)[:20] or DEFAULT_LEVEL,
            "group": params.get("group", "")[:MAX_FIELD],
            "keys": params.get("keys", "")[:MAX_FIELD]}


def parse_form(form: dict[str, str]) -> metadata_query.MetadataQuery:
    """The query of the form: one ``KEY=VALUE`` a line; keys to group by separated by
    commas or spaces."""
    keys = [line.strip() for line in form["keys"].splitlines() if line.strip()]
    groups = _GROUP_KEY.findall(form["group"])
    return metadata_query.parse(form["level"], keys, groups)


def csv_filename(query: metadata_query.MetadataQuery) -> str:
    """``series-by-SeriesDescription.csv``: ASCII letters, digits and dashes only."""
    name = query.level_name + "".join(
        "-by-" + re.sub(r"[^0-9A-Za-z]", "", metadata_query.key_name(t))
        for t in query.group_by)
    return f"{name}.csv"


class QueryPage:
    """``GET /query``: the form, and the counts when keys or groups are given."""

    def __init__(self, service: Service, page: Page, html: Html,
                 headers: dict[str, str]) -> None:
        self.service = service
        self.page = page
        self.html = html
        self.headers = headers

    def endpoint(self, request: Request) -> Response:
        def render(caller: Caller) -> Response:
            params = request.query_params
            form = form_values(params)
            csv = params.get("format") == "csv"
            if params.get("format") not in (None, "", "csv", "html"):
                raise HttpError(400, "format: html or csv")
            values: dict[str, Any] = {"form": form, "levels": LEVEL_CHOICES, "error": "",
                                      "result": None, "rows": [], "csv_link": "",
                                      "examples": [self._example(*e) for e in EXAMPLES],
                                      "restricted": caller.decision.restricted}
            if "level" not in params:  # the empty form
                return self.html("query.html", caller, **values)
            try:
                query = parse_form(form)
            except MetadataQueryError as exc:
                if csv:
                    raise HttpError(400, str(exc)) from None
                return self.html("query.html", caller, 400, **{**values, "error": str(exc)})
            self.service.available()
            result = self.service.database(lambda: metadata_query.run(
                self.service.context.finder, query, caller.decision.instance_filter()))
            if csv:
                return Response(metadata_query.csv_text(result), 200, {
                    **self.headers,
                    "Content-Disposition": f'attachment; filename="{csv_filename(query)}"'},
                    media_type="text/csv; charset=utf-8")
            return self.html("query.html", caller, **{
                **values, "result": result, "query": query.describe(),
                "rows": result.rows[:ROWS_SHOWN], "hidden_rows": max(
                    0, len(result.rows) - ROWS_SHOWN),
                "csv_link": "?" + urlencode({**form, "format": "csv"})})
        return self.page(request, QUERY, render)

    @staticmethod
    def _example(level: str, group: str, keys: str) -> dict[str, str]:
        text = f"{level} per {group}" + (f" where {keys}" if keys else "")
        return {"text": text, "link": "?" + urlencode({"level": level, "group": group,
                                                       "keys": keys})}
