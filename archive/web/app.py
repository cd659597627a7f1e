"""The DICOMweb application (Starlette): routes, who asks, refusals, audit.

Every request is answered in the same steps: who asks (HTTP Basic through
``auth.backend``, or a bearer token, else ``anonymous``; 401 / 503 when refused;
:mod:`archive.web.auth`), what the rules say
about the service (QIDO-RS = Query, WADO-RS = Retrieve, STOW-RS = Store, DELETE =
Delete; 403 when no rule allows it), the database's health (503 while it is away),
the request itself.
A restricted principal is never told that something exists: a study, series or
instance she may not see is answered 404 exactly as one that does not exist, by the
same code path (the selection simply finds nothing).

pymongo is synchronous: QIDO-RS and WADO-RS are plain functions, which Starlette runs
in its thread pool, and their streamed bodies are iterated there too; STOW-RS reads the
body on the event loop and stores each part in the pool.  One log line and one audit
entry per request (per stored instance for STOW-RS, as C-STORE writes them).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

from pydicom.uid import UID, ExplicitVRLittleEndian
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from acl import identity
from acl.audit import association_entry, operation_entry, rejection_entry, summarize
from acl.rules import DELETE, NOT_AUTHORIZED, QUERY, RETRIEVE, STORE, Decision
from archive import bulkdata, rendering, transcode
from archive.context import Context
from archive.deletion import Selection
from archive.journal import Unfinished
from archive.model import IMAGE
from archive.query import QueryError
from archive.web import fhir, multipart, negotiation, qido, stow, wado
from archive.web.auth import CHALLENGE, HttpAuthenticator, Unauthenticated, claimed
from archive.web.errors import HttpError

log = logging.getLogger("archive.web")

BASE_PATH = "/dicom-web"
#: FHIR R4 (archive.web.fhir), on the same port.
FHIR_PATH = "/fhir"
#: A UID in a path: what the archive stores as UIDs (letters allowed, see
#: archive.identifiers), never a wild card, a list, a slash or a dot segment.
_UID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")
#: CORS (``http.cors``): what a viewer of another origin may send and read.  A
#: preflight (OPTIONS) is answered by the middleware, before authentication.
CORS_METHODS = ("GET", "POST", "DELETE")
CORS_REQUEST_HEADERS = ("Authorization", "Accept", "Content-Type", "Prefer")
CORS_EXPOSED_HEADERS = ("Content-Type", "Content-Location", "Warning", "Retry-After",
                        "WWW-Authenticate")
#: Audit status of each HTTP answer (the DIMSE status C-FIND / C-MOVE / C-STORE would
#: answer), beside the HTTP status itself.
_AUDIT_STATUS = {200: 0x0000, 204: 0x0000, 202: 0xB000, 400: 0xA900, 403: NOT_AUTHORIZED,
                 404: 0xC000, 406: 0xC000, 409: 0xC000, 415: 0xC000, 503: 0xA700}


def check_uid(value: str, name: str) -> str:
    if not _UID.fullmatch(value):
        raise HttpError(400, f"{name}: {value[:70]!r} is not a UID")
    return value


class Caller:
    """Who asks and what the rules say, for one request."""

    def __init__(self, request: Request, principal: identity.Principal,
                 decision: Decision) -> None:
        client = request.client
        self.address = client.host if client else ""
        self.port = client.port if client else 0
        self.principal = principal
        self.decision = decision
        # what acl.audit reads of an association
        self.peer = SimpleNamespace(
            requestor=SimpleNamespace(address=self.address, port=self.port, ae_title=""),
            acceptor=SimpleNamespace(ae_title=""),
            **{identity.ATTRIBUTE: principal})

    def describe(self) -> str:
        return f"{self.principal.name}@{self.address}:{self.port}"


class Service:
    """The endpoints, over the archive's :class:`~archive.context.Context`."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.http_auth = HttpAuthenticator(
            context.authenticator, context.guard, tokens=context.tokens,
            available=lambda: context.health.up, database_error=context.health.suspect)
        http = getattr(context.cfg, "http", None)
        self.max_results = getattr(http, "max_results", qido.DEFAULT_MAX_RESULTS)
        self.public_url = getattr(http, "public_url", "").rstrip("/")
        self.fhir_timezone = getattr(http, "fhir_timezone", "")

    # -- who asks ---------------------------------------------------------------------

    def caller(self, request: Request, service: str, event: str, started: float) -> Caller:
        """Authenticate and authorize; raises HttpError 401 / 403 / 503."""
        address = request.client.host if request.client else ""
        try:
            principal = self.http_auth.principal(request.headers.get("authorization"),
                                                 address)
        except Unauthenticated as exc:
            log.warning("%s %s from %s: authentication refused: %s%s", event,
                        request.url.path, address, exc.reason,
                        " [transient]" if exc.transient else "")
            peer = SimpleNamespace(requestor=SimpleNamespace(
                address=address, port=request.client.port if request.client else 0,
                ae_title=""), acceptor=SimpleNamespace(ae_title=""))
            self.context.audit.record(association_entry(
                peer, "HTTP-AUTH-RJ", identity.ANONYMOUS, allowed=False,
                established=identity.REFUSED, comment=exc.reason[:200],
                **claimed(request.headers.get("authorization"))))
            if exc.transient:
                raise HttpError(503, "authentication not available now, retry later",
                                {"Retry-After": "5"}) from None
            raise HttpError(401, "authentication failed",
                            {"WWW-Authenticate": exc.challenge}) from None
        decision = self.context.authorize(principal.name, service)
        caller = Caller(request, principal, decision)
        if not decision.allowed:
            comment = decision.comment()
            self.audit(caller, event, 403, started, _request_text(request), comment)
            raise HttpError(403, comment, {} if principal.name != identity.ANONYMOUS
                            else {"WWW-Authenticate": CHALLENGE})
        return caller

    def audit(self, caller: Caller, event: str, http_status: int, started: float,
              request_text: str, comment: str = "", status: int | None = None,
              counts: dict[str, int] | None = None) -> None:
        decision = caller.decision
        code = _AUDIT_STATUS.get(http_status, 0xC000) if status is None else status
        rule = decision.deciding_rule() if code != NOT_AUTHORIZED else None
        entry = operation_entry(
            caller.peer, event, caller.principal.name, decision.service,
            allowed=code != NOT_AUTHORIZED, status=code, request=request_text,
            rule=rule.index if rule is not None else None, restricted=decision.restricted,
            comment=comment, counts=counts, started=started)
        entry["http_status"] = http_status
        self.context.audit.record(entry)

    def available(self) -> None:
        """HttpError 503 while the database is away (the health monitor says so)."""
        if not self.context.health.up:
            raise HttpError(503, "database unavailable, retry later", {"Retry-After": "5"})

    def base_url(self, request: Request) -> str:
        """The root of the URLs in answers: ``http.public_url``, else the request's.

        A Host header without a port means the scheme's default port (RFC 9110 7.2);
        some clients (dicomweb-client) leave out a port they were given, so the port
        this service listens on is put back unless it is the default one.
        """
        if self.public_url:
            return self.public_url
        url = request.url
        netloc = url.netloc
        server = request.scope.get("server")
        if url.port is None and server and server[1] != {"http": 80, "https": 443}.get(
                url.scheme):
            netloc = f"{netloc}:{server[1]}"
        return f"{url.scheme}://{netloc}{BASE_PATH}"

    # -- QIDO-RS ----------------------------------------------------------------------

    def search(self, request: Request, level: str) -> Response:
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, QUERY, "QIDO-RS", started)
        try:
            negotiation.json_accepted(request.headers.get("accept"))
            path_keys = {}
            params = request.path_params
            if "study" in params:
                path_keys["StudyInstanceUID"] = check_uid(params["study"], "study")
            if "series" in params:
                path_keys["SeriesInstanceUID"] = check_uid(params["series"], "series")
            try:
                found = qido.search(level, request.query_params.multi_items(), path_keys,
                                    self.max_results)
            except qido.BadQuery as exc:
                raise HttpError(400, str(exc)) from None
            text = summarize(found.identifier)[:200]
            self.available()
            answers, more = self.answers(caller, found)
        except HttpError as exc:
            self.audit(caller, "QIDO-RS", exc.status, started, text, exc.message)
            raise
        base = self.base_url(request)
        body = json.dumps([qido.to_json(a, level, base) for a in answers],
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {}
        if more:  # PS3.18 8.3.4.4: more results than the limit let through
            headers["Warning"] = '299 dicom-archive: "There are additional results that ' \
                                 'can be requested"'
        self.audit(caller, "QIDO-RS", 200, started, text, counts={"matches": len(answers)})
        log.info("QIDO-RS %s %s -> 200, %d matches (%.1f ms)", caller.describe(),
                 request.url.path, len(answers), (time.perf_counter() - started) * 1000)
        return Response(body, 200, headers, media_type=negotiation.DICOM_JSON)

    def answers(self, caller: Caller, found: qido.Search) -> tuple[list[Any], bool]:
        """Up to ``limit`` answers, and whether there were more."""
        def collect() -> tuple[list[Any], bool]:
            results = qido.run(self.context, caller.decision, found)
            answers = []
            for answer in results:
                if len(answers) == found.limit:
                    return answers, True
                answers.append(answer)
            return answers, False
        return self._querying(collect)

    def _querying(self, call: Callable[[], Any]) -> Any:
        """Run a C-FIND: 400 for what C-FIND refuses, 503 while the database is away."""
        try:
            return call()
        except qido.BadQuery as exc:
            raise HttpError(400, str(exc)) from None
        except QueryError as exc:
            raise HttpError(400, exc.comment) from None
        except OperationFailure as exc:
            log.error("QIDO-RS: the database refused the query: %s", exc)
            raise HttpError(500, "the database cannot run this query") from None
        except PyMongoError as exc:
            raise self.unavailable(exc, "query") from None

    def unavailable(self, exc: PyMongoError, during: str) -> HttpError:
        """The 503 of a database failure; the health monitor told of it.  An error
        other than a lost connection (which the monitor logs once per outage) is logged
        here: the client is told no more."""
        self.context.health.suspect(exc)
        if not isinstance(exc, ConnectionFailure):
            log.warning("database error during the %s: %s: %s", during,
                        type(exc).__name__, str(exc)[:200])
        return HttpError(503, "database unavailable, retry later", {"Retry-After": "5"})

    # -- FHIR -------------------------------------------------------------------------

    def fhir_url(self, request: Request) -> str:
        """The FHIR base: the DICOMweb base with its last path segment made ``fhir``."""
        dicomweb = self.base_url(request)
        root = dicomweb.rsplit("/", 1)[0] if "/" in dicomweb.split("://", 1)[1] \
            else dicomweb
        return root + FHIR_PATH

    def fhir_search(self, request: Request) -> Response:
        """``GET /fhir/ImagingStudy?...``: a searchset Bundle, as C-FIND answers."""
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, QUERY, "FHIR", started)
        try:
            lenient = fhir.lenient(request.headers.get("prefer"))
            search = _fhir_parameters(request, lambda params: fhir.parse_search(
                params, self.max_results, lenient))
            self.available()
            total, page, series, instances = self._querying(
                lambda: fhir.studies(self.context, caller.decision, search))
        except HttpError as exc:
            self.audit(caller, "FHIR", exc.status, started, text, exc.message)
            raise
        found = fhir.resources(page, series, instances, self.base_url(request),
                               self.fhir_timezone)
        body = fhir.bundle(found, total, search, self.fhir_url(request))
        self.audit(caller, "FHIR", 200, started, text, counts={"matches": len(page)})
        log.info("FHIR %s %s -> 200, %d of %d studies (%.1f ms)", caller.describe(),
                 request.url.path, len(page), total, (time.perf_counter() - started) * 1000)
        return _fhir_response(body, 200, search.pretty)

    def fhir_read(self, request: Request) -> Response:
        """``GET /fhir/ImagingStudy/{id}``: 404 for a study hidden or absent alike."""
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, QUERY, "FHIR", started)
        try:
            search = _fhir_parameters(request, lambda params: fhir.parse_read(
                request.path_params["id"], params))
            self.available()
            _, page, series, instances = self._querying(
                lambda: fhir.studies(self.context, caller.decision, search))
            if not page:
                raise HttpError(404, "no such ImagingStudy")
        except HttpError as exc:
            self.audit(caller, "FHIR", exc.status, started, text, exc.message)
            raise
        [resource] = fhir.resources(page[:1], series, instances, self.base_url(request),
                                    self.fhir_timezone)
        self.audit(caller, "FHIR", 200, started, text, counts={"matches": 1})
        log.info("FHIR %s %s -> 200", caller.describe(), request.url.path)
        return _fhir_response(resource, 200, search.pretty)

    def fhir_patient(self, request: Request) -> Response:
        """``GET /fhir/Patient/{id}``: the patient of ``subject``, if she may see her."""
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, QUERY, "FHIR", started)
        try:
            patient_id = request.path_params["id"]
            search = _fhir_parameters(request, lambda params: fhir.parse_read(
                patient_id, params, "PatientID"))
            self.available()
            answer = self._querying(
                lambda: fhir.patient(self.context, caller.decision, patient_id))
            if answer is None:
                raise HttpError(404, "no such Patient")
        except HttpError as exc:
            self.audit(caller, "FHIR", exc.status, started, text, exc.message)
            raise
        self.audit(caller, "FHIR", 200, started, text, counts={"matches": 1})
        log.info("FHIR %s %s -> 200", caller.describe(), request.url.path)
        return _fhir_response(fhir.patient_resource(answer), 200, search.pretty)

    def fhir_metadata(self, request: Request) -> Response:
        """``GET /fhir/metadata``: the CapabilityStatement, to whoever may query."""
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, QUERY, "FHIR", started)
        try:
            search = _fhir_parameters(request, lambda params: fhir.parse_read(
                "metadata", params, "none"))
        except HttpError as exc:
            self.audit(caller, "FHIR", exc.status, started, text, exc.message)
            raise
        self.audit(caller, "FHIR", 200, started, text)
        return _fhir_response(fhir.capabilities(self.fhir_url(request)), 200, search.pretty)

    # -- WADO-RS ----------------------------------------------------------------------

    def target(self, request: Request) -> tuple[str, Any]:
        """The level and unique keys a resource's path names (HttpError 400 on a bad UID)."""
        params = request.path_params
        study = check_uid(params["study"], "study")
        series = check_uid(params["series"], "series") if "series" in params else None
        sop = check_uid(params["instance"], "instance") if "instance" in params else None
        return wado.identifier(study, series, sop)

    def retrieve(self, request: Request) -> Response:
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, RETRIEVE, "WADO-RS", started)
        try:
            level, ident = self.target(request)
            accepted = negotiation.dicom_syntaxes(request.headers.get("accept"))
            self.available()
            selected = self.database(lambda: wado.items(
                self.context.finder, level, ident, caller.decision.instance_filter()))
            if not selected:
                raise HttpError(404, f"no such {_NAMES[level]}")
            plan = wado.plan_syntaxes(selected, accepted)
            boundary = multipart.new_boundary()
            body = multipart.coalesce(wado.multipart_body(
                self.context.archive.files, selected, plan, boundary))
            first = self.database(lambda: next(body))
        except transcode.Undecodable as exc:
            log.error("WADO-RS %s: %s", request.url.path, exc)
            self.audit(caller, "WADO-RS", 406, started, text, str(exc))
            raise HttpError(406, f"{exc}; ask for transfer-syntax=* to get it as stored"
                            ) from None
        except FileNotFoundError as exc:
            log.error("WADO-RS %s: %s", request.url.path, exc)
            self.audit(caller, "WADO-RS", 500, started, text, str(exc))
            raise HttpError(500, "the stored file of an instance is missing") from None
        except HttpError as exc:
            self.audit(caller, "WADO-RS", exc.status, started, text, exc.message)
            raise
        self.audit(caller, "WADO-RS", 200, started, text,
                   counts={"instances": len(selected)})
        log.info("WADO-RS %s %s -> 200, %d instances", caller.describe(), request.url.path,
                 len(selected))
        return StreamingResponse(
            itertools.chain((first,), body),
            media_type=f'multipart/related; type="{negotiation.DICOM}"; boundary={boundary}')

    def metadata(self, request: Request) -> Response:
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, RETRIEVE, "WADO-RS", started)
        try:
            level, ident = self.target(request)
            negotiation.json_accepted(request.headers.get("accept"))
            self.available()
            docs = wado.instances(self.context.finder, level, ident,
                                  caller.decision.instance_filter(), ("dataset",))
            first = self.database(lambda: next(docs, None))
            if first is None:
                raise HttpError(404, f"no such {_NAMES[level]}")
        except HttpError as exc:
            self.audit(caller, "WADO-RS", exc.status, started, text, exc.message)
            raise
        self.audit(caller, "WADO-RS", 200, started, text)
        log.info("WADO-RS %s %s -> 200", caller.describe(), request.url.path)
        return StreamingResponse(multipart.coalesce(
            wado.metadata_body(first, docs, self.base_url(request))),
                                 media_type=negotiation.DICOM_JSON)

    def frames(self, request: Request) -> Response:
        """WADO-RS frames: ``.../instances/{sop}/frames/1,2,...``, as stored or, when
        the client takes only uncompressed frames, decoded."""
        def reader(params: dict[str, str]) -> tuple[PixelReader, bool]:
            numbers = wado.parse_frame_list(params["frames"])

            def read(fp: IO[bytes], syntax: str) -> Iterator[bytes]:
                frames = bulkdata.Frames(fp)
                frames.check(numbers)
                if syntax == frames.transfer_syntax:
                    return (frames.read(n) for n in numbers)
                return (frames.uncompressed(n) for n in numbers)
            return read, True
        return self._pixels(request, reader, decodes=True)

    def bulkdata(self, request: Request) -> Response:
        """WADO-RS bulk data: the values the metadata's BulkDataURIs name, as stored."""
        def reader(params: dict[str, str]) -> tuple[PixelReader, bool]:
            path = bulkdata.parse_path(params["path"])

            def read(fp: IO[bytes], syntax: str) -> Iterator[bytes]:
                return iter(bulkdata.read_bulk(fp, path).parts)
            return read, path == (bulkdata.PIXEL_TAGS[0],)
        return self._pixels(request, reader, decodes=False)

    def rendered(self, request: Request) -> Response:
        """WADO-RS rendered: an instance's frames (or those listed) as JPEG / PNG, one
        image alone, several as multipart/related."""
        return self._render(request, thumbnail=False)

    def thumbnail(self, request: Request) -> Response:
        """WADO-RS thumbnail: one small image of a study, series, instance or frame
        (of a study or series: its middle instance's first frame)."""
        return self._render(request, thumbnail=True)

    def _render(self, request: Request, thumbnail: bool) -> Response:
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, RETRIEVE, "WADO-RS", started)
        try:
            level, ident = self.target(request)
            media = negotiation.rendered_media(request.headers.get("accept"),
                                               rendering.MEDIA_TYPES)
            try:
                numbers = wado.parse_frame_list(request.path_params["frames"]) \
                    if "frames" in request.path_params else None
                options = rendering.parse_options(dict(request.query_params), media,
                                                  thumbnail)
            except ValueError as exc:
                raise HttpError(400, str(exc)) from None
            if thumbnail and numbers is not None and len(numbers) > 1:
                raise HttpError(400, "a thumbnail is of one frame")
            self.available()
            # a study's or series' thumbnail shows one of its images, not a report
            choose = wado.images if thumbnail and level != IMAGE else wado.items
            selected = self.database(lambda: choose(
                self.context.finder, level, ident, caller.decision.instance_filter()))
            if not selected:
                raise HttpError(404, f"no such {_NAMES[level]}" if choose is wado.items
                                else f"no image in this {_NAMES[level]}")

            def read(fp: IO[bytes]) -> tuple[str, Iterator[bytes]]:
                frames = bulkdata.Frames(fp)
                wanted = numbers or ([1] if thumbnail else list(range(1, frames.count + 1)))
                frames.check(wanted)
                return "", (rendering.render(frames, n, options) for n in wanted)
            _, images = self.database(
                lambda: self._read(selected[len(selected) // 2], read))
        except HttpError as exc:
            self.audit(caller, "WADO-RS", exc.status, started, text, exc.message)
            raise
        self.audit(caller, "WADO-RS", 200, started, text, counts={"instances": 1})
        log.info("WADO-RS %s %s -> 200", caller.describe(), request.url.path)
        first = next(images)
        rest = list(itertools.islice(images, 1)) if not thumbnail else []
        if not rest:
            return Response(first, 200, media_type=media)
        boundary = multipart.new_boundary()
        return StreamingResponse(
            wado.parts_body(itertools.chain((first,), rest, images), media, None, boundary),
            media_type=f'multipart/related; type="{media}"; boundary={boundary}')

    def _pixels(self, request: Request,
                reader: Callable[[dict[str, str]], tuple[PixelReader, bool]],
                decodes: bool) -> Response:
        """Frames or a bulk value of one instance the caller may retrieve: 400 for a
        malformed request, 404 for what is hidden or absent, 406 when the Accept header
        refuses what is stored and (``decodes``) its decoding too."""
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, RETRIEVE, "WADO-RS", started)
        try:
            level, ident = self.target(request)
            try:
                read, pixel_data = reader(request.path_params)
            except ValueError as exc:
                raise HttpError(400, str(exc)) from None
            self.available()
            selected = self.database(lambda: wado.items(
                self.context.finder, level, ident, caller.decision.instance_filter()))
            if not selected:
                raise HttpError(404, "no such instance")
            item = selected[0]
            stored = UID(item.transfer_syntax or ExplicitVRLittleEndian)
            compressed = pixel_data and stored.is_encapsulated
            media, syntax = negotiation.frame_representation(
                request.headers.get("accept"), stored if compressed else ExplicitVRLittleEndian,
                decodable=compressed and decodes and transcode.decodable(stored))
            _, parts = self.database(lambda: self._read(
                item, lambda fp: (syntax, read(fp, syntax))))
        except HttpError as exc:
            self.audit(caller, "WADO-RS", exc.status, started, text, exc.message)
            raise
        self.audit(caller, "WADO-RS", 200, started, text, counts={"instances": 1})
        log.info("WADO-RS %s %s -> 200", caller.describe(), request.url.path)
        boundary = multipart.new_boundary()
        return StreamingResponse(
            wado.parts_body(parts, media, syntax, boundary),
            media_type=f'multipart/related; type="{media}"; boundary={boundary}')

    def _read(self, item: wado.Item, read: Reader) -> tuple[str, Iterator[bytes]]:
        """Open the stored file and read the first part of the answer: 404 for what the
        file lacks, 500 for a file that is not what its header says (one log line, not
        a traceback), both before the response starts."""
        try:
            syntax, parts = read(self.context.archive.files.open(item.file_id))
            first = next(parts, None)
        except bulkdata.NotFound as exc:
            raise HttpError(404, str(exc)) from None
        except FileNotFoundError as exc:
            log.error("WADO-RS: %s: %s", item.sop, exc)
            raise HttpError(500, "the stored file of this instance is missing") from None
        except (rendering.CannotRender, transcode.Undecodable) as exc:
            log.error("WADO-RS: %s: %s", item.sop, exc)
            raise HttpError(500, str(exc)) from None
        except (ValueError, EOFError, struct.error) as exc:
            log.error("WADO-RS: %s: cannot read: %s", item.sop, exc)
            raise HttpError(500, f"the stored instance cannot be read: {exc}"[:300]
                            ) from None
        return syntax, itertools.chain(() if first is None else (first,), parts)

    def database(self, call: Callable[[], Any], during: str = "operation") -> Any:
        """``call()``; a database failure becomes 503, and the health monitor hears
        of it (work the journal finishes later says so, naming what it was ``during``)."""
        try:
            return call()
        except PyMongoError as exc:
            raise self.unavailable(exc, during) from None
        except Unfinished as exc:
            self.context.health.suspect(exc.__cause__ or exc)
            raise HttpError(503, f"database failed during the {during}: it is finished "
                            "when the database answers again", {"Retry-After": "5"}
                            ) from None

    # -- DELETE -----------------------------------------------------------------------

    def delete(self, request: Request) -> Response:
        """``DELETE`` on a study, series or instance: 204 No Content once its instances
        (those the caller's Delete rules match) are deleted, as dcm4chee answers; 404
        when it names none she may delete (nonexistent and hidden alike); 409 when the
        only ones are being stored right now."""
        started = time.perf_counter()
        text = _request_text(request)
        caller = self.caller(request, DELETE, "DELETE", started)
        try:
            level, ident = self.target(request)
            selection = self.delete_resource(caller, level, ident)
        except HttpError as exc:
            self.audit(caller, "DELETE", exc.status, started, text, exc.message)
            raise
        counts = selection.counts()
        self.audit(caller, "DELETE", 204, started, text, counts=counts)
        log.info("DELETE %s %s -> 204, %d instances", caller.describe(), request.url.path,
                 counts["instances"])
        return Response(status_code=204)

    def delete_resource(self, caller: Caller, level: str, ident: Any) -> Selection:
        """Delete what a resource's unique keys name, of what the caller's Delete rules
        let her delete (the console's delete too); what was deleted.  HttpError 404
        (nothing she may delete: nonexistent and hidden alike), 409, 503."""
        self.available()
        done = self.database(lambda: self.context.delete_as(caller.decision, level, ident),
                             "delete")
        if done.stopping:
            raise HttpError(503, "archive is shutting down", {"Retry-After": "5"})
        return self.deleting(done.selection, level)

    @staticmethod
    def deleting(selection: Selection, level: str) -> Selection:
        """The selection of a delete, or HttpError 404 (none: nonexistent and hidden
        alike) or 409 (only instances being stored right now)."""
        if not selection.instances:
            if selection.in_flight:
                raise HttpError(409, f"this {_NAMES[level]} is being stored right now: "
                                "retry when the store is done")
            raise HttpError(404, f"no such {_NAMES[level]}")
        return selection

    # -- STOW-RS ----------------------------------------------------------------------

    async def store(self, request: Request) -> Response:
        started = time.perf_counter()
        caller = await run_in_threadpool(self.caller, request, STORE, "STOW-RS", started)
        try:
            study = request.path_params.get("study")
            if study is not None:
                check_uid(study, "study")
            boundary = _stow_boundary(request.headers.get("content-type", ""))
            negotiation.json_accepted(request.headers.get("accept"))
            self.available()
            results = await self._receive(request, caller, boundary, study)
        except HttpError as exc:
            await run_in_threadpool(self.audit, caller, "STOW-RS", exc.status, started,
                                    _request_text(request), exc.message)
            raise
        status = stow.status_code(results)
        body = stow.response(results, self.base_url(request), study)
        stored = sum(r.ok for r in results)
        log.info("STOW-RS %s %s -> %d, %d of %d instances stored (%.1f ms)",
                 caller.describe(), request.url.path, status, stored, len(results),
                 (time.perf_counter() - started) * 1000)
        return Response(json.dumps(body, separators=(",", ":")).encode(), status,
                        media_type=negotiation.DICOM_JSON)

    async def _receive(self, request: Request, caller: Caller, boundary: str,
                       study: str | None) -> list[stow.Result]:
        """Parse the body as it arrives; store each part when it is whole."""
        cfg = self.context.cfg
        folder, limit = Path(cfg.receive.folder), cfg.receive.in_memory_max_bytes
        parser = multipart.Parser(boundary)
        results: list[stow.Result] = []
        state: dict[str, Any] = {"spool": None, "refused": None}

        async def handle(event: multipart.Event) -> None:
            if isinstance(event, multipart.PartStart):
                kind = multipart.MediaType.parse(
                    event.headers.get("content-type", negotiation.DICOM))
                if kind.type == negotiation.DICOM:
                    state["spool"] = stow.Spool(folder, limit)
                else:
                    state["refused"] = stow.not_dicom(kind.type)
            elif isinstance(event, multipart.PartData):
                spool = state["spool"]
                if spool is None:
                    return
                if spool.size + len(event.data) > limit:  # to the file: off the loop
                    await run_in_threadpool(spool.write, event.data)
                else:
                    spool.write(event.data)
            else:
                spool, refused = state["spool"], state["refused"]
                state["spool"] = state["refused"] = None
                if spool is not None:
                    result = await run_in_threadpool(self._store_part, caller, spool, study)
                else:
                    result = refused
                    await run_in_threadpool(self.audit_part, caller, result,
                                            time.perf_counter())
                results.append(result)

        try:
            async for chunk in request.stream():
                for event in parser.feed(chunk):
                    await handle(event)
            for event in parser.close():
                await handle(event)
        except multipart.MultipartError as exc:
            raise HttpError(400, f"malformed multipart body: {exc}" + (
                f" ({len(results)} parts before it were processed)" if results else "")
                            ) from None
        except ClientDisconnect:
            raise HttpError(400, "the client went away before the end of the body") from None
        finally:
            spool = state["spool"]
            if spool is not None:
                await run_in_threadpool(spool.discard)
        if not results:
            raise HttpError(400, "the multipart body has no part")
        return results

    def _store_part(self, caller: Caller, spool: stow.Spool, study: str | None
                    ) -> stow.Result:
        """Store one received part, delete its spool, audit (in a worker thread: the
        store and the audit queue may block)."""
        started = time.perf_counter()
        try:
            result = stow.store(self.context, caller.decision, spool.part10(), study)
        finally:
            spool.discard()
        self.audit_part(caller, result, started)
        return result

    def audit_part(self, caller: Caller, result: stow.Result, started: float,
                   event: str = "STOW-RS") -> None:
        """One entry per instance, as C-STORE writes them (and REJECT for a rejection
        note applied)."""
        level = logging.INFO if result.ok else logging.WARNING
        log.log(level, "%s %s sop=%s -> 0x%04X%s", event, caller.describe(),
                result.sop_instance or "?", result.status,
                f" {result.comment}" if result.comment else "")
        decision = caller.decision
        rule = result.rule if result.status != NOT_AUTHORIZED else None
        entry = operation_entry(
            caller.peer, event, caller.principal.name, decision.service,
            allowed=result.status != NOT_AUTHORIZED, status=result.status,
            request=result.sop_instance, rule=rule.index if rule is not None else None,
            restricted=decision.restricted, comment=result.comment, started=started)
        self.context.audit.record(entry)
        if result.rejection is not None:
            self.context.audit.record(rejection_entry(caller.peer, caller.principal.name,
                                                      result.rejection, started))


#: Reads an answer out of a stored file: its transfer syntax and its parts.
Reader = Callable[[IO[bytes]], tuple[str, Iterator[bytes]]]
#: Reads frames or a bulk value out of a stored file, in the transfer syntax given.
PixelReader = Callable[[IO[bytes], str], Iterator[bytes]]

_NAMES = {"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}


def _request_text(request: Request) -> str:
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{request.method} {request.url.path}{query}"[:256]


def _stow_boundary(content_type: str) -> str:
    """The boundary of a STOW-RS body; 415 for another media type, 400 if malformed."""
    media = multipart.MediaType.parse(content_type)
    if media.type != "multipart/related":
        raise HttpError(415, 'STOW-RS takes multipart/related; type="application/dicom" '
                        f"(got {media.type or 'no Content-Type'!r})")
    kind = media.params.get("type", "").lower()
    if kind != negotiation.DICOM:
        raise HttpError(415, 'STOW-RS takes parts of type "application/dicom" only (got '
                        f"type={kind or 'none'!r}; metadata and bulk data parts are not "
                        "supported yet)")
    try:
        return multipart.boundary_of(content_type)
    except multipart.MultipartError as exc:
        raise HttpError(400, str(exc)) from None


class RejectPathTricks:
    """ASGI middleware: a path with an encoded slash or backslash, or a dot segment, is
    refused (400) before routing; decoded, it would name another resource."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope.get("path", "").encode()
            lowered = raw.lower()
            segments = raw.split(b"?", 1)[0].split(b"/")
            if b"%2f" in lowered or b"%5c" in lowered or b"%00" in lowered or any(
                    s in (b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e.")
                    for s in (seg.lower() for seg in segments)):
                message = "path with an encoded slash, backslash or NUL, or a dot segment"
                if raw.startswith(FHIR_PATH.encode() + b"/"):
                    response = _fhir_response(fhir.outcome(400, message), 400)
                else:
                    response = Response(f"{message}: not a DICOMweb resource", 400,
                                        media_type="text/plain")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _fhir_response(body: dict[str, Any], status: int, pretty: bool = False) -> Response:
    text = json.dumps(body, ensure_ascii=False, indent=2 if pretty else None,
                      separators=None if pretty else (",", ":"))
    return Response(text.encode("utf-8"), status, media_type=fhir.CONTENT_TYPE)


def _fhir_parameters(request: Request,
                     parse: Callable[[list[tuple[str, str]]], fhir.StudySearch]
                     ) -> fhir.StudySearch:
    """The parameters parsed (400 for bad ones, 406 for ``_format`` other than JSON),
    and ``Accept`` checked unless ``_format`` overrides it (406)."""
    params = request.query_params.multi_items()
    try:
        search = parse(params)
    except fhir.BadSearch as exc:
        raise HttpError(400, str(exc)) from None
    except fhir.NotJson as exc:
        raise HttpError(406, str(exc)) from None
    if not any(name == "_format" for name, _ in params) and \
            not fhir.json_accepted(request.headers.get("accept")):
        raise HttpError(406, "only application/fhir+json is served")
    return search


def _is_fhir(request: Request) -> bool:
    path = request.url.path
    return path == FHIR_PATH or path.startswith(FHIR_PATH + "/")


def _failure(request: Request, status: int, message: str,
             headers: dict[str, str] | None = None) -> Response:
    """Text for DICOMweb, an OperationOutcome for FHIR."""
    if _is_fhir(request):
        response = _fhir_response(fhir.outcome(status, message), status)
        response.headers.update(headers or {})
        return response
    return Response(message + "\n", status, headers,
                    media_type="text/plain; charset=utf-8")


def _error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return _failure(request, exc.status, exc.message, exc.headers)


def _routing_error(request: Request, exc: Exception) -> Response:
    """No such route (404) or method (405)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return _failure(request, exc.status_code, exc.detail, exc.headers)


def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("%s %s: unexpected error", request.method, request.url.path,
                  exc_info=exc)
    return _failure(request, 500, f"internal error: {type(exc).__name__}")


def create_app(context: Context,
               pages: Callable[[Service], list[BaseRoute]] | None = None) -> Starlette:
    """The ASGI application serving DICOMweb under :data:`BASE_PATH`, FHIR under
    :data:`FHIR_PATH`, and beside them the routes ``pages`` gives over the same service
    (the web console)."""
    service = Service(context)

    def qido_route(path: str, level: str) -> Route:
        def endpoint(request: Request) -> Response:
            return service.search(request, level)
        return Route(path, endpoint, methods=["GET"])

    routes = [
        qido_route("/studies", "STUDY"),
        qido_route("/series", "SERIES"),
        qido_route("/instances", "IMAGE"),
        qido_route("/studies/{study}/series", "SERIES"),
        qido_route("/studies/{study}/instances", "IMAGE"),
        qido_route("/studies/{study}/series/{series}/instances", "IMAGE"),
        Route("/studies", service.store, methods=["POST"]),
        Route("/studies/{study}", service.retrieve, methods=["GET"]),
        Route("/studies/{study}", service.store, methods=["POST"]),
        Route("/studies/{study}", service.delete, methods=["DELETE"]),
        Route("/studies/{study}/series/{series}", service.delete, methods=["DELETE"]),
        Route("/studies/{study}/series/{series}/instances/{instance}", service.delete,
              methods=["DELETE"]),
        Route("/studies/{study}/metadata", service.metadata, methods=["GET"]),
        Route("/studies/{study}/series/{series}", service.retrieve, methods=["GET"]),
        Route("/studies/{study}/series/{series}/metadata", service.metadata, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}", service.retrieve,
              methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}/metadata",
              service.metadata, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
              service.frames, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path:path}",
              service.bulkdata, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}/rendered",
              service.rendered, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"
              "/rendered", service.rendered, methods=["GET"]),
        Route("/studies/{study}/thumbnail", service.thumbnail, methods=["GET"]),
        Route("/studies/{study}/series/{series}/thumbnail", service.thumbnail,
              methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}/thumbnail",
              service.thumbnail, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"
              "/thumbnail", service.thumbnail, methods=["GET"]),
    ]
    fhir_routes = [
        Route("/ImagingStudy", service.fhir_search, methods=["GET"]),
        Route("/ImagingStudy/{id}", service.fhir_read, methods=["GET"]),
        Route("/Patient/{id}", service.fhir_patient, methods=["GET"]),
        Route("/metadata", service.fhir_metadata, methods=["GET"]),
    ]
    app = Starlette(routes=[Mount(BASE_PATH, routes=routes), Mount(FHIR_PATH, routes=fhir_routes),
                            *(pages(service) if pages is not None else [])],
                    exception_handlers={HttpError: _error_response,
                                        HTTPException: _routing_error, Exception: _unexpected})
    app.add_middleware(RejectPathTricks)
    cors = getattr(getattr(context.cfg, "http", None), "cors", None)
    if cors is not None and cors.allow_origins:  # outermost: preflights never reach auth
        app.add_middleware(CORSMiddleware,  # browsers send scheme and host in lower case
                           allow_origins=[origin.lower() for origin in cors.allow_origins],
                           allow_credentials=cors.allow_credentials,
                           allow_methods=CORS_METHODS, allow_headers=CORS_REQUEST_HEADERS,
                           expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
    app.state.service = service
    return app
