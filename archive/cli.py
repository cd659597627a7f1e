"""The command line: ``archive COMMAND`` (also ``python -m archive COMMAND``).

Conventions, as DCMTK's and Orthanc's tools: exit status 0 when everything asked was
done, 1 when something failed (a file not stored, a problem found, a request denied),
2 when the command could not run (usage, configuration, no database); one line per
problem on stderr; commands other than ``serve`` log warnings and errors only (INFO
with ``--verbose``); machine-readable output with ``--json`` where there is output.

The one-shot commands work on the database of the configuration; with the embedded
FerretDB that is the running node's when one serves the same data folder, else one
started for the command, and the commands that only read refuse a data folder or a
database that does not exist rather than report an empty archive.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError

from acl import cli as acl_cli
from acl import users
from archive import config as config_module
from archive.config import Config, ConfigError, display_uri
from archive.ferretdb import DatabaseUnavailable
from archive.opening import NoArchive, database

log = logging.getLogger("archive")

DESCRIPTION = """\
A DICOM archive: a node that stores (C-STORE), answers queries (C-FIND) and retrieves
(C-MOVE, C-GET) under access rules, and the commands that manage it."""

EPILOG = """\
'archive COMMAND --help' shows a command's options.
Exit status: 0 done, 1 something failed (a file not stored, a problem found, a request
denied), 2 the command could not run (usage, configuration, database)."""

#: Registered sub-commands: name -> (configure parser, run), in the order of ``--help``:
#: the command line's own, then acl's (registered at the end of this module).
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, Config], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]) -> Callable:
    def register(run: Callable[[argparse.Namespace, Config], int]) -> Callable:
        COMMANDS[name] = (configure, run)
        return run
    return register


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dicom-archive")
    except metadata.PackageNotFoundError:
        from archive import __version__

        return __version__


def setup_logging(level: str, one_shot: bool) -> None:
    """The node logs at its configured level with time stamps; other commands say
    only warnings and errors (INFO with --verbose), prefixed like their other lines."""
    fmt = "archive: %(levelname)s: %(message)s" if one_shot else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format=fmt)
    for noisy in ("pynetdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Lists sub-commands under their section without the ``{a,b,c}`` line above them."""

    def _format_action(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._SubParsersAction):
            return "".join(self._format_action(sub) for sub in action._get_subactions())
        return super()._format_action(action)


# --- serve -------------------------------------------------------------------------


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    pass


#: Python's cyclic collector for the node: at its default (a collection every 700 net
#: allocations of container objects) it ran ~540 times while 1,200 CT/MR instances were
#: stored, 280 ms in all (0.23 ms per instance); the objects a store makes are freed by
#: reference counting anyway.  At 10,000: once, 1.5 ms.
GC_THRESHOLDS = (10_000, 10, 10)


@command("serve", _configure_serve)
def run_serve(args: argparse.Namespace, cfg: Config) -> int:
    """Run the node in the foreground until SIGINT/SIGTERM: one core context, and the
    DICOM front end and DICOMweb (``http:``) over that same object."""
    from archive.context import Context
    from archive.dimse.node import Node

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    context: Context | None = None

    def database_down(reason: str) -> None:  # the supervisor logs the event itself
        if context is not None:
            context.health.mark_down(reason, logged=True)

    gc.set_threshold(*GC_THRESHOLDS)
    with database(cfg, on_down=database_down):
        context = Context(cfg)  # what every front end serves
        node = Node(context)  # the DICOM front end
        context.start()
        node.start()
        gc.freeze()  # what start-up made (modules, tables) is never scanned again
        web = None
        if cfg.http.enabled:  # the HTTP front end, over the same context
            from archive.web.server import WebServer, WebServerError

            try:
                web = WebServer(context, cfg.bind_address, cfg.http.port, tls=cfg.http.tls)
                web.start()
            except WebServerError as exc:
                node.stop()
                context.stop()
                print(f"archive: {exc}", file=sys.stderr)
                return 2
        # With a timeout: Python runs signal handlers in the main thread only, and a
        # SIGTERM the kernel hands to another thread (the node has many) would otherwise
        # wait for something to wake the main thread.
        while not stop.wait(1.0):
            pass
        if web is not None:
            web.stop()  # stops accepting; its requests in flight (STOW-RS parts) finish
        node.stop()  # stores in flight finish, associations close
        context.stop()  # batched level updates written before the database goes
    return 0


