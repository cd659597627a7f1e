"""Command line of access control: ``archive acl apply | export | check`` and ``archive audit``.

``acl apply FILE [--dry-run]``  validate the whole file first (exit 2 and nothing changed
                                on any problem, each named with its line), then replace
                                the active rules atomically; prints added/removed rules.
``acl export [-o FILE]``        the active rules as YAML that ``apply`` takes back as is.
``acl check --user U --service S [--dataset FILE | KEY=VALUE ...]``
                                allowed (exit 0) or denied (exit 1), and which rule decided.
``audit [--user U] [--since T] [--limit N]``
                                the audit trail, one line per entry, newest last.
``token issue USER [--expires D] [--label T] | list | revoke ID``
                                DICOMweb bearer tokens (:mod:`acl.tokens`): the token is
                                printed once, at issue; the database keeps its hash.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pymongo.database import Database
from pymongo.errors import PyMongoError

from acl import audit, tokens, yamlrules
from acl.auth import Refused
from acl.auth import from_config as authenticator_from_config
from acl.identity import ANONYMOUS
from acl.patterns import PatternError, check_stored, describe, matches_everything, parse_key
from acl.rules import (
    ANY,
    NAMED_ONLY,
    SERVICES,
    Change,
    ConcurrentApply,
    Rule,
    RuleStore,
    decide,
    instance_document,
)
from acl.users import check_name
from archive.config import Config
from archive.opening import database
from archive.storage import connect


@contextlib.contextmanager
def _database(cfg: Config, existing: bool = False) -> Iterator[Database]:
    """The archive's database (the running node's embedded FerretDB, or one started for
    the command); ``existing`` for reading: one nothing was stored in is an error."""
    with database(cfg, existing=existing):
        client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        try:
            yield client[cfg.database.name]
        finally:
            client.close()


def _error(message: str, code: int = 1, prefix: str = "archive acl") -> int:
    print(f"{prefix}: {message}", file=sys.stderr)
    return code


# --- archive acl -----------------------------------------------------------------------


def configure_acl(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="YAML configuration file")
    sub = parser.add_subparsers(dest="acl_command", required=True, metavar="ACTION")
    apply = sub.add_parser("apply", parents=[common],
                           help="replace the rules by those of a YAML file")
    apply.add_argument("file", metavar="FILE", help="rules file (see config/acl.yaml)")
    apply.add_argument("--dry-run", action="store_true",
                       help="validate and print what would change; change nothing")
    export = sub.add_parser("export", parents=[common], help="write the rules as YAML")
    export.add_argument("-o", "--output", metavar="FILE", help="file to write (default stdout)")
    check = sub.add_parser("check", parents=[common],
                           help="would a user be allowed a service (on a dataset)?")
    check.add_argument("--user", required=True, help="principal (user name or 'anonymous')")
    check.add_argument("--service", required=True, help=f"{', '.join(SERVICES)}")
    check.add_argument("--dataset", metavar="FILE", help="a DICOM file to judge")
    check.add_argument("--destination", metavar="AE",
                       help="Retrieve: the Move Destination of a C-MOVE")
    check.add_argument("attributes", nargs="*", metavar="KEY=VALUE",
                       help="attributes of a dataset to judge (keyword or tag)")


def run_acl(args: argparse.Namespace, cfg: Config) -> int:
    """Access rules: apply a YAML file, export them, check a request."""
    actions = {"apply": _apply, "export": _export, "check": _check}
    try:
        return actions[args.acl_command](args, cfg)
    except PyMongoError as exc:
        return _error(f"database error, nothing changed: {exc}")


def _apply(args: argparse.Namespace, cfg: Config) -> int:
    try:
        rules = yamlrules.load(args.file)
    except yamlrules.RulesFileError as exc:
        count = len(exc.problems)
        if count == 1:  # one line
            problem = exc.problems[0]
            print(f"archive acl apply: {exc.filename}:{problem.line}: {problem.message}; "
                  "nothing changed", file=sys.stderr)
            return 2
        print(f"archive acl apply: {count} problems in {args.file}, nothing changed:",
              file=sys.stderr)
        for problem in exc.problems:
            print(f"  {exc.filename}:{problem.line}: {problem.message}", file=sys.stderr)
        return 2
    for warning in universal_warnings(rules) + anyone_deletes(rules):
        print(f"archive acl apply: warning: {warning}", file=sys.stderr)
    with _database(cfg) as db:
        try:
            change = RuleStore(db).apply(rules, source=str(args.file), dry_run=args.dry_run)
        except ConcurrentApply as exc:
            return _error(str(exc))
    print(_report(change, rules, args.file, args.dry_run))
    if not cfg.acl.enabled:
        print("note: acl.enabled is false in this configuration: its nodes allow everything")
    return 0


def _who(rule: Rule) -> str:
    where = f"{rule.source}: " if rule.source else ""
    return f"{where}rule {rule.index} (principal {rule.principal!r})"


def universal_warnings(rules: list[Rule]) -> list[str]:
    """A pattern whose keys are all "*" restricts nothing: allowed (it is explicit, and
    the same as no pattern), but said, since the administrator likely meant a value."""
    return [f"{_who(rule)}: pattern {describe(rule.pattern)} matches every dataset: "
            "it restricts nothing (give a value, or drop the pattern)"
            for rule in rules if matches_everything(rule.pattern)]


def anyone_deletes(rules: list[Rule]) -> list[str]:
    """A Delete or Modify rule for principal "*" gives it to anonymous too: allowed (it
    is explicit), but said."""
    return [f"{_who(rule)}: gives {rule.service} to anyone, anonymous included"
            for rule in rules if rule.principal == ANY and rule.service in NAMED_ONLY]


def stored_problems(rules: list[Rule]) -> list[str]:
    """Rules in force that ``acl apply`` refuses today (an empty value, applied before
    it was refused, silently matches every dataset)."""
    problems = []
    for rule in rules:
        try:
            check_stored(rule.pattern)
        except PatternError as exc:
            problems.append(f"{_who(rule)}: pattern: {exc}")
    return problems


def _report(change: Change, rules: list[Rule], file: str, dry_run: bool) -> str:
    if not change:
        return (f"no change: the active rules are already those of {file} "
                f"({len(rules)} rules)")
    lines = [f"+ {rule.describe()}" for rule in change.added]
    lines += [f"- {rule.describe()}" for rule in change.removed]
    if change.reordered:
        lines.append("~ same rules, new order")
    counts = f"{len(change.added)} added, {len(change.removed)} removed"
    if dry_run:
        lines.append(f"dry run: applying {file} would give {len(rules)} rules ({counts}); "
                     "nothing changed")
    else:
        lines.append(f"applied {file}: {len(rules)} rules active ({counts})")
    return "\n".join(lines)


def _export(args: argparse.Namespace, cfg: Config) -> int:
    with _database(cfg, existing=True) as db:
        ruleset = RuleStore(db).load()
    if ruleset.id is None:
        header = f"No rules were ever applied to database {cfg.database.name}: all is denied."
    else:
        applied = ruleset.applied_at.isoformat(timespec="seconds") if ruleset.applied_at \
            else "?"
        header = (f"Access rules of database {cfg.database.name}: ruleset {ruleset.id},\n"
                  f"applied {applied} from {ruleset.source or '?'}.")
    text = yamlrules.dump(ruleset.rules, header + "\nApply with: archive acl apply FILE")
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"exported {len(ruleset.rules)} rules to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _check(args: argparse.Namespace, cfg: Config) -> int:
    service = {s.lower(): s for s in SERVICES}.get(args.service.strip().lower())
    if service is None:
        return _error(f"--service {args.service!r}: one of {', '.join(SERVICES)}", 2)
    if args.dataset and args.attributes:
        return _error("give --dataset or KEY=VALUE attributes, not both", 2)
    try:
        document = _document(args)
    except (OSError, ValueError) as exc:
        return _error(str(exc), 2)
    with _database(cfg, existing=True) as db:
        ruleset = RuleStore(db).load()
    refused = stored_problems(ruleset.rules)
    if refused:
        for problem in refused:
            print(f"archive acl check: {problem}", file=sys.stderr)
        print("archive acl check: the rules in force cannot be judged: correct the file and "
              "apply it again (archive acl apply FILE)", file=sys.stderr)
        return 2
    for warning in universal_warnings(ruleset.rules):
        print(f"archive acl check: warning: {warning}", file=sys.stderr)
    if not cfg.acl.enabled:
        print("note: acl.enabled is false in this configuration: its nodes allow everything")
    decision = decide(ruleset.rules, args.user, service)
    if args.destination:
        decision = decision.to_destination(args.destination.strip())
    if not decision.allowed:
        to = f" with C-MOVE to {args.destination.strip()}" if args.destination else ""
        print(f"denied: no rule gives {service}{to} to {args.user} "
              f"({len(ruleset.rules)} rules active)")
        return 1
    if document is None:
        if decision.restricted:
            print("allowed, restricted to the datasets these rules match:")
            for rule in decision.rules:
                print(f"  {rule.describe()}")
        else:
            print(f"allowed by {decision.unrestricted_by.describe()}")  # type: ignore[union-attr]
        return 0
    rule = decision.deciding_rule(document)
    if rule is not None:
        print(f"allowed by {rule.describe()}")
        return 0
    print(f"denied: the dataset matches none of the {service} rules of {args.user}:")
    for candidate in decision.rules:
        print(f"  {candidate.describe()}")
    return 1


def _document(args: argparse.Namespace) -> dict[str, Any] | None:
    """The instance document of the dataset to judge, if one is given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.dataset:
            path = Path(args.dataset)
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
                raise ValueError(f"--dataset {path}: not readable as DICOM ({exc})") from None
            return instance_document(ds, path.stat().st_size, "check")
        if not args.attributes:
            return None
        ds = Dataset()
        for item in args.attributes:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r}: expected KEY=VALUE")
            try:
                tag = parse_key(key)
            except PatternError as exc:
                raise ValueError(str(exc)) from None
            vr = dictionary_VR(tag).split(" or ")[0]
            values = value.split("\\") if vr not in ("LT", "ST", "UT", "UR") else [value]
            ds.add(DataElement(tag, vr, values if len(values) > 1 else value))
        return instance_document(ds, 0, "check")


