"""The console's administration: the rules in force, the audit trail, deleting.

**Who.**  The rules and audit pages, and everyone's recent activity on the dashboard,
are the ``Admin`` service (:data:`acl.rules.ADMIN`): given only by a rule naming it,
never by ``*``, and never restricted (``acl apply`` refuses a pattern on it; one
written into the database by hand denies).  Anyone else gets the 403 page every
refused service gets, and the pages are not in her menu.  Deleting is the ``Delete``
service, decided and carried out exactly as DICOMweb ``DELETE``
(:meth:`archive.web.app.Service.delete_resource`): only the instances the caller's
Delete rules match, a resource holding none answered 404 as a nonexistent one.

**Deleting from a browser** takes two steps: the button (shown to principals whose
Delete rules match something of the resource) opens a confirmation page naming what
would be deleted; its form POSTs to the same address.  The browser sends the Basic
login with any request to this site, a forged cross-site form included, so a POST is
taken only from a page of this site, as the browser tells: ``Sec-Fetch-Site:
same-origin`` (the browser's own header, which no page can set), or, from a browser
that does not send it, an ``Origin`` of this site (the ``Host`` it was sent to, or
``http.public_url``; the confirmation page's ``Referrer-Policy: same-origin`` makes the
browser send it, where the console's ``no-referrer`` would send ``null``).  Anything
else is refused 403 before anything is read.  Scripts delete with DICOMweb
``DELETE``, which a cross-site form cannot send.
"""

from __future__ import annotations

import copy
import datetime
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from acl import audit, review
from acl.cli import anyone_deletes, stored_problems, universal_warnings
from acl.patterns import describe
from acl.rules import ADMIN, DELETE, QUERY, Decision, Rule
from archive.context import Context
from archive.find import fields_read, projection
from archive.levels import HIERARCHY_PROJECTION
from archive.model import IMAGE, SERIES, STUDY
from archive.web.app import Caller, Service, check_uid
from archive.web.console.paging import page_number, page_size
from archive.web.errors import HttpError

#: Entries of each recent-activity list of the dashboard.
RECENT = 10
#: Instances of a study the rules page judges (beyond: said, not judged).
MAX_REVIEWED = 20_000
_LEVEL_NAMES = {STUDY: "study", SERIES: "series", IMAGE: "instance"}


class Console(Protocol):
    """What the admin pages use of the console (:class:`archive.web.console.pages.Console`):
    its frame of a page, its templates, its study lookup."""

    service: Service
    context: Context
    admin: Admin

    def _page(self, request: Request, service: str,
              render: Callable[[Caller], Response]) -> Response: ...

    def _html(self, template: str, caller: Caller | None, status: int = 200,
              headers: dict[str, str] | None = None, **values: Any) -> Response: ...

    def _study(self, caller: Caller, study: str) -> Any: ...


