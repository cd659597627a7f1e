"""Command line: ``python -m archive serve | import | stats`` (and the ``archive`` script)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from pymongo.errors import PyMongoError

from archive import config as config_module
from archive.config import Config, ConfigError
from archive.ferretdb import DatabaseUnavailable, EmbeddedFerretDB

log = logging.getLogger("archive")

#: Registered sub-commands: name -> (configure parser, run).  Other modules (acl,
#: users, audit) add theirs through :func:`command`.
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, Config], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]) -> Callable:
    def register(run: Callable[[argparse.Namespace, Config], int]) -> Callable:
        COMMANDS[name] = (configure, run)
        return run
    return register


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


@contextlib.contextmanager
def database(cfg: Config, on_down: Callable[[str], None] | None = None) -> Iterator[Config]:
    """Start the embedded FerretDB when configured, and point the config at it.

    With ``on_down`` (the node), FerretDB is also restarted whenever it exits, and
    ``on_down(reason)`` is told at once; one-shot commands have no need of either.
    """
    embedded = EmbeddedFerretDB(cfg.database.embedded) if cfg.database.embedded.enabled else None
    if embedded is not None:
        cfg.database.uri = embedded.start()
        if on_down is not None:
            embedded.supervise(on_down)
    try:
        yield cfg
    finally:
        if embedded is not None:
            embedded.stop()


# --- serve -------------------------------------------------------------------------


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    pass


@command("serve", _configure_serve)
def run_serve(args: argparse.Namespace, cfg: Config) -> int:
    """Run the node in the foreground until SIGINT/SIGTERM."""
    from archive.node import Node

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    node: Node | None = None

    def database_down(reason: str) -> None:  # the supervisor logs the event itself
        if node is not None:
            node.health.mark_down(reason, logged=True)

    with database(cfg, on_down=database_down):
        node = Node(cfg)
        node.start()
        # With a timeout: Python runs signal handlers in the main thread only, and a
        # SIGTERM the kernel hands to another thread (the node has many) would otherwise
        # wait for something to wake the main thread.
        while not stop.wait(1.0):
            pass
        node.stop()
    return 0


# --- import ------------------------------------------------------------------------


def _configure_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _walk(paths: list[str]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


@command("import", _configure_import)
def run_import(args: argparse.Namespace, cfg: Config) -> int:
    """Load files into the archive through the same code path as C-STORE."""
    from tqdm import tqdm

    from archive.importer import read_part10
    from archive.storage import Archive, StoreRefused, connect, ensure_indexes

    files = list(_walk(args.paths))
    counts = {"stored": 0, "skipped": 0, "failed": 0}
    with database(cfg):
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        db = client[cfg.database.name]
        ensure_indexes(db)
        archive = Archive(db, cfg.database.gridfs_bucket, cfg.duplicate_policy, cfg.journal,
                          cfg.hierarchy_conflicts)
        bar = tqdm(files, unit="file", disable=args.quiet or not files, file=sys.stderr)
        for path in bar:
            try:
                part10, ds = read_part10(path)
            except StoreRefused as exc:
                counts["skipped"] += 1
                bar.write(f"skipped {path}: {exc.comment}")
                continue
            outcome = archive.store(part10, source="import", ds=ds)
            if outcome.ok:
                counts["stored"] += 1
            else:
                counts["failed"] += 1
                bar.write(f"failed {path}: 0x{outcome.status:04X} {outcome.comment}")
        client.close()
    print(f"stored {counts['stored']}, skipped {counts['skipped']}, failed {counts['failed']}")
    return 1 if counts["failed"] else 0


# --- stats -------------------------------------------------------------------------


def _configure_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@command("stats", _configure_stats)
def run_stats(args: argparse.Namespace, cfg: Config) -> int:
    from archive.storage import Archive, connect

    with database(cfg):
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        stats = Archive(client[cfg.database.name], cfg.database.gridfs_bucket).stats()
        client.close()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
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

    with database(cfg):
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        try:
            archive = Archive(client[cfg.database.name], cfg.database.gridfs_bucket,
                              cfg.duplicate_policy, cfg.journal, cfg.hierarchy_conflicts)
            report = check(archive, repair=args.repair, grace=args.grace)
            after = check(archive, grace=args.grace) if args.repair else report
        finally:
            client.close()
    if args.json:
        print(json.dumps({**report.as_dict(), "clean_after_repair": after.clean}, indent=2))
    else:
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


# --- entry point -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="archive", description=__doc__)
    parser.add_argument("--config", default=os.environ.get("ARCHIVE_CONFIG"),
                        help=f"YAML configuration (default {config_module.DEFAULT_PATH})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, run) in COMMANDS.items():
        child = sub.add_parser(name, help=(run.__doc__ or "").split("\n")[0])
        child.add_argument("--config", default=argparse.SUPPRESS,
                           help="YAML configuration file")
        configure(child)
        child.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    _load_plugins()
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
    setup_logging(cfg.log_level)
    try:
        return args.run(args, cfg)
    except DatabaseUnavailable as exc:
        print(f"archive: {exc}", file=sys.stderr)
        return 2
    except PyMongoError as exc:
        print(f"archive: database {cfg.database.uri} ({cfg.database.name}) not usable: "
              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


#: Commands that write the store journal; every command but ``user`` may start the
#: embedded database, which writes its data folder.
_JOURNAL_WRITERS = frozenset({"serve", "import", "check"})
_NO_DATABASE = frozenset({"user"})


def writable(folder: Path) -> str | None:
    """None when a file can be created in ``folder`` (made if missing), else why not.

    A real probe rather than ``os.access``: root passes every permission check but not
    a read-only file system, and both must fail here rather than in a traceback later.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".archive-probe-"):
            pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def unwritable_folder(cfg: Config, command_name: str) -> str | None:
    """``FOLDER: not writable (reason)`` for the first data folder the command would
    write and cannot: the embedded database's data folder, the journal."""
    folders = []
    if command_name not in _NO_DATABASE and cfg.database.embedded.enabled:
        folders.append(Path(cfg.database.embedded.data_dir))
    if command_name in _JOURNAL_WRITERS:
        folders.append(Path(cfg.journal))  # a folder: one file per unfinished store
    for folder in folders:
        reason = writable(folder)
        if reason is not None:
            return f"{folder}: not writable ({reason})"
    return None


def _load_plugins() -> None:
    """Import the modules that register more sub-commands (acl, user, audit)."""
    import importlib
    import importlib.util

    for name in ("acl.cli", "acl.users"):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # no acl package at all
            spec = None
        if spec is not None:
            importlib.import_module(name)