# --- import ------------------------------------------------------------------------


def _configure_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar, no line per skipped file (failures still)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON report on stdout: counts and every file's outcome")


@command("import", _configure_import)
def run_import(args: argparse.Namespace, cfg: Config) -> int:
    """Store files and folders (recursively) through the checks of C-STORE."""
    from tqdm import tqdm

    from archive import importer
    from archive.storage import Archive, connect, ensure_indexes

    candidates = list(importer.walk(args.paths))
    # A progress bar only on a terminal: redirected, its redraws would flood the file.
    show_bar = bool(candidates) and not (args.quiet or args.json) and sys.stderr.isatty()
    results: list[importer.Result] = []
    with database(cfg) as opened:
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        try:
            db = client[cfg.database.name]
            ensure_indexes(db, cfg.database.gridfs_bucket)
            archive = Archive(db, cfg.database.gridfs_bucket, cfg.duplicate_policy, cfg.journal,
                              cfg.hierarchy_conflicts, write_behind=cfg.write_behind_seconds)
            archive.start()
            bar = tqdm(candidates, unit="file", disable=not show_bar, file=sys.stderr)
            for candidate in bar:
                result = importer.import_one(archive, candidate,
                                             cfg.receive.in_memory_max_bytes)
                results.append(result)
                if result.outcome == importer.FAILED or \
                        (result.outcome == importer.SKIPPED and not args.quiet):
                    line = f"archive import: {result.line()}"
                    if show_bar:
                        bar.write(line, file=sys.stderr)
                    else:
                        print(line, file=sys.stderr)
            archive.close()  # the batched level updates written
        finally:
            client.close()
    counts = Counter(result.outcome for result in results)
    summary = {key: counts[key] for key in (importer.STORED, importer.SKIPPED, importer.FAILED)}
    if args.json:
        print(json.dumps({**summary, "database": opened.as_dict(),
                          "files": [result.as_dict() for result in results]}, indent=2))
    else:
        print(", ".join(f"{key} {n}" for key, n in summary.items()) + f" into {opened.describe()}")
    return 1 if counts[importer.FAILED] else 0


# --- stats -------------------------------------------------------------------------


def _configure_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@command("stats", _configure_stats)
def run_stats(args: argparse.Namespace, cfg: Config) -> int:
    """Count patients, studies, series and instances, per modality and SOP class."""
    from archive.storage import Archive, connect

    with database(cfg, existing=True) as opened:
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        try:
            stats = Archive(client[cfg.database.name], cfg.database.gridfs_bucket).stats()
        finally:
            client.close()
    if args.json:
        print(json.dumps({**stats, "database": opened.as_dict()}, indent=2))
        return 0
    print(opened.describe())
    for key in ("patients", "studies", "series", "instances"):
        print(f"{key:<10} {stats[key]:>8}")
    for title, key in (("instances per modality", "modalities"),
                       ("instances per SOP class", "sop_classes")):
        print(f"\n{title}:")
        for name, count in stats[key].items():
            print(f"  {name or '(none)':<40} {count:>8}")
    return 0


# --- check -------------------------------------------------------------------------