# --- archive audit ---------------------------------------------------------------------


def configure_audit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="only the entries of this principal")
    parser.add_argument("--since", metavar="T",
                        help="ISO date/time (UTC unless an offset is given) or 15m, 2h, 7d")
    parser.add_argument("--limit", type=int, default=100, metavar="N",
                        help="the newest N entries (default 100, 0 for all)")


def run_audit(args: argparse.Namespace, cfg: Config) -> int:
    """List the audit trail (associations and operations), one line each, newest last."""
    try:
        since = audit.parse_since(args.since) if args.since else None
    except ValueError as exc:
        return _error(str(exc), 2, "archive audit")
    if args.limit < 0:
        return _error("--limit must be 0 (all) or more", 2, "archive audit")
    try:
        with _database(cfg, existing=True) as db:
            rows = audit.entries(db, args.user, since, args.limit)
    except PyMongoError as exc:
        return _error(f"database error: {exc}", 1, "archive audit")
    for line in audit.format_entries(rows):
        print(line)
    return 0



# --- archive token ---------------------------------------------------------------------


def configure_token(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="YAML configuration file")
    sub = parser.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    issue = sub.add_parser("issue", parents=[common],
                           help="issue a token for a user (printed once)")
    issue.add_argument("user", metavar="USER", help="the principal the token acts for")
    issue.add_argument("--expires", default="90d", metavar="DURATION",
                       help="lifetime: 90d (default), 12h, 1w, 30m, 1w2d, or never")
    issue.add_argument("--label", default="", metavar="TEXT",
                       help="what the token is for (a viewer, a script), shown by list")
    issue.add_argument("--json", action="store_true", help="machine-readable output")
    listing = sub.add_parser("list", parents=[common],
                             help="list the tokens (never their secrets)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    revoke = sub.add_parser("revoke", parents=[common],
                            help="revoke a token: refused from now on")
    revoke.add_argument("token_id", metavar="ID", help="the token's id (see list)")


