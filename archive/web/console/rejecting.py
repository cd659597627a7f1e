"""The console's rejection (IHE IOCM): rejecting a study, series or instance, and the
administrators' page of what was rejected, where it is purged.

**Rejecting** takes what sending a rejection note takes (:mod:`archive.rejection`): a
Store rule that admits the note and Delete rules matching something of the resource.
The **Reject…** button is shown to exactly those principals (the Delete side decided as
the delete button's, :meth:`~archive.web.console.admin.Admin.deletes_here`; a Store
rule with a pattern judged on the note itself).  Its confirmation page names the
reasons of CID 7011 and how many instances in how many series would be hidden; its
form POSTs (same-site only, as a delete) the reason, and the console makes the note
(:func:`archive.rejection.note_dataset`: the instances of the resource her Delete rules
match, no other) and stores it as a STOW-RS part is stored
(:func:`archive.web.stow.store`): the same rules, journal, statuses and audit entries
(the store, then ``REJECT``).  A refusal (the note's C-STORE status) is the page's
answer, with its reason.

**The Rejected page** (the ``Admin`` service, as the rules and audit pages) lists the
rejected instances a filter of C-FIND keys selects, as ``archive rejected list`` does
(:func:`acl.patterns.instance_selection`, :meth:`archive.rejection.Rejecter.select`).
**Purging** them (their documents and files, journaled, audited ``PURGE``) is for an
administrator who also has Delete rules, and takes what those match only; it is
confirmed on a page of its own, POSTed from this site only.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from acl.patterns import PatternError, instance_selection
from acl.rules import DELETE, NOT_AUTHORIZED, STORE, Decision, instance_document
from archive import rejection
from archive.dicomjson import from_json
from archive.model import IMAGE, SERIES, STUDY
from archive.web import stow
from archive.web.app import Caller
from archive.web.console.admin import Console, _parent, same_origin
from archive.web.console.paging import page_number, page_size
from archive.web.errors import HttpError

#: The Rejected page's filter: C-FIND keys, as ``archive rejected list KEY=VALUE``.
FILTER_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
               "Modality", "StudyDate")
#: Bytes of a form body read (a reason, or the few keys of a filter).
MAX_FORM = 8192
#: What the audit trail and the log call a note stored from the console.
SOURCE = "CONSOLE"
_LEVEL_NAMES = {STUDY: "study", SERIES: "series", IMAGE: "instance"}
#: The reasons, in the order the confirmation offers them.
REASONS = [(code, meaning) for (code, _), meaning in rejection.REASONS.items()]


async def _form(request: Request) -> list[tuple[str, str]] | HttpError:
    """The fields of a form POST (urlencoded; at most :data:`MAX_FORM` bytes), or the
    error the page answers (after who asks is known, so that it is audited)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return []
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return HttpError(413, "form too large")
    try:
        return parse_qsl(body.decode("utf-8", "replace"), max_num_fields=32)
    except ValueError:
        return HttpError(400, "form with too many fields")


def _fields(form: list[tuple[str, str]] | HttpError) -> list[tuple[str, str]]:
    if isinstance(form, HttpError):
        raise form
    return form