def _configure_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repair", action="store_true",
                        help="delete orphan files, rebuild wrong level documents")
    parser.add_argument("--grace", type=float, default=300.0, metavar="SECONDS",
                        help="leave files younger than this alone: a running node may be "
                             "storing them (default 300)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@command("check", _configure_check)
def run_check(args: argparse.Namespace, cfg: Config) -> int:
    """Check the database against its instances and files (and repair it)."""
    from archive.check import check
    from archive.storage import Archive, connect

    with database(cfg, existing=True) as opened:
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        try:
            archive = Archive(client[cfg.database.name], cfg.database.gridfs_bucket,
                              cfg.duplicate_policy, cfg.journal, cfg.hierarchy_conflicts)
            report = check(archive, repair=args.repair, grace=args.grace)
            after = check(archive, grace=args.grace) if args.repair else report
        finally:
            client.close()
    if args.json:
        print(json.dumps({**report.as_dict(), "clean_after_repair": after.clean,
                          "database": opened.as_dict()}, indent=2))
    else:
        print(opened.describe())
        for line in report.problems:
            print(f"problem: {line}")
        for line in report.notes:
            print(f"note: {line}")
        for line in report.repaired:
            print(f"repaired: {line}")
        for line in after.problems if args.repair else ():
            print(f"remains: {line}")
        state = "consistent" if after.clean else f"{len(after.problems)} problems"
        print(f"{report.instances} instances, {report.files} files: {state}"
              + (f" ({report.skipped_recent} recent files not judged)"
                 if report.skipped_recent else ""))
    return 0 if after.clean else 1


# --- delete ------------------------------------------------------------------------


def _configure_delete(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("keys", nargs="+", metavar="KEY=VALUE",
                        help="C-FIND keys selecting the instances (keyword or tag; wild "
                             "cards, ranges and lists as in C-FIND), e.g. "
                             "StudyInstanceUID=1.2.3 or PatientID='TRIAL42-*'")
    _change_options(parser, "list what would be deleted; delete nothing",
                    "do not ask before deleting more than one study")


def _change_options(parser: argparse.ArgumentParser,
                    dry_run: str, yes: str) -> None:
    """--dry-run, --yes and --json of the commands that change what a selection names."""
    parser.add_argument("--dry-run", action="store_true", help=dry_run)
    parser.add_argument("--yes", action="store_true", help=yes)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@command("delete", _configure_delete)
def run_delete(args: argparse.Namespace, cfg: Config) -> int:
    """Delete the instances C-FIND keys select: their files, documents and counts.

    Runs as the local administrator (it has the database): no access rule is asked,
    and the audit trail records the operating-system user."""
    import time

    from acl import audit
    from archive.deletion import DeleteIncomplete
    from archive.storage import Archive, connect, ensure_indexes

    keys = _selection_keys("delete", args.keys)
    if isinstance(keys, int):
        return keys
    request, exact = keys
    started = time.perf_counter()
    with database(cfg) as opened:
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        try:
            db = client[cfg.database.name]
            ensure_indexes(db, cfg.database.gridfs_bucket)
            archive = Archive(db, cfg.database.gridfs_bucket, cfg.duplicate_policy,
                              cfg.journal, cfg.hierarchy_conflicts)
            if archive.pending():  # an interrupted store or delete: finished first
                archive.reconcile()
            selection = archive.select(exact, rejected=True)
            studies = selection.studies()
            listing = _listing(archive, studies)
            if not args.json:
                print(opened.describe())
                for line in listing:
                    print(line)
            if selection.in_flight:
                print(f"archive delete: {selection.in_flight} matching instances are being "
                      "stored right now: they are kept", file=sys.stderr)
            counts = selection.counts()
            if not selection.instances:
                if args.json:
                    print(json.dumps({"deleted": 0, "dry_run": args.dry_run,
                                      "in_flight": selection.in_flight}))
                print(f"archive delete: no stored instance matches {request}",
                      file=sys.stderr)
                return 1
            what = (f"{counts['instances']} instances of {counts['studies']} studies "
                    f"({counts['patients']} patients)")
            if selection.rejected:
                what += f" and {len(selection.rejected)} rejected instances"
            if args.dry_run:
                if args.json:
                    print(json.dumps({"dry_run": True, **counts, "studies_selected": [
                        {"StudyInstanceUID": uid, "PatientID": s["PatientID"],
                         "series": len(s["series"]), "instances": s["instances"]}
                        for uid, s in studies.items()]}, indent=2))
                else:
                    print(f"dry run: would delete {what}; nothing deleted")
                return 0
            if len(studies) > 1 and not args.yes and not _confirm(f"Delete {what}?"):
                print("archive delete: nothing deleted (more than one study: confirm, or "
                      "give --yes)", file=sys.stderr)
                return 1
            status, error = 0x0000, ""
            try:
                deleted = archive.delete(selection.instances, selection.rejected)
            except DeleteIncomplete as exc:
                deleted, status, error = -1, 0xA700, str(exc)
            try:
                db[audit.COLLECTION].insert_one(_delete_audit(
                    request, counts if status == 0 else {}, status, error, started))
            except PyMongoError as exc:
                print(f"archive delete: audit entry not written: {exc}", file=sys.stderr)
        finally:
            client.close()
    if status:
        print(f"archive delete: {error}; the rest is finished when the database answers "
              "again (by the node, or the next archive delete / check --repair)",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"deleted": deleted, **counts, "in_flight": selection.in_flight,
                          "seconds": round(time.perf_counter() - started, 3)}, indent=2))
    else:
        print(f"deleted {what} in {time.perf_counter() - started:.1f} s")
    return 0