def run_token(args: argparse.Namespace, cfg: Config) -> int:
    """DICOMweb bearer tokens: issue one for a user, list them, revoke one."""
    actions = {"issue": _issue, "list": _list_tokens, "revoke": _revoke}
    try:
        return actions[args.token_command](args, cfg)
    except PyMongoError as exc:
        return _error(f"database error, nothing changed: {exc}", 1, "archive token")


def _issue(args: argparse.Namespace, cfg: Config) -> int:
    try:
        lifetime = tokens.parse_duration(args.expires)
    except ValueError as exc:
        return _error(f"--expires: {exc}", 2, "archive token")
    user = args.user
    try:
        check_name(user)
    except ValueError as exc:
        return _error(str(exc), 2, "archive token")
    if user in ("*", ANONYMOUS):
        return _error(f"{user!r} is not a user a token could stand for", 2, "archive token")
    if len(args.label) > 200 or any(ord(c) < 0x20 for c in args.label):
        return _error("--label: at most 200 characters, no control character", 2,
                      "archive token")
    try:
        known = authenticator_from_config(cfg.auth).knows(user)
    except Refused as exc:
        return _error(f"cannot tell whether {user} is a user: {exc.reason}", 2,
                      "archive token")
    if known is False:
        return _error(f"no user {user!r} in {cfg.auth.users_file} (auth.backend "
                      f"{cfg.auth.backend}): add her first (archive user add {user})", 2,
                      "archive token")
    with _database(cfg) as db:
        issued, record = tokens.TokenStore(db).issue(user, lifetime, args.label)
    if args.json:
        print(json.dumps({"token": issued.token, **_token_row(record)}, indent=2))
    else:
        print(issued.token)
        expiry = _when(record.expires) if record.expires else "never"
        print(f"archive token: issued token {record.id} for {user}, expires {expiry}; "
              "it is shown only now: keep it secret", file=sys.stderr)
    return 0


