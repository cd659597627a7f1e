"""The console's corrections: **Correct…** on a study or series page, a study's
**History** of corrections and **Restore originals**.

The same core as ``archive modify`` (:meth:`archive.context.Context.modify_as` over
:mod:`archive.modification`): each stored file rewritten with the new values, the
original kept and listed in the instance's history, a new PatientID moving the study
to that patient (taking its attributes when it exists).  Audited as event ``MODIFY``.

**Who.**  Only a principal with a ``Modify`` rule *without pattern*: she sees the
buttons, the forms, the history (whose old values may name another patient) and may
restore.  A pattern-restricted Modify rule gives no button and a 403: whether
corrected data must still match her patterns, or whether adopting an existing
patient's attributes may show her a patient she cannot see, is not decided, so she
corrects nothing here.

**Steps.**  The form (prefilled with the resource's values, and a reason) POSTs a
review; the review page lists what changes, for how many instances, and POSTs the
correction.  Both POSTs are taken from this site's pages only (:func:`admin.same_origin`),
so the values never travel in a URL.  A value the archive refuses (a date that is no
date, a value of the wrong form) is answered 400 on the form, with the reason.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from acl.rules import MODIFY
from archive.context import Corrected
from archive.model import SERIES, STUDY
from archive.modification import HISTORY, changed_patient
from archive.rewrite import BadChange, parse_change
from archive.web.app import Caller, check_uid
from archive.web.console.admin import Console, same_origin
from archive.web.console.values import text
from archive.web.errors import HttpError

#: What the form corrects at each level: (keyword, label).
FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    STUDY: (("PatientID", "Patient ID"), ("PatientName", "Patient name"),
            ("PatientBirthDate", "Birth date"), ("PatientSex", "Sex"),
            ("StudyDescription", "Study description"),
            ("AccessionNumber", "Accession number"),
            ("ReferringPhysicianName", "Referring physician"),
            ("StudyDate", "Study date"), ("StudyTime", "Study time")),
    SERIES: (("SeriesDescription", "Series description"),),
}
_DATES = frozenset({"PatientBirthDate", "StudyDate"})
#: Longest reason kept (the audit entry and the history carry it).
MAX_REASON = 200
#: A form is a few short fields: more is refused before it is parsed.
MAX_FORM, MAX_FIELDS = 16 * 1024, 32


def shown(keyword: str, value: str) -> str:
    """A stored value as the form shows it: dates as YYYY-MM-DD."""
    if keyword in _DATES and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def changes_of(level: str, form: dict[str, str], current: dict[str, str]
               ) -> dict[int, DataElement]:
    """The corrections a submitted form asks for: each field whose value differs from
    the resource's (dates typed YYYY-MM-DD or YYYYMMDD).  Raises BadChange (one line,
    naming the field) for a value the archive refuses."""
    changes: dict[int, DataElement] = {}
    for keyword, _ in FIELDS[level]:
        if keyword not in form:
            continue
        value = form[keyword].strip()
        if keyword in _DATES and len(value) == 10 and value[4] == value[7] == "-":
            value = value.replace("-", "")
        if value == current.get(keyword, ""):
            continue
        if "\n" in value or "\r" in value:
            raise BadChange(f"{keyword}: one line of text")
        elem = parse_change(f"{keyword}={value}")
        changes[elem.tag] = elem
    return changes


class Corrections:
    """The correction pages of one console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.service = console.service
        self.context = console.context

    def allowed(self, principal: str) -> bool:
        """A Modify rule without pattern (acl decision), as for the Admin pages."""
        decision = self.context.authorize(principal, MODIFY)
        return decision.allowed and not decision.restricted

    def links(self, caller: Caller, path: str, level: str) -> dict[str, str]:
        """The page's Correct… (and, on a study page with corrections, History)
        links, for a principal who corrects; none for anyone else."""
        if not self.allowed(caller.principal.name):
            return {"correct": "", "history": ""}
        links = {"correct": f"{path}/correct", "history": ""}
        if level == STUDY:
            study = path.rsplit("/", 1)[1]
            if self.service.database(lambda: self.context.archive.instances.find_one(
                    {"StudyInstanceUID": study, HISTORY: {"$exists": True}}, {"_id": 1})):
                links["history"] = f"{path}/history"
        return links

    # -- the frame --------------------------------------------------------------------

    def _modify_page(self, request: Request, render: Callable[[Caller], Response],
                     post: bool = False) -> Response:
        def checked(caller: Caller) -> Response:
            if caller.decision.restricted:
                raise HttpError(403, f"not authorized: the Modify rules of "
                                f"{caller.principal.name} have patterns: corrections take "
                                "a Modify rule without pattern")
            if post and not same_origin(request, self.service.public_url):
                raise HttpError(403, "refused: a correction is confirmed from this site's "
                                "own page (cross-site request)")
            return render(caller)
        return self.console._page(request, MODIFY, checked)

    def _current(self, caller: Caller, request: Request, level: str) -> dict[str, str]:
        """The resource's values the form shows (404 when there is none)."""
        params = request.path_params
        study = check_uid(params["study"], "study")
        if level == STUDY:
            found = self.console._study(caller, study)
        else:
            series = check_uid(params["series"], "series")
            answers, _ = self.console._find(caller, SERIES, [
                ("SeriesInstanceUID", series), ("includefield", "SeriesDescription")],
                {"StudyInstanceUID": study})
            if not answers:
                raise HttpError(404, "no such series")
            found = answers[0]
        return {keyword: text(found, keyword) for keyword, _ in FIELDS[level]}

    def _values(self, level: str, current: dict[str, str], study: dict[str, str],
                form: dict[str, str] | None = None) -> dict[str, Any]:
        return {"level": "study" if level == STUDY else "series",
                "fields": [{"keyword": k, "label": label, "value": shown(k, (
                    form if form is not None else current).get(k, current.get(k, "")))}
                           for k, label in FIELDS[level]],
                "study": study}

    # -- correcting -------------------------------------------------------------------

    def form(self, request: Request) -> Response:
        """The form, prefilled with the resource's values."""
        def render(caller: Caller) -> Response:
            level = self._level(request)
            current = self._current(caller, request, level)
            return self.console._html(
                "correct.html", caller, headers={"Referrer-Policy": "same-origin"},
                step="form", error="", reason="", action=request.url.path,
                back=_back(request.url.path), changes=[], counts={}, moving=None,
                **self._values(level, current, self._study_line(caller, request)))
        return self._modify_page(request, render)

    async def submit(self, request: Request) -> Response:
        """The form's POST: ``step=review`` shows what would change, ``step=apply``
        (the review's button) corrects."""
        started = time.perf_counter()
        form, problem = await read_form(request)

        def render(caller: Caller) -> Response:
            if problem is not None:
                raise problem
            return self._submitted(caller, request, form, started)
        return await run_in_threadpool(self._modify_page, request, render, True)

    def _submitted(self, caller: Caller, request: Request, form: dict[str, str],
                   started: float) -> Response:
        level = self._level(request)
        current = self._current(caller, request, level)
        reason = form.get("reason", "").strip()[:MAX_REASON]
        study_line = self._study_line(caller, request)
        values = {"reason": reason, "action": request.url.path,
                  "back": _back(request.url.path), "changes": [], "counts": {},
                  "moving": None, "error": ""}
        try:
            changes = changes_of(level, form, current)
            if not changes:
                raise BadChange("nothing to correct: every value is as stored")
        except BadChange as exc:
            return self.console._html(
                "correct.html", caller, 400, {"Referrer-Policy": "same-origin"},
                **{**values, "step": "form", "error": str(exc)},
                **self._values(level, current, study_line, form))
        _, ident = self.service.target(request)
        self.service.available()
        if form.get("step") != "apply":
            planned = self.service.database(lambda: self.context.correction(
                self.context.correctable(caller.decision, level, ident), changes))
            return self._review(caller, level, planned, current, changes, values,
                                study_line)
        try:
            done = self.service.database(lambda: self.context.modify_as(
                caller.decision, level, ident, changes, reason,
                f"{self.context.cfg.ae_title} console"), "correction")
        except BadChange as exc:
            return self.console._html(
                "correct.html", caller, 400, {"Referrer-Policy": "same-origin"},
                **{**values, "step": "form", "error": str(exc)},
                **self._values(level, current, study_line, form))
        self._settled(done, level)
        request_text = f"POST {request.url.path} " + " ".join(
            f"{keyword_for_tag(t)}={e.value}" for t, e in sorted(changes.items())) + (
            f" reason={reason}" if reason else "")
        self.service.audit(caller, "MODIFY", 200, started, request_text[:256],
                           counts={"instances": done.done})
        return self.console._html("corrected.html", caller, verb="Corrected",
                                  done=done.done, unchanged=done.unchanged, left=done.left,
                                  back=_back(request.url.path))

    def _review(self, caller: Caller, level: str, planned: Corrected,
                current: dict[str, str], changes: dict[int, DataElement],
                values: dict[str, Any], study_line: dict[str, str] | None) -> Response:
        self._settled(planned, level)
        listed = [{"keyword": keyword_for_tag(tag), "old": shown(keyword_for_tag(tag),
                   current.get(keyword_for_tag(tag), "")),
                   "new": shown(keyword_for_tag(tag), str(elem.value))}
                  for tag, elem in _in_form_order(level, changes)]
        moving = None
        patient = changed_patient(changes)
        if patient is not None:
            adopted = [{"keyword": keyword_for_tag(tag) or f"{tag:08X}",
                        "new": "(removed)" if elem is None else (
                            f"({len(elem.value)} items)" if elem.VR == "SQ"
                            else shown(keyword_for_tag(tag), str(elem.value)))}
                       for tag, elem in sorted(planned.changes.items()) if tag not in changes]
            moving = {"patient": patient, "existing": bool(adopted), "adopted": adopted}
        return self.console._html(
            "correct.html", caller, headers={"Referrer-Policy": "same-origin"},
            **{**values, "step": "review", "changes": listed,
               "counts": planned.selection.counts(), "moving": moving},
            **self._values(level, current, study_line, {
                keyword_for_tag(t): str(e.value) for t, e in changes.items()}))

    @staticmethod
    def _settled(done: Corrected, level: str) -> None:
        """HttpError for a correction that cannot be (made)."""
        if done.stopping:
            raise HttpError(503, "archive is shutting down", {"Retry-After": "5"})
        if done.refusal:
            raise HttpError(409, done.refusal)
        if not done.selection.instances:
            if done.selection.in_flight:
                raise HttpError(409, f"this {_NAMES[level]} is being stored right now: "
                                "retry when the store is done")
            raise HttpError(404, f"no such {_NAMES[level]}")

    # -- history and restore ----------------------------------------------------------

    def history(self, request: Request) -> Response:
        """The corrections of a study's instances, one row per correction."""
        def render(caller: Caller) -> Response:
            return self._history_page(caller, request, "history")
        return self._modify_page(request, render)

    def confirm_restore(self, request: Request) -> Response:
        """What restoring the originals would do, and the button that does it."""
        def render(caller: Caller) -> Response:
            return self._history_page(caller, request, "restore")
        return self._modify_page(request, render)

    def _history_page(self, caller: Caller, request: Request, step: str) -> Response:
        study = check_uid(request.path_params["study"], "study")
        self.service.available()
        docs = self.service.database(lambda: list(self.context.archive.instances.find(
            {"StudyInstanceUID": study, HISTORY: {"$exists": True}},
            {HISTORY: 1, "SeriesInstanceUID": 1})))
        if not docs:
            self.console._study(caller, study)  # 404 when there is no such study
        path = f"/studies/{study}"
        return self.console._html(
            "history.html", caller, headers={"Referrer-Policy": "same-origin"}, step=step,
            rows=history_rows(docs), corrected=len(docs),
            series=len({d["SeriesInstanceUID"] for d in docs}), study_uid=study,
            study=self._study_line(caller, request), back=path,
            action=f"{path}/restore")

    def restore(self, request: Request) -> Response:
        """Restore the originals of the study's corrected instances (the confirmation
        page's form)."""
        started = time.perf_counter()

        def render(caller: Caller) -> Response:
            _, ident = self.service.target(request)
            self.service.available()
            done = self.service.database(lambda: self.context.restore_as(
                caller.decision, STUDY, ident), "restore")
            if done.stopping:
                raise HttpError(503, "archive is shutting down", {"Retry-After": "5"})
            if not done.selection.instances:
                raise HttpError(404, "no corrected instance in this study")
            self.service.audit(caller, "MODIFY", 200, started,
                               f"POST {request.url.path}"[:256],
                               counts={"instances": done.done})
            return self.console._html("corrected.html", caller, verb="Restored",
                                      done=done.done, unchanged=0, left=done.left,
                                      back=_back(request.url.path))
        return self._modify_page(request, render, post=True)

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _level(request: Request) -> str:
        return SERIES if "series" in request.path_params else STUDY

    def _study_line(self, caller: Caller, request: Request) -> dict[str, str] | None:
        return self.console.admin._visible_study(caller, request.path_params["study"])