# --- rejected ----------------------------------------------------------------------


def _configure_rejected(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "purge"),
                        help="list the rejected instances, or purge them (delete their "
                             "documents and files)")
    parser.add_argument("keys", nargs="*", metavar="KEY=VALUE",
                        help="C-FIND keys selecting among them, as for delete (none: all)")
    _change_options(parser, "purge: list what would be purged; purge nothing",
                    "purge: do not ask before purging more than one study")


@command("rejected", _configure_rejected)
def run_rejected(args: argparse.Namespace, cfg: Config) -> int:
    """List or purge the instances rejection notes (IHE IOCM) rejected.

    Runs as the local administrator, as delete does; a purge is audited (PURGE)."""
    import time

    from acl import audit
    from archive.rejection import listed
    from archive.storage import Archive, connect, ensure_indexes

    name = f"rejected {args.action}"
    keys = _selection_keys(name, args.keys, everything=True)
    if isinstance(keys, int):
        return keys
    request, exact = keys
    started = time.perf_counter()
    purged, error = 0, ""
    with database(cfg, existing=args.action == "list") as opened:
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        try:
            db = client[cfg.database.name]
            archive = Archive(db, cfg.database.gridfs_bucket, cfg.duplicate_policy,
                              cfg.journal, cfg.hierarchy_conflicts)
            if args.action == "purge":
                ensure_indexes(db, cfg.database.gridfs_bucket)
                if archive.pending():  # an interrupted rejection or purge: finished first
                    archive.reconcile()
            found = archive.rejecter.select(exact)
            studies = {d["StudyInstanceUID"] for d in found}
            if args.json and (args.action == "list" or args.dry_run):
                print(json.dumps({"database": opened.as_dict(), "rejected": [
                    listed(d) for d in found]}, indent=2, default=str))
            elif not args.json:
                print(opened.describe())
                for doc in found:
                    row = listed(doc)
                    print(f"  patient {row['PatientID']!r} study {row['StudyInstanceUID']} "
                          f"series {row['SeriesInstanceUID']} instance {row['SOPInstanceUID']}"
                          f": {row['code']} {row['meaning']}, {row['at']} by {row['by']} "
                          f"(note {row['note']})")
            what = f"{len(found)} rejected instances of {len(studies)} studies"
            if args.action == "list":
                if not args.json:
                    print(what)
                return 0
            if not found:
                print(f"archive {name}: no rejected instance matches {request}",
                      file=sys.stderr)
                return 1
            if args.dry_run:
                if not args.json:
                    print(f"dry run: would purge {what}; nothing purged")
                return 0
            if len(studies) > 1 and not args.yes and not _confirm(f"Purge {what}?"):
                print(f"archive {name}: nothing purged (more than one study: confirm, or "
                      "give --yes)", file=sys.stderr)
                return 1
            try:
                purged = archive.rejecter.purge(found)
            except PyMongoError as exc:
                error = f"purge interrupted: {type(exc).__name__}"
            counts = {"instances": purged, "studies": len(studies)} if not error else {}
            try:
                entry = _delete_audit(request, counts, 0xA700 if error else 0, error, started)
                entry.update(event="PURGE", request=f"archive rejected purge {request}",
                             basis=f"archive rejected purge, pid {os.getpid()}")
                db[audit.COLLECTION].insert_one(entry)
            except PyMongoError as exc:
                print(f"archive {name}: audit entry not written: {exc}", file=sys.stderr)
        finally:
            client.close()
    if error:
        print(f"archive {name}: {error}; the rest is finished when the database answers "
              "again (by the node, or the next purge / check --repair)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"purged": purged, "studies": len(studies),
                          "seconds": round(time.perf_counter() - started, 3)}, indent=2))
    else:
        print(f"purged {what} in {time.perf_counter() - started:.1f} s")
    return 0