def _when(value: datetime.datetime | None) -> str:
    return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ") \
        if value else "-"


def _token_row(record: tokens.Record) -> dict[str, Any]:
    return {"id": record.id, "user": record.user, "label": record.label,
            "state": record.state(tokens.now()),
            "created": record.created.isoformat(timespec="seconds"),
            "expires": record.expires.isoformat(timespec="seconds") if record.expires
            else None,
            "revoked": record.revoked.isoformat(timespec="seconds") if record.revoked
            else None,
            "last_used": record.last_used.isoformat(timespec="seconds")
            if record.last_used else None}


def _list_tokens(args: argparse.Namespace, cfg: Config) -> int:
    with _database(cfg, existing=True) as db:
        records = tokens.TokenStore(db).records()
    if args.json:
        print(json.dumps([_token_row(r) for r in records], indent=2))
        return 0
    now = tokens.now()
    print(f"{'ID':<16}  {'USER':<16} {'STATE':<7}  {'CREATED':<17}  {'EXPIRES':<17}  "
          f"{'REVOKED':<17}  {'LAST USE':<17}  LABEL")
    for r in records:
        print(f"{r.id:<16}  {r.user:<16} {r.state(now):<7}  {_when(r.created):<17}  "
              f"{_when(r.expires) if r.expires else 'never':<17}  {_when(r.revoked):<17}  "
              f"{_when(r.last_used):<17}  {r.label}")
    return 0


def _revoke(args: argparse.Namespace, cfg: Config) -> int:
    with _database(cfg, existing=True) as db:
        before = tokens.TokenStore(db).revoke(args.token_id.strip())
    if before is None:
        return _error(f"no token {args.token_id!r}", 1, "archive token")
    if before.revoked is not None:
        print(f"token {before.id} of {before.user} was already revoked "
              f"({_when(before.revoked)})")
    else:
        print(f"revoked token {before.id} of {before.user}: refused from now on")
    return 0