def same_origin(request: Request, public_url: str = "") -> bool:
    """Whether a POST comes from a page of this site (see the module docstring)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:  # set by the browser itself, never by a page
        return site == "same-origin"
    origin = request.headers.get("origin", "")
    if not origin or origin == "null":
        return False
    netloc = urlsplit(origin).netloc.lower()
    ours = {request.headers.get("host", "").lower()}
    if public_url:
        ours.add(urlsplit(public_url).netloc.lower())
    return netloc in ours - {""}


def entry_row(entry: dict[str, Any]) -> dict[str, Any]:
    """An audit entry as the cells of a row."""
    moment = entry.get("time")
    status = entry.get("status")
    verdict = ""
    if entry.get("kind") == "operation":
        verdict = "allowed" if entry.get("allowed") else "DENIED"
        if entry.get("allowed") and entry.get("restricted"):
            verdict = "allowed (restricted)"
    peer = entry.get("calling_ae") or ""
    address = entry.get("address") or ""
    return {
        "time": moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        if isinstance(moment, datetime.datetime) else str(moment or ""),
        "principal": str(entry.get("principal", "")),
        "peer": f"{peer}@{address}" if peer else str(address),
        "event": str(entry.get("event", "")),
        "service": str(entry.get("service", "")),
        "verdict": verdict,
        "status": (f"0x{status:04X}" if isinstance(status, int) else "") + (
            f" (HTTP {entry['http_status']})" if entry.get("http_status") else ""),
        "rule": entry.get("rule") or "",
        "request": str(entry.get("request", "")),
        "comment": str(entry.get("comment", "")),
        "counts": ", ".join(f"{k}={v}" for k, v in (entry.get("counts") or {}).items()),
        "failure": audit.is_failure(entry),
    }


def _rule_row(rule: Rule) -> dict[str, Any]:
    return {"index": rule.index, "principal": rule.principal, "service": rule.service,
            "pattern": describe(rule.pattern), "destinations": ", ".join(rule.destinations),
            "source": rule.source}


class Admin:
    """The admin pages of one console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.service = console.service
        self.context = console.context

    # -- who ----------------------------------------------------------------------------

    def allowed(self, principal: str) -> bool:
        """Whether ``principal`` may administer (an Admin rule without pattern)."""
        decision = self.context.authorize(principal, ADMIN)
        return decision.allowed and not decision.restricted

    def _admin_page(self, request: Request, render: Callable[[Caller], Response]
                    ) -> Response:
        def checked(caller: Caller) -> Response:
            if caller.decision.restricted:  # a pattern stored by hand: denied
                raise HttpError(403, caller.decision.comment())
            return render(caller)
        return self.console._page(request, ADMIN, checked)

    # -- the rules ----------------------------------------------------------------------

    def rules(self, request: Request) -> Response:
        """The rules in force, and who may do what to a study."""
        def render(caller: Caller) -> Response:
            query = request.query_params
            study = query.get("study", "").strip()[:64]
            user = query.get("user", "").strip()[:64]
            enabled = self.context.cfg.acl.enabled
            ruleset = self.context.rules.current() if enabled else None
            rules = list(ruleset.rules) if ruleset is not None else []
            values: dict[str, Any] = {
                "enabled": enabled, "ruleset": ruleset,
                "rules": [_rule_row(r) for r in rules],
                "warnings": stored_problems(rules) + universal_warnings(rules)
                + anyone_deletes(rules),
                "study": study, "check_user": user, "check": None, "error": "",
                "services": review.DATA_SERVICES, "others": review.OTHERS}
            if study:
                try:
                    values["check"] = self._check(rules, check_uid(study, "study"), user)
                except HttpError as exc:
                    if exc.status not in (400, 404):
                        raise
                    values["error"] = exc.message
                    return self.console._html("rules.html", caller, exc.status, **values)
            return self.console._html("rules.html", caller, **values)
        return self._admin_page(request, render)

    def _check(self, rules: list[Rule], study: str, user: str) -> dict[str, Any]:
        """Who may do what to the instances of ``study`` (``archive acl check`` of
        each instance, for each principal)."""
        if user and not all(" " <= c <= "~" or c > "\x9f" for c in user):
            raise HttpError(400, "user: not a principal name")
        self.service.available()
        read = set(HIERARCHY_PROJECTION)
        for rule in rules:
            if rule.compiled is not None:
                read |= fields_read(rule.compiled.filters[IMAGE])
        finder = self.context.finder

        def documents() -> list[dict[str, Any]]:
            if finder.barrier is not None:
                finder.barrier()
            return list(finder.collection(IMAGE).find(
                {"StudyInstanceUID": study}, projection(read)).limit(MAX_REVIEWED + 1))

        docs = self.service.database(documents)
        if not docs:
            raise HttpError(404, "no such study")
        cut = len(docs) > MAX_REVIEWED
        docs = docs[:MAX_REVIEWED]
        who = review.principals(rules, [user] if user else [])
        table = review.review(rules, docs, who) if self.context.cfg.acl.enabled else []
        return {"table": table, "instances": len(docs), "cut": cut,
                "series": len({d.get("SeriesInstanceUID") for d in docs}),
                "patients": sorted({str(d.get("PatientID", "")) for d in docs})}

    # -- the audit trail ----------------------------------------------------------------

    def audit(self, request: Request) -> Response:
        """Audit entries by user, operation, time span, failures; a page at a time."""
        def render(caller: Caller) -> Response:
            query = request.query_params
            form = {key: query.get(key, "").strip()[:64]
                    for key in ("user", "event", "since", "until")}
            form["failures"] = "1" if query.get("failures") else ""
            page = page_number(query.get("page"))
            per_page = page_size(query.get("limit"))
            if "limit" in query:
                form["limit"] = str(per_page)
            values: dict[str, Any] = {"form": form, "events": audit.EVENTS, "entries": [],
                                      "error": "", "page": page, "links": {},
                                      "first": (page - 1) * per_page}
            try:
                conditions = _audit_conditions(form)
            except HttpError as exc:
                values["error"] = exc.message
                return self.console._html("audit.html", caller, 400, **values)
            self.service.available()
            found = self.service.database(lambda: audit.search(
                self.context.db, **conditions, offset=(page - 1) * per_page,
                limit=per_page + 1))
            values["entries"] = [entry_row(e) for e in found[:per_page]]
            kept = {k: v for k, v in form.items() if v}
            if page > 1:
                values["links"]["previous"] = "?" + urlencode({**kept, "page": page - 1})
            if len(found) > per_page:
                values["links"]["next"] = "?" + urlencode({**kept, "page": page + 1})
            return self.console._html("audit.html", caller, **values)
        return self._admin_page(request, render)

    def recent(self, caller: Caller) -> dict[str, Any]:
        """The dashboard's recent associations and failures (:func:`acl.audit.recent`):
        everyone's for an administrator, else the caller's own only (the trail names
        what others asked for)."""
        everyone = self.allowed(caller.principal.name)
        user = None if everyone else caller.principal.name

        def read() -> dict[str, Any]:
            return {"associations": [entry_row(e) for e in audit.recent(
                        self.context.db, audit.ASSOCIATION, user, RECENT)],
                    "failures": [entry_row(e) for e in audit.recent(
                        self.context.db, audit.FAILURE, user, RECENT)]}
        return {"everyone": everyone, **self.service.database(read)}

    # -- deleting -----------------------------------------------------------------------

    def deletes_here(self, caller: Caller, level: str, ident: Any) -> Decision | None:
        """The caller's Delete decision when her Delete rules match some of the
        resource (what deleting and rejecting take); None for anyone else."""
        decision = self.context.authorize(caller.principal.name, DELETE)
        if not decision.allowed:
            return None
        if decision.restricted and not self.service.database(
                lambda: self.context.deletable(decision, level, ident)).instances:
            return None
        return decision

    def delete_url(self, caller: Caller, path: str, level: str, ident: Any) -> str:
        """The confirmation page of deleting the resource at ``path``, for a principal
        whose Delete rules match some of it; "" for anyone else."""
        return path + "/delete" if self.deletes_here(caller, level, ident) else ""

    def confirm(self, request: Request) -> Response:
        """What deleting the resource would delete, and the button that does it."""
        def render(caller: Caller) -> Response:
            level, ident = self.service.target(request)
            self.service.available()
            selection = self.service.deleting(self.service.database(
                lambda: self.context.deletable(caller.decision, level, ident)), level)
            return self.console._html(
                "delete.html", caller, headers={"Referrer-Policy": "same-origin"},
                level=_LEVEL_NAMES[level], counts=selection.counts(),
                study=self._visible_study(caller, request.path_params["study"]),
                uid=str(getattr(ident, _UNIQUE[level])), back=_parent(request.url.path),
                action=request.url.path)
        return self.console._page(request, DELETE, render)

    def delete(self, request: Request) -> Response:
        """Delete the resource (the confirmation page's form)."""
        started = time.perf_counter()

        def render(caller: Caller) -> Response:
            if not same_origin(request, self.service.public_url):
                raise HttpError(403, "refused: a delete is confirmed from this site's own "
                                "page (cross-site request)")
            level, ident = self.service.target(request)
            selection = self.service.delete_resource(caller, level, ident)
            counts = selection.counts()
            self.service.audit(caller, "DELETE", 204, started,
                               f"POST {request.url.path}"[:256], counts=counts)
            return self.console._html("deleted.html", caller, level=_LEVEL_NAMES[level],
                                      counts=counts,
                                      back=_parent(_parent(request.url.path)) or "/")
        return self.console._page(request, DELETE, render)

    def _visible_study(self, caller: Caller, study: str) -> dict[str, str] | None:
        """The study's patient and description if the caller may see them (Query)."""
        decision = self.context.authorize(caller.principal.name, QUERY)
        if not decision.allowed:
            return None
        seeing = copy.copy(caller)
        seeing.decision = decision
        try:
            found = self.console._study(seeing, study)
        except HttpError:
            return None
        return {keyword: str(found.get(keyword) or "")
                for keyword in ("PatientName", "PatientID", "StudyDescription")}