class Rejecting:
    """The rejection pages of one console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.service = console.service
        self.context = console.context

    # -- who ----------------------------------------------------------------------------

    def _selection(self, decision: Decision, level: str, ident: Any) -> list[dict[str, Any]]:
        return self.service.database(
            lambda: self.context.deletable(decision, level, ident)).instances

    def _note(self, level: str, ident: Any, instances: list[dict[str, Any]], code: str
              ) -> Dataset:
        """The note rejecting ``instances`` (of the resource's study)."""
        study = str(ident.StudyInstanceUID)

        def read() -> dict[str, Any] | None:
            return self.context.finder.collection(STUDY).find_one({"_id": study},
                                                                  {"dataset": 1})
        found = self.service.database(read)
        if found is None:
            raise HttpError(404, f"no such {_LEVEL_NAMES[level]}")
        return rejection.note_dataset(from_json(found.get("dataset") or {}), instances, code)

    def rejects_here(self, caller: Caller, level: str, ident: Any) -> bool:
        """Whether the caller may reject some of the resource: Delete rules matching
        some of it, and a Store rule admitting the note."""
        deletes = self.console.admin.deletes_here(caller, level, ident)
        store = self.context.authorize(caller.principal.name, STORE)
        if deletes is None or not store.allowed:
            return False
        if not store.restricted:
            return True
        instances = self._selection(deletes, level, ident)
        if not instances:
            return False
        note = self._note(level, ident, instances, next(iter(rejection.REASONS))[0])
        return store.deciding_rule(instance_document(note)) is not None

    def reject_url(self, caller: Caller, path: str, level: str, ident: Any) -> str:
        """The confirmation page of rejecting the resource at ``path``; "" for a
        principal who may not."""
        return path + "/reject" if self.rejects_here(caller, level, ident) else ""

    # -- rejecting ----------------------------------------------------------------------

    def _store_decision(self, caller: Caller) -> Decision:
        store = self.context.authorize(caller.principal.name, STORE)
        if not store.allowed:
            raise HttpError(403, store.comment())
        return store

    def confirm(self, request: Request) -> Response:
        """The reasons, what rejecting would hide, and the button that does it."""
        def render(caller: Caller) -> Response:
            self._store_decision(caller)
            level, ident = self.service.target(request)
            self.service.available()
            selection = self.service.deleting(self.service.database(
                lambda: self.context.deletable(caller.decision, level, ident)), level)
            admin = self.console.admin
            return self.console._html(
                "reject.html", caller, headers={"Referrer-Policy": "same-origin"},
                level=_LEVEL_NAMES[level], counts=selection.counts(), reasons=REASONS,
                study=admin._visible_study(caller, request.path_params["study"]),
                uid=str(getattr(ident, _UNIQUE[level])), back=_parent(request.url.path),
                action=request.url.path)
        return self.console._page(request, DELETE, render)

    async def reject(self, request: Request) -> Response:
        """Make the note and store it (the confirmation page's form)."""
        form = await _form(request)
        return await run_in_threadpool(self._reject, request, form)

    def _reject(self, request: Request, form: list[tuple[str, str]] | HttpError
                ) -> Response:
        def render(caller: Caller) -> Response:
            if not same_origin(request, self.service.public_url):
                raise HttpError(403, "refused: a rejection is confirmed from this site's "
                                "own page (cross-site request)")
            fields = dict(_fields(form))
            store = self._store_decision(caller)
            level, ident = self.service.target(request)
            code = fields.get("code", "")
            if (code, "DCM") not in rejection.REASONS:
                raise HttpError(400, "choose a reason (CID 7011)")
            self.service.available()
            selection = self.service.deleting(self.service.database(
                lambda: self.context.deletable(caller.decision, level, ident)), level)
            note = self._note(level, ident, selection.instances, code)
            started = time.perf_counter()
            result = stow.store(self.context, store, rejection.note_part10(note),
                                str(ident.StudyInstanceUID), SOURCE)
            storing = copy.copy(caller)
            storing.decision = store
            self.service.audit_part(storing, result, started, SOURCE)
            done = result.rejection
            values = {"level": _LEVEL_NAMES[level], "note": str(note.SOPInstanceUID),
                      "meaning": rejection.REASONS[(code, "DCM")],
                      "back": _parent(_parent(request.url.path)) or "/"}
            if not result.ok or done is None:
                return self.console._html(
                    "rejected_one.html", caller, 403 if result.status == NOT_AUTHORIZED else 409,
                    refused=f"0x{result.status:04X} {result.comment}", done=None, **values)
            return self.console._html("rejected_one.html", caller, refused="",
                                      done=done, **values)
        return self.console._page(request, DELETE, render)

    # -- the rejected instances ---------------------------------------------------------

    def _filter(self, pairs: list[tuple[str, str]]) -> tuple[dict[str, str], Any]:
        wanted = [(k, v.strip()[:64]) for k, v in pairs if k in FILTER_KEYS and v.strip()]
        try:
            return instance_selection(wanted)
        except PatternError as exc:
            raise HttpError(400, str(exc)) from None

    def _select(self, exact: Any) -> list[dict[str, Any]]:
        self.service.available()
        return self.service.database(lambda: self.context.archive.rejecter.select(exact))

    def _purges(self, caller: Caller) -> Decision | None:
        delete = self.context.authorize(caller.principal.name, DELETE)
        return delete if delete.allowed else None

    def listing(self, request: Request) -> Response:
        """The rejected instances a filter selects, a page at a time."""
        def render(caller: Caller) -> Response:
            query = request.query_params
            page = page_number(query.get("page"))
            per_page = page_size(query.get("limit"))
            form = {key: query.get(key, "").strip()[:64] for key in FILTER_KEYS}
            kept = {k: v for k, v in form.items() if v}
            values: dict[str, Any] = {"form": form, "keys": FILTER_KEYS, "rows": [],
                                      "error": "", "links": {}, "total": 0, "page": page,
                                      "first": (page - 1) * per_page,
                                      "purge": "", "studies": 0}
            try:
                _, exact = self._filter(list(query.multi_items()))
            except HttpError as exc:
                values["error"] = exc.message
                return self.console._html("rejected.html", caller, 400, **values)
            found = self._select(exact)
            first = (page - 1) * per_page
            values.update(rows=[rejection.listed(d) for d in found[first:first + per_page]],
                          total=len(found),
                          studies=len({d["StudyInstanceUID"] for d in found}))
            if "limit" in query:
                kept["limit"] = str(per_page)
            if page > 1:
                values["links"]["previous"] = "?" + urlencode({**kept, "page": page - 1})
            if first + per_page < len(found):
                values["links"]["next"] = "?" + urlencode({**kept, "page": page + 1})
            if found and self._purges(caller) is not None:
                chosen = {k: v for k, v in form.items() if v}
                values["purge"] = "/rejected/purge" + (
                    "?" + urlencode(chosen) if chosen else "")
            return self.console._html("rejected.html", caller, **values)
        return self.console.admin._admin_page(request, render)

    def _purgeable(self, caller: Caller, pairs: list[tuple[str, str]]
                   ) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """The filter asked and the rejected instances the caller may purge of it:
        what her Delete rules match (HttpError 403 without; 404: none)."""
        delete = self._purges(caller)
        if delete is None:
            raise HttpError(403, "purging takes a Delete rule")
        raw, exact = self._filter(pairs)
        restriction = delete.instance_filter()
        if restriction is not None:
            exact = restriction if exact is None else {"$and": [restriction, exact]}
        found = self._select(exact)
        if not found:
            raise HttpError(404, "no rejected instance matches")
        return raw, found

    def confirm_purge(self, request: Request) -> Response:
        """What purging would delete, and the button that does it."""
        def render(caller: Caller) -> Response:
            raw, found = self._purgeable(caller, list(request.query_params.multi_items()))
            return self.console._html(
                "purge.html", caller, headers={"Referrer-Policy": "same-origin"},
                keys=raw, instances=len(found),
                studies=len({d["StudyInstanceUID"] for d in found}),
                back="/rejected" + ("?" + urlencode(raw) if raw else ""))
        return self.console.admin._admin_page(request, render)

    async def purge(self, request: Request) -> Response:
        """Purge (the confirmation page's form)."""
        form = await _form(request)
        return await run_in_threadpool(self._purge, request, form)

    def _purge(self, request: Request, form: list[tuple[str, str]] | HttpError
               ) -> Response:
        started = time.perf_counter()

        def render(caller: Caller) -> Response:
            if not same_origin(request, self.service.public_url):
                raise HttpError(403, "refused: a purge is confirmed from this site's own "
                                "page (cross-site request)")
            raw, found = self._purgeable(caller, _fields(form))
            studies = len({d["StudyInstanceUID"] for d in found})
            request_text = "POST /rejected/purge " + (
                " ".join(f"{k}={v}" for k, v in raw.items()) or "(all)")
            try:
                purged = self.service.database(
                    lambda: self.context.archive.rejecter.purge(found))
            except HttpError as exc:
                self.service.audit(caller, "PURGE", exc.status, started, request_text[:256],
                                   "purge interrupted: the journal finishes it")
                raise
            counts = {"instances": purged, "studies": studies}
            self.service.audit(caller, "PURGE", 200, started, request_text[:256],
                               counts=counts)
            return self.console._html("purged.html", caller, counts=counts)
        return self.console.admin._admin_page(request, render)


_UNIQUE = {STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID", IMAGE: "SOPInstanceUID"}


def routes(rejecting: Rejecting) -> list[BaseRoute]:
    """The rejection pages' routes (beside the console's)."""
    endpoints: list[tuple[str, Callable[..., Any]]] = [("GET", rejecting.confirm),
                                                       ("POST", rejecting.reject)]
    return [
        Route("/rejected", rejecting.listing, methods=["GET"]),
        Route("/rejected/purge", rejecting.confirm_purge, methods=["GET"]),
        Route("/rejected/purge", rejecting.purge, methods=["POST"]),
        *(Route(path + "/reject", endpoint, methods=[method])
          for path in ("/studies/{study}", "/studies/{study}/series/{series}",
                       "/studies/{study}/series/{series}/instances/{instance}")
          for method, endpoint in endpoints),
    ]