# --- query -------------------------------------------------------------------------


def _configure_query(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("keys", nargs="*", metavar="KEY=VALUE",
                        help="C-FIND keys on any attribute: a keyword or a tag (private "
                             "ones: 0019,100C); wild cards, ranges, lists as in C-FIND, "
                             "e.g. Modality=MR StudyDate=20240101-")
    parser.add_argument("--level", default="series",
                        choices=["patients", "studies", "series", "instances"],
                        help="what is counted (default series)")
    parser.add_argument("--group-by", action="append", default=[], metavar="KEY",
                        help="count per value of this attribute (up to 3 times)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="the counts as CSV")
    output.add_argument("--json", action="store_true", help="machine-readable output")


@command("query", _configure_query)
def run_query(args: argparse.Namespace, cfg: Config) -> int:
    """Count patients, studies, series or instances matching keys, grouped by attributes.

    Reads the database as the local administrator (no access rule is asked). For
    example, archive query --group-by SeriesDescription Modality=MR counts series per
    description among the MR ones."""
    import time

    from archive.find import Finder
    from archive.metadata_query import MetadataQueryError, csv_text, parse, run, table_text
    from archive.storage import connect

    try:
        query = parse(args.level, args.keys, args.group_by)
    except MetadataQueryError as exc:
        return _usage("query", str(exc))
    started = time.perf_counter()
    with database(cfg, existing=True) as opened:
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        try:
            result = run(Finder(client[cfg.database.name]), query)
        finally:
            client.close()
    log.info("query %s: %d groups in %.2f s", query.describe(), len(result.rows),
             time.perf_counter() - started)
    if args.csv:
        sys.stdout.write(csv_text(result))
    elif args.json:
        print(json.dumps({"level": args.level, "group_by": result.columns[:-1],
                          "keys": dict(item.split("=", 1) for item in args.keys),
                          "groups": [{"values": list(values), "count": n}
                                     for values, n in result.rows],
                          "total": result.total, "instances": result.instances,
                          "database": opened.as_dict()}, indent=2, ensure_ascii=False))
    else:
        print(opened.describe())
        print(f"{query.describe()}:")
        print(table_text(result))
    return 0
def _selection_keys(command_name: str, items: list[str], *, everything: bool = False
                    ) -> tuple[str, dict[str, Any] | None] | int:
    """C-FIND keys given as KEY=VALUE: the request as one line and the filter on
    instance documents they make (None: every instance, only when ``everything`` may be
    selected); or the exit status of a usage error (said)."""
    from acl.patterns import PatternError, instance_selection

    pairs = [item.partition("=") for item in items]
    try:
        for item, (_, sep, _) in zip(items, pairs, strict=True):
            if not sep:
                raise PatternError(f"{item!r}: expected KEY=VALUE")
        raw, exact = instance_selection((key, value) for key, _, value in pairs)
    except PatternError as exc:
        return _usage(command_name, str(exc))
    if exact is None and not everything:
        return _usage(command_name, "these keys match every instance: give a value that "
                      "selects")
    return " ".join(f"{k}={v}" for k, v in raw.items()) or "(all)", exact


def _usage(command_name: str, message: str) -> int:
    print(f"archive {command_name}: {message}", file=sys.stderr)
    return 2


def _listing(archive: Any, studies: dict[str, dict[str, Any]]) -> list[str]:
    """One line per study: patient, UID, date, description, what of it goes."""
    lines = []
    for uid, share in sorted(studies.items(), key=lambda item: (item[1]["PatientID"], item[0])):
        doc = archive.studies.find_one({"_id": uid}, {"NumberOfStudyRelatedInstances": 1,
                                                      "StudyDate": 1, "dataset.00081030": 1}
                                       ) or {}
        description = ((doc.get("dataset") or {}).get("00081030") or {}).get("Value", [""])[0]
        total = doc.get("NumberOfStudyRelatedInstances", share["instances"])
        part = "whole study" if share["instances"] >= total else f"of {total} instances"
        lines.append(f"  patient {share['PatientID']!r} study {uid} {doc.get('StudyDate', '')} "
                     f"{description!r}: {share['instances']} instances in "
                     f"{len(share['series'])} series ({part})")
    return lines


def _confirm(question: str) -> bool:
    """Ask on the terminal (or whatever stdin is); anything but y/yes is no."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _delete_audit(request: str, counts: dict[str, int], status: int, comment: str,
                  started: float, command_name: str = "delete") -> dict[str, Any]:
    """The audit entry of ``archive delete`` (and ``archive modify``): the
    operating-system user acting as the local administrator."""
    import socket
    from types import SimpleNamespace

    from acl.audit import operation_entry
    from acl.identity import OS_USER
    from acl.rules import DELETE, MODIFY

    user = _os_user()
    peer = SimpleNamespace(requestor=SimpleNamespace(address=socket.gethostname(), port=0,
                                                     ae_title=""),
                           acceptor=SimpleNamespace(ae_title=""))
    service = MODIFY if command_name == "modify" else DELETE
    entry = operation_entry(peer, command_name.upper(), user, service, allowed=True,
                            status=status, request=f"archive {command_name} {request}",
                            comment=comment[:200], counts=counts, started=started)
    entry.update(established=OS_USER, basis=f"archive {command_name}, pid {os.getpid()}")
    return entry


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no name for this uid (a container)
        return f"uid {os.getuid()}"


# --- modify ------------------------------------------------------------------------


def _configure_modify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("keys", nargs="+", metavar="KEY=VALUE",
                        help="C-FIND keys selecting the instances, as for archive delete")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--set", action="append", metavar="KEYWORD=VALUE", dest="changes",
                      help="the corrected value of an attribute (repeat for more; an "
                           "empty value empties it), e.g. --set PatientName='DOE^JANE'")
    what.add_argument("--history", action="store_true",
                      help="list the corrections of the selected instances")
    what.add_argument("--restore", action="store_true",
                      help="make corrected instances their original again (the "
                           "corrected versions are deleted)")
    parser.add_argument("--reason", default="", metavar="TEXT",
                        help="why (kept with the correction and in the audit trail)")
    _change_options(parser, "list what would change; change nothing",
                    "do not ask before changing more than one study")


@command("modify", _configure_modify)
def run_modify(args: argparse.Namespace, cfg: Config) -> int:
    """Correct attributes of the instances C-FIND keys select, keeping the originals.

    Each file is rewritten with the new values (nothing else changes, same transfer
    syntax, the old values in its Original Attributes Sequence); the original stays,
    listed by --history and brought back by --restore.  A new PatientID moves whole
    studies to that patient, taking its patient attributes when it exists.  UIDs are
    never changed.  Runs as the local administrator: no access rule is asked, and the
    audit trail records the operating-system user."""
    import time

    from acl import audit
    from archive.modification import HISTORY, ModifyIncomplete, changed_patient
    from archive.rewrite import BadChange, parse_change
    from archive.storage import Archive, connect, ensure_indexes

    keys = _selection_keys("modify", args.keys)
    if isinstance(keys, int):
        return keys
    request, exact = keys
    changes: dict[int, Any] = {}
    for text in args.changes or ():
        try:
            elem = parse_change(text)
        except BadChange as exc:
            return _usage("modify", str(exc))
        if elem.tag in changes:
            return _usage("modify", f"{elem.keyword} set twice")
        changes[elem.tag] = elem
    if changes:
        request += " --set " + " ".join(sorted(f"{e.keyword}={e.value}"
                                               for e in changes.values()))
    elif args.restore:
        request += " --restore"
    started = time.perf_counter()
    with database(cfg) as opened:
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        try:
            db = client[cfg.database.name]
            ensure_indexes(db, cfg.database.gridfs_bucket)
            archive = Archive(db, cfg.database.gridfs_bucket, cfg.duplicate_policy,
                              cfg.journal, cfg.hierarchy_conflicts)
            if archive.pending():  # an interrupted store, delete or modify: finished first
                archive.reconcile()
            selection = archive.select(exact)
            instances = selection.instances
            if args.history or args.restore:
                found = {d["_id"]: d for d in db[archive.instances.name].find(
                    {"_id": {"$in": [d["_id"] for d in instances]},
                     HISTORY: {"$exists": True}}, {HISTORY: 1, "StudyInstanceUID": 1})}
                instances = [d for d in instances if d["_id"] in found]
            if args.history:
                return _print_history([found[d["_id"]] for d in instances], args.json)
            if not instances:
                print(f"archive modify: no {'corrected ' if args.restore else ''}stored "
                      f"instance matches {' '.join(args.keys)}", file=sys.stderr)
                return 1
            changes = archive.modifier.adopted(changes)
            refusal = archive.modifier.refusal(instances, changes) if changes else None
            if refusal:
                print(f"archive modify: {refusal}", file=sys.stderr)
                return 1
            counts = _counts(instances)
            what = (f"{counts['instances']} instances of {counts['studies']} studies "
                    f"({counts['patients']} patients)")
            verb = "restore" if args.restore else "correct"
            if not args.json:
                print(opened.describe())
                for line in _listing(archive, _studies(instances)):
                    print(line)
                if changes:
                    patient = changed_patient(changes)
                    for tag, elem in sorted(changes.items()):
                        value = "(removed)" if elem is None else repr(str(elem.value))
                        print(f"  {_keyword(tag)} -> {value}")
                    if patient is not None and len(changes) > len(args.changes):
                        print(f"  (patient attributes of existing patient {patient!r})")
            if args.dry_run:
                if args.json:
                    print(json.dumps({"dry_run": True, **counts}, indent=2))
                else:
                    print(f"dry run: would {verb} {what}; nothing changed")
                return 0
            if counts["studies"] > 1 and not args.yes and \
                    not _confirm(f"{verb.capitalize()} {what}?"):
                print("archive modify: nothing changed (more than one study: confirm, or "
                      "give --yes)", file=sys.stderr)
                return 1
            status, error, done, left, same = 0x0000, "", 0, 0, 0
            try:
                if args.restore:
                    done, left, same = archive.restore(instances)
                else:
                    done, left, same = archive.modify(instances, changes, _os_user(),
                                                      args.reason,
                                                      f"{cfg.ae_title} archive modify")
            except BadChange as exc:
                status, error = 0xC000, str(exc)
            except ModifyIncomplete as exc:
                status, error = 0xA700, str(exc)
            try:
                db[audit.COLLECTION].insert_one(_delete_audit(
                    request + (f" --reason {args.reason}" if args.reason else ""),
                    {"instances": done} if status == 0 else {}, status, error, started,
                    "modify"))
            except PyMongoError as exc:
                print(f"archive modify: audit entry not written: {exc}", file=sys.stderr)
        finally:
            client.close()
    if status == 0xA700:
        print(f"archive modify: {error}; the rest is finished when the database answers "
              "again (by the node, or the next archive modify / check --repair)",
              file=sys.stderr)
        return 1
    if status:
        print(f"archive modify: {error}", file=sys.stderr)
        return 1
    if left:
        print(f"archive modify: {left} instances were sent again meanwhile: kept as sent",
              file=sys.stderr)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({verb + "ed": done, "left": left, "unchanged": same, **counts,
                          "seconds": round(seconds, 3)}, indent=2))
    else:
        print(f"{verb}ed {done} instances in {seconds:.1f} s" + (
            f" ({same} had these values already: unchanged)" if same else ""))
    return 0


def _counts(instances: list[dict[str, Any]]) -> dict[str, int]:
    from archive.deletion import Selection

    return Selection(instances).counts()


def _studies(instances: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from archive.deletion import Selection

    return Selection(instances).studies()


def _keyword(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _print_history(docs: list[dict[str, Any]], as_json: bool) -> int:
    """The corrections of instances, oldest first; exit 1 when none has any."""
    from archive.modification import HISTORY

    rows = [{"SOPInstanceUID": doc["_id"], "StudyInstanceUID": doc.get("StudyInstanceUID"),
             "version": n, "replaced_at": h["replaced_at"].isoformat(), "by": h.get("by"),
             "reason": h.get("reason"), "changed": h.get("changed"),
             "original": n == 0, "file_id": str(h["file_id"])}
            for doc in sorted(docs, key=lambda d: d["_id"])
            for n, h in enumerate(doc.get(HISTORY) or [])]
    if as_json:
        print(json.dumps(rows, indent=2))
    for row in rows if not as_json else ():
        changed = ", ".join(f"{k} was {v!r}" if v is not None else f"{k} was absent"
                            for k, v in (row["changed"] or {}).items())
        print(f"{row['SOPInstanceUID']} corrected {row['replaced_at']} by {row['by']}"
              + (f" ({row['reason']})" if row["reason"] else "") + f": {changed}")
    if not rows:
        print("archive modify: no correction of the selected instances", file=sys.stderr)
    return 0 if rows else 1


# --- entry point -------------------------------------------------------------------


def _options(parser: argparse.ArgumentParser, top: bool) -> None:
    """--config and --verbose, before the command or after it."""
    parser.add_argument("--config", default=os.environ.get("ARCHIVE_CONFIG") if top
                        else argparse.SUPPRESS,
                        help=f"YAML configuration (default {config_module.DEFAULT_PATH}, "
                             "or ARCHIVE_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help="log progress too (commands other than serve log warnings "
                             "and errors only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="archive", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"archive {version()}")
    _options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="COMMAND")
    for name, (configure, run) in COMMANDS.items():
        doc = (run.__doc__ or "").strip()
        child = sub.add_parser(name, help=doc.split("\n")[0].rstrip("."), description=doc,
                               formatter_class=_Formatter)
        _options(child, top=False)
        configure(child)
        child.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_module.load(args.config)
    except ConfigError as exc:
        print(f"archive: configuration error: {exc}", file=sys.stderr)
        return 2
    problem = unwritable_folder(cfg, args.command)
    if problem:
        print(f"archive: {problem}", file=sys.stderr)
        return 2
    one_shot = args.command != "serve"
    setup_logging(("INFO" if args.verbose else "WARNING") if one_shot else cfg.log_level,
                  one_shot)
    try:
        return args.run(args, cfg)
    except (DatabaseUnavailable, NoArchive) as exc:
        print(f"archive: {exc}", file=sys.stderr)
        return 2
    except PyMongoError as exc:
        print(f"archive: database {cfg.database.name} at {display_uri(cfg.database.uri)} "
              f"not usable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


#: Commands that write the store journal; every command but ``user`` may start the
#: embedded database, which writes its data folder.
_JOURNAL_WRITERS = frozenset({"serve", "import", "check", "delete", "rejected", "modify"})
_NO_DATABASE = frozenset({"user"})


def writable(folder: Path) -> str | None:
    """None when files can be created in ``folder``, or the folder itself (it is made
    by whoever needs it), else why not.

    A real probe rather than ``os.access``: root passes every permission check but not
    a read-only file system, and both must fail here rather than in a traceback later.
    Nothing is created but the probe's temporary file: a command that only reads must
    not leave an empty data folder behind.
    """
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".archive-probe-"):
            pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def unwritable_folder(cfg: Config, command_name: str) -> str | None:
    """``FOLDER: not writable (reason)`` for the first data folder the command would
    write and cannot: the embedded database's data folder, the journal, the folder of
    datasets being received."""
    folders = []
    if command_name not in _NO_DATABASE and cfg.database.embedded.enabled:
        folders.append(Path(cfg.database.embedded.data_dir))
    if command_name in _JOURNAL_WRITERS:
        folders.append(Path(cfg.journal))  # a folder: one file per unfinished store
    if command_name == "serve":
        folders.append(Path(cfg.receive.folder))  # C-STORE datasets being received
    for folder in folders:
        reason = writable(folder)
        if reason is not None:
            return f"{folder}: not writable ({reason})"
    return None


# acl's commands: acl exposes them, the command line registers them (acl never imports it).
command("acl", acl_cli.configure_acl)(acl_cli.run_acl)
command("audit", acl_cli.configure_audit)(acl_cli.run_audit)
command("user", users.configure_user)(users.run_user)
command("token", acl_cli.configure_token)(acl_cli.run_token)