_NAMES = {STUDY: "study", SERIES: "series"}


def _in_form_order(level: str, changes: dict[int, DataElement]
                   ) -> list[tuple[int, DataElement]]:
    order = [keyword for keyword, _ in FIELDS[level]]
    return sorted(changes.items(), key=lambda item: order.index(item[1].keyword))


def history_rows(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per correction (when, by whom, why, the old values) with the number of
    instances it changed, oldest first."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for doc in docs:
        for record in doc.get(HISTORY) or []:
            changed = record.get("changed") or {}
            key = (record.get("replaced_at"), record.get("by"), record.get("reason"),
                   tuple(sorted(changed.items(), key=lambda kv: kv[0])))
            row = rows.setdefault(key, {
                "when": _when(record.get("replaced_at")), "by": str(record.get("by") or ""),
                "reason": str(record.get("reason") or ""),
                "changed": [{"keyword": k, "old": "(absent)" if v is None else shown(k, v)}
                            for k, v in sorted(changed.items())], "instances": 0,
                "sort": str(record.get("replaced_at"))})
            row["instances"] += 1
    return sorted(rows.values(), key=lambda r: r["sort"])


def _when(moment: Any) -> str:
    if isinstance(moment, datetime.datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(moment or "")


def _back(path: str) -> str:
    """``/studies/1/correct`` -> ``/studies/1``."""
    return path.rsplit("/", 1)[0]


async def read_form(request: Request) -> tuple[dict[str, str], HttpError | None]:
    """The POSTed form (``application/x-www-form-urlencoded``), read up to
    :data:`MAX_FORM` bytes and :data:`MAX_FIELDS` fields; the HttpError it deserves
    otherwise, for the page to answer once it knows who asks (audited)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return {}, HttpError(413, f"form larger than {MAX_FORM} bytes")
    try:
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=MAX_FIELDS)
    except ValueError:
        return {}, HttpError(400, f"more than {MAX_FIELDS} form fields")
    return dict(pairs), None


def routes(corrections: Corrections) -> list[BaseRoute]:
    """The correction pages' routes."""
    study, series = "/studies/{study}", "/studies/{study}/series/{series}"
    return [
        *(Route(path + "/correct", endpoint, methods=[method])
          for path in (study, series)
          for method, endpoint in (("GET", corrections.form),
                                   ("POST", corrections.submit))),
        Route(study + "/history", corrections.history, methods=["GET"]),
        Route(study + "/restore", corrections.confirm_restore, methods=["GET"]),
        Route(study + "/restore", corrections.restore, methods=["POST"]),
    ]
