"""The web console's pages: search, study, series, instance, download, dashboard (the
rules, audit and delete pages: :mod:`archive.web.console.admin`; rejecting and the
Rejected page: :mod:`archive.web.console.rejecting`; correcting:
:mod:`archive.web.console.correcting`).

Each page is answered as a DICOMweb request is (:class:`archive.web.app.Service`):
who asks (the same Basic / bearer / anonymous authentication), what the rules say
(the search, study and series pages and the dashboard are the ``Query`` service,
the instance page and the download ``Retrieve``), then C-FIND's own search
(:mod:`archive.web.qido`: the same identifier, matching and restriction as QIDO-RS)
or WADO-RS's instance selection (:mod:`archive.web.wado`).  Hidden is nonexistent:
a study the caller may not see is the same 404 page as one that does not exist.

Login is the browser's own: a page an anonymous caller may not see answers 401 with
a Basic challenge, so the browser asks for a name and password and sends them with
every later request (thumbnails through ``/dicom-web`` included); there is no
sign-out but closing the browser.  Every value from the data is escaped by the
templates (autoescape), and the pages forbid inline scripts (Content-Security-Policy).
One audit entry (``CONSOLE``) and one log line per page.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from pydicom.dataset import Dataset
from pydicom.uid import UID
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from acl import identity
from acl.rules import QUERY, RETRIEVE
from archive.model import IMAGE, SERIES, STUDY
from archive.web import qido, wado
from archive.web.app import Caller, Service, check_uid
from archive.web.auth import BASIC_CHALLENGE
from archive.web.console import admin, correcting, metadata, rejecting, stats, tree
from archive.web.console.paging import page_number, page_size
from archive.web.console.values import text
from archive.web.errors import HttpError

log = logging.getLogger("archive.web.console")

EVENT = "CONSOLE"
HERE = Path(__file__).parent
#: Instances per page of a series (studies per page of the search: paging.page_size).
INSTANCES_PER_PAGE = 100
#: Modalities of series without pixels (key objects, reports, presentation states,
#: documents): no thumbnail is asked for them.
NO_PREVIEW = frozenset({"KO", "SR", "PR", "DOC"})
#: The search form's fields, as C-FIND keys (the study date is a range of two fields).
SEARCH_FIELDS = ("PatientName", "PatientID", "AccessionNumber", "StudyDescription",
                 "ModalitiesInStudy")
#: What every console answer says about itself: no inline script, no framing, no
#: caching of patient data, no URL (a search names a patient) sent to other sites.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "script-src 'self'; style-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["seg"] = lambda value: quote(str(value), safe="")
    env.filters["size"] = human_size
    return env


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return str(n)


# --- values of C-FIND answers, as text ------------------------------------------------


def date(value: str) -> str:
    """YYYYMMDD as YYYY-MM-DD; anything else as it is."""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and value.isdigit() \
        else value


def time_of_day(value: str) -> str:
    """HHMMSS[.FFFFFF] as HH:MM:SS (HH, HHMM as HH:MM); anything else as it is."""
    digits = value.split(".")[0]
    if not digits.isdigit() or len(digits) not in (2, 4, 6):
        return value
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2)) + (
        ":00" if len(digits) == 2 else "")


def number(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(text(ds, keyword))
    except ValueError:
        return None


def search_params(form: dict[str, str]) -> list[tuple[str, str]]:
    """The QIDO-RS parameters of the search form: each field a C-FIND key as typed
    (wild cards ``*`` ``?`` as C-FIND has them), the two dates a range."""
    params = [(key, form[key].strip()) for key in SEARCH_FIELDS if form.get(key, "").strip()]
    start = form.get("StudyDateFrom", "").replace("-", "").strip()
    end = form.get("StudyDateTo", "").replace("-", "").strip()
    if start or end:
        params.append(("StudyDate", start if start == end else f"{start}-{end}"))
    return params


class Console:
    """The pages, over the DICOMweb :class:`~archive.web.app.Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.context = service.context
        http = getattr(self.context.cfg, "http", None)
        self.viewer_url: str = getattr(http, "viewer_url", "") or ""
        self.env = _environment()
        self.admin = admin.Admin(self)
        self.rejecting = rejecting.Rejecting(self)
        self.corrections = correcting.Corrections(self)

    # -- the frame of every page ------------------------------------------------------

    def _page(self, request: Request, service: str,
              render: Callable[[Caller], Response]) -> Response:
        """Authenticate and authorize, render, audit; an HttpError becomes an error
        page with its status.  An anonymous caller the rules refuse is asked to log in
        (401 with a Basic challenge, which makes the browser prompt)."""
        started = time.perf_counter()
        request_text = f"{request.method} {request.url.path}" + (
            f"?{request.url.query}" if request.url.query else "")
        try:
            caller = self.service.caller(request, service, EVENT, started)
        except HttpError as exc:
            reason = exc.message
            if exc.status == 403 and "WWW-Authenticate" in exc.headers:
                exc = HttpError(401, "log in to see the archive",
                                {"WWW-Authenticate": BASIC_CHALLENGE})
            log.info("CONSOLE %s -> %d: %s", request.url.path, exc.status, reason)
            return self._error(exc, None)
        try:
            response = render(caller)
        except HttpError as exc:
            log.info("CONSOLE %s %s -> %d: %s", caller.describe(), request.url.path,
                     exc.status, exc.message)
            self.service.audit(caller, EVENT, exc.status, started, request_text[:256],
                               exc.message)
            return self._error(exc, caller)
        self.service.audit(caller, EVENT, response.status_code, started,
                           request_text[:256])
        log.info("CONSOLE %s %s -> %d (%.1f ms)", caller.describe(), request.url.path,
                 response.status_code, (time.perf_counter() - started) * 1000)
        return response

    def _html(self, template: str, caller: Caller | None, status: int = 200,
              headers: dict[str, str] | None = None, **values: Any) -> HTMLResponse:
        principal = caller.principal.name if caller is not None else ""
        body = self.env.get_template(template).render(
            user=principal, anonymous=principal == identity.ANONYMOUS,
            administers=caller is not None and self.admin.allowed(principal), **values)
        return HTMLResponse(body, status, {**HEADERS, **(headers or {})})

    def _error(self, exc: HttpError, caller: Caller | None) -> HTMLResponse:
        return self._html("error.html", caller, exc.status, exc.headers,
                          code=exc.status, message=exc.message)

    def _find(self, caller: Caller, level: str, params: list[tuple[str, str]],
              path_keys: dict[str, str] | None = None) -> tuple[list[Dataset], bool]:
        """C-FIND's answers (as QIDO-RS gets them) and whether there are more."""
        try:
            found = qido.search(level, params, path_keys or {}, self.service.max_results)
        except qido.BadQuery as exc:
            raise HttpError(400, str(exc)) from None
        self.service.available()
        return self.service.answers(caller, found)

    def _study(self, caller: Caller, study: str) -> Dataset:
        answers, _ = self._find(caller, STUDY, [
            ("StudyInstanceUID", study), ("includefield", "StudyDescription")])
        if not answers:
            raise HttpError(404, "no such study")
        return answers[0]

    def _retrieves(self, caller: Caller) -> bool:
        """Whether the caller may retrieve anything (thumbnails, downloads)."""
        return self.context.authorize(caller.principal.name, RETRIEVE).allowed

    def _delete(self, caller: Caller, request: Request) -> str:
        """The delete button's target, for a principal whose Delete rules match some of
        the page's resource; "" for anyone else (:mod:`archive.web.console.admin`)."""
        return self.admin.delete_url(caller, request.url.path, *self.service.target(request))

    def _reject(self, caller: Caller, request: Request) -> str:
        """The reject button's target, for a principal who may reject some of the
        page's resource; "" for anyone else (:mod:`archive.web.console.rejecting`)."""
        return self.rejecting.reject_url(caller, request.url.path,
                                         *self.service.target(request))

    def _viewer(self, study: str) -> str:
        if not self.viewer_url:
            return ""
        return self.viewer_url.replace("{StudyInstanceUID}", quote(study, safe=""))

    # -- pages ------------------------------------------------------------------------

    def search(self, request: Request) -> Response:
        """Studies matching the form, a page at a time (``limit`` studies a page)."""
        def render(caller: Caller) -> Response:
            query = request.query_params
            form = {key: query.get(key, "")[:200]
                    for key in (*SEARCH_FIELDS, "StudyDateFrom", "StudyDateTo")}
            page = page_number(query.get("page"))
            per_page = page_size(query.get("limit"))
            kept = {k: v for k, v in form.items() if v}
            if "limit" in query:
                kept["limit"] = str(per_page)
            values: dict[str, Any] = {"form": form, "studies": [], "error": "", "page": page,
                                      "more": False, "links": {},
                                      "first": (page - 1) * per_page}
            try:
                answers, more = self._find(caller, STUDY, [
                    *search_params(form), ("includefield", "StudyDescription"),
                    ("limit", str(per_page)), ("offset", str((page - 1) * per_page))])
            except HttpError as exc:
                if exc.status != 400:
                    raise
                return self._html("search.html", caller, 400, **{**values,
                                                                 "error": exc.message})
            values["studies"] = [{
                "uid": text(a, "StudyInstanceUID"), "patient_name": text(a, "PatientName"),
                "patient_id": text(a, "PatientID"), "date": date(text(a, "StudyDate")),
                "accession": text(a, "AccessionNumber"),
                "modalities": text(a, "ModalitiesInStudy"),
                "description": text(a, "StudyDescription"),
                "series": number(a, "NumberOfStudyRelatedSeries"),
                "instances": number(a, "NumberOfStudyRelatedInstances"),
            } for a in answers]
            values["more"] = more
            if page > 1:
                values["links"]["previous"] = "?" + urlencode({**kept, "page": page - 1})
            if more:
                values["links"]["next"] = "?" + urlencode({**kept, "page": page + 1})
            return self._html("search.html", caller, **values)
        return self._page(request, QUERY, render)

    def study(self, request: Request) -> Response:
        """A study and its series, a thumbnail each."""
        def render(caller: Caller) -> Response:
            uid = check_uid(request.path_params["study"], "study")
            study = self._study(caller, uid)
            answers, _ = self._find(caller, SERIES, [("includefield", "BodyPartExamined")],
                                    {"StudyInstanceUID": uid})
            series = sorted(({
                "uid": text(a, "SeriesInstanceUID"), "number": text(a, "SeriesNumber"),
                "modality": text(a, "Modality"), "description": text(a, "SeriesDescription"),
                "body_part": text(a, "BodyPartExamined"),
                "instances": number(a, "NumberOfSeriesRelatedInstances"),
            } for a in answers), key=lambda s: (_as_int(s["number"]), s["uid"]))
            return self._html("study.html", caller, study=_study_values(study),
                              no_preview=NO_PREVIEW,
                              series=series, thumbnails=self._retrieves(caller),
                              viewer=self._viewer(uid), delete=self._delete(caller, request),
                              reject=self._reject(caller, request),
                              corrections=self.corrections.links(caller, request.url.path,
                                                                 STUDY))
        return self._page(request, QUERY, render)

    def series(self, request: Request) -> Response:
        """A series and its instances (by Instance Number), a page at a time."""
        def render(caller: Caller) -> Response:
            study_uid = check_uid(request.path_params["study"], "study")
            series_uid = check_uid(request.path_params["series"], "series")
            page = page_number(request.query_params.get("page"))
            study = self._study(caller, study_uid)
            found, _ = self._find(caller, SERIES, [
                ("SeriesInstanceUID", series_uid), ("includefield", "BodyPartExamined")],
                {"StudyInstanceUID": study_uid})
            if not found:
                raise HttpError(404, "no such series")
            answers, more = self._find(caller, IMAGE, [], {
                "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid})
            instances = sorted(({
                "uid": text(a, "SOPInstanceUID"), "number": text(a, "InstanceNumber"),
                "sop_class": _sop_class(text(a, "SOPClassUID")),
                "size": f"{text(a, 'Columns')} x {text(a, 'Rows')}"
                if text(a, "Rows") else "",
                "frames": text(a, "NumberOfFrames"),
            } for a in answers), key=lambda i: (_as_int(i["number"]), i["uid"]))
            first = (page - 1) * INSTANCES_PER_PAGE
            shown = instances[first:first + INSTANCES_PER_PAGE]
            links = {}
            if page > 1:
                links["previous"] = f"?page={page - 1}"
            if first + INSTANCES_PER_PAGE < len(instances):
                links["next"] = f"?page={page + 1}"
            s = found[0]
            return self._html(
                "series.html", caller, study=_study_values(study), no_preview=NO_PREVIEW,
                series={
                    "uid": series_uid, "number": text(s, "SeriesNumber"),
                    "modality": text(s, "Modality"),
                    "description": text(s, "SeriesDescription"),
                    "body_part": text(s, "BodyPartExamined"),
                    "instances": number(s, "NumberOfSeriesRelatedInstances")},
                instances=shown, first=first, total=len(instances), truncated=more,
                links=links, thumbnails=self._retrieves(caller),
                viewer=self._viewer(study_uid), delete=self._delete(caller, request),
                reject=self._reject(caller, request),
                corrections=self.corrections.links(caller, request.url.path, SERIES))
        return self._page(request, QUERY, render)

    def instance(self, request: Request) -> Response:
        """An instance's attributes as a tree (its stored DICOM JSON: Retrieve)."""
        def render(caller: Caller) -> Response:
            study_uid, series_uid, sop = self._instance_path(request)
            _, ident = wado.identifier(study_uid, series_uid, sop)
            docs = wado.instances(self.context.finder, IMAGE, ident,
                                  caller.decision.instance_filter(), ("dataset", "size"))
            doc = self.service.database(lambda: next(docs, None))
            if doc is None:
                raise HttpError(404, "no such instance")
            dataset = doc.get("dataset") or {}
            rows = tree.rows(dataset)
            return self._html("instance.html", caller, study_uid=study_uid,
                              series_uid=series_uid, sop=sop, rows=rows,
                              element_count=tree.count(rows),
                              sop_class=_sop_class(str(doc.get("SOPClassUID", ""))),
                              transfer_syntax=_syntax(str(doc.get("TransferSyntaxUID", ""))),
                              size=int(doc.get("size") or 0),
                              viewer=self._viewer(study_uid),
                              delete=self._delete(caller, request),
                              reject=self._reject(caller, request))
        return self._page(request, RETRIEVE, render)

    def download(self, request: Request) -> Response:
        """The instance's original Part-10 file, byte for byte, as an attachment."""
        def render(caller: Caller) -> Response:
            study_uid, series_uid, sop = self._instance_path(request)
            _, ident = wado.identifier(study_uid, series_uid, sop)
            selected = self.service.database(lambda: wado.items(
                self.context.finder, IMAGE, ident, caller.decision.instance_filter()))
            if not selected:
                raise HttpError(404, "no such instance")
            chunks = self.service.database(
                lambda: self._chunks(selected[0].file_id))
            return StreamingResponse(chunks, media_type="application/dicom", headers={
                **HEADERS,
                "Content-Disposition": f'attachment; filename="{sop}.dcm"'})
        return self._page(request, RETRIEVE, render)

    def _chunks(self, file_id: Any) -> Iterator[bytes]:
        """The file's chunks, the first read before the answer starts (a missing file
        is a 500 page, not a cut download)."""
        try:
            stream = self.context.archive.files.stream(file_id)
            first = next(stream, b"")
        except FileNotFoundError as exc:
            log.error("CONSOLE: %s", exc)
            raise HttpError(500, "the stored file of this instance is missing") from None
        yield first
        yield from stream

    def dashboard(self, request: Request) -> Response:
        """Totals and charts over what the caller may query."""
        def render(caller: Caller) -> Response:
            self.service.available()
            figures = self.service.database(lambda: stats.compute(
                self.context.finder, caller.decision.instance_filter()))
            return self._html("dashboard.html", caller, stats=figures,
                              charts=figures.charts(),
                              restricted=caller.decision.restricted,
                              recent=self.admin.recent(caller),
                              now=datetime.datetime.now(datetime.timezone.utc))
        return self._page(request, QUERY, render)

    def thumbnail(self, request: Request) -> Response:
        """WADO-RS's thumbnail of a series or instance, for the pages' <img>: the same
        answer, except that an anonymous caller the rules refuse gets 401, which makes
        the browser send the login it holds (it sends it unasked only below the path
        that first asked for it) instead of a broken image."""
        try:
            return self.service.thumbnail(request)
        except HttpError as exc:
            if exc.status == 403 and "WWW-Authenticate" in exc.headers:
                exc = HttpError(401, "log in to see the archive",
                                {"WWW-Authenticate": BASIC_CHALLENGE})
            return Response(exc.message + "\n", exc.status, exc.headers,
                            media_type="text/plain; charset=utf-8")

    def login(self, request: Request) -> Response:
        """Ask the browser for a name and password (an anonymous visitor the rules let
        in is never asked otherwise), then go to the search page."""
        if request.headers.get("authorization") is None:
            return self._error(HttpError(401, "log in to see the archive",
                                         {"WWW-Authenticate": BASIC_CHALLENGE}), None)
        return RedirectResponse("/", 303)

    @staticmethod
    def _instance_path(request: Request) -> tuple[str, str, str]:
        params = request.path_params
        return (check_uid(params["study"], "study"), check_uid(params["series"], "series"),
                check_uid(params["instance"], "instance"))


def _study_values(ds: Dataset) -> dict[str, Any]:
    return {
        "uid": text(ds, "StudyInstanceUID"), "patient_name": text(ds, "PatientName"),
        "patient_id": text(ds, "PatientID"), "birth_date": date(text(ds, "PatientBirthDate")),
        "sex": text(ds, "PatientSex"), "date": date(text(ds, "StudyDate")),
        "time": time_of_day(text(ds, "StudyTime")), "accession": text(ds, "AccessionNumber"),
        "description": text(ds, "StudyDescription"), "study_id": text(ds, "StudyID"),
        "referring": text(ds, "ReferringPhysicianName"),
        "modalities": text(ds, "ModalitiesInStudy"),
        "series": number(ds, "NumberOfStudyRelatedSeries"),
        "instances": number(ds, "NumberOfStudyRelatedInstances"),
    }


def _as_int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 1 << 31


def _sop_class(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else uid


def _syntax(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return f"{name} ({uid})" if name and name != uid else uid


def routes(service: Service) -> list[BaseRoute]:
    """The console's routes, served at the root beside ``/dicom-web``."""
    console = Console(service)
    queries = metadata.QueryPage(service, console._page, console._html, HEADERS)
    instance = "/studies/{study}/series/{series}/instances/{instance}"
    return [
        Route("/", console.search, methods=["GET"]),
        Route("/dashboard", console.dashboard, methods=["GET"]),
        Route("/query", queries.endpoint, methods=["GET"]),
        Route("/studies/{study}", console.study, methods=["GET"]),
        Route("/studies/{study}/series/{series}", console.series, methods=["GET"]),
        Route(instance, console.instance, methods=["GET"]),
        Route(instance + "/file", console.download, methods=["GET"]),
        Route("/studies/{study}/series/{series}/thumbnail", console.thumbnail, methods=["GET"]),
        Route(instance + "/thumbnail", console.thumbnail, methods=["GET"]),
        Route("/login", console.login, methods=["GET"]),
        *admin.routes(console),
        *rejecting.routes(console.rejecting),
        *correcting.routes(console.corrections),
        Mount("/assets", StaticFiles(directory=HERE / "static"), name="assets"),
    ]