_UNIQUE = {STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID", IMAGE: "SOPInstanceUID"}


def _parent(path: str) -> str:
    """``/studies/1/series/2/delete`` (or ``/reject``) -> ``/studies/1/series/2`` ->
    ``/studies/1`` -> ``""``."""
    return path.rsplit("/", 1)[0] if path.endswith(("/delete", "/reject")) else \
        path.rsplit("/", 2)[0]


def _audit_conditions(form: dict[str, str]) -> dict[str, Any]:
    """The search of :func:`acl.audit.search` the form asks for; HttpError 400."""
    conditions: dict[str, Any] = {"user": form["user"] or None,
                                  "failures": bool(form["failures"])}
    if form["event"]:
        if form["event"] not in audit.EVENTS:
            raise HttpError(400, f"operation: one of {', '.join(audit.EVENTS)}")
        conditions["event"] = form["event"]
    for key, name in (("since", "from"), ("until", "to")):
        if form[key]:
            try:
                conditions[key] = audit.parse_since(form[key])
            except ValueError:
                raise HttpError(400, f"{name}: {form[key]!r} is neither a date/time "
                                "(2024-05-01T10:00, UTC) nor a duration back from now "
                                "(15m, 2h, 7d)") from None
    return conditions


def routes(console: Console) -> list[BaseRoute]:
    """The admin pages' routes (beside the console's)."""
    admin = console.admin
    return [
        Route("/rules", admin.rules, methods=["GET"]),
        Route("/audit", admin.audit, methods=["GET"]),
        *(Route(path + "/delete", endpoint, methods=[method])
          for path in ("/studies/{study}", "/studies/{study}/series/{series}",
                       "/studies/{study}/series/{series}/instances/{instance}")
          for method, endpoint in (("GET", admin.confirm), ("POST", admin.delete))),
    ]
