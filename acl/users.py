"""The users file of the ``file`` authentication backend, and ``archive user``.

The file (``auth.users_file``) is YAML, one ``name: bcrypt-hash`` per user.  Passwords
are never stored: each is hashed with bcrypt (a random salt per hash, cost
:data:`ROUNDS`), and the node compares a passcode with :func:`bcrypt.checkpw` only.
Anything in the file that is not a bcrypt hash authenticates nobody.

Every change rewrites the file atomically (temporary file in the same folder, fsync,
rename) with mode 0600, under an exclusive lock so that two concurrent ``user add``
do not lose each other's change.  A running node notices the new file by itself.

    python -m archive user add NAME [--password-stdin]   # prompts twice on a terminal
    python -m archive user remove NAME
    python -m archive user list
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import yaml

from archive import yamlfile
from archive.config import Config

#: bcrypt cost (2^12 rounds: ~0.25 s per hash or check on a current CPU).
ROUNDS = 12
#: bcrypt only uses the first 72 bytes of a password; longer ones are refused.
MAX_PASSWORD_BYTES = 72
MAX_NAME_LENGTH = 128

HEADER = """\
# Users of the 'file' authentication backend (auth.users_file): name -> bcrypt hash.
# Never put a plain password here: manage the file with
#   python -m archive user add NAME | user remove NAME | user list
"""


class UsersFileError(Exception):
    """The users file cannot be read or does not have the expected shape."""


def is_bcrypt_hash(value: str) -> bool:
    return (len(value) == 60 and value[:4] in ("$2a$", "$2b$", "$2y$")
            and value[4:6].isdigit() and value[6] == "$")


def check_name(name: str) -> str:
    """A user name as the file and the DICOM User Identity carry it; ValueError if not."""
    if not name:
        raise ValueError("a user name cannot be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"a user name has at most {MAX_NAME_LENGTH} characters")
    if name != name.strip():
        raise ValueError("a user name cannot begin or end with white space")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError("a user name cannot contain control characters")
    return name


def hash_password(password: bytes, rounds: int | None = None) -> str:
    if not password:
        raise ValueError("the password cannot be empty")
    if len(password) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes "
                         "(bcrypt would ignore the rest)")
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds or ROUNDS)).decode("ascii")


def read_users(path: str | Path) -> dict[str, str]:
    """``{name: hash}``; FileNotFoundError if absent, UsersFileError if malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"{path}: cannot read ({exc})") from None
    try:
        data = yamlfile.safe_load(text)
    except yamlfile.YamlLimitError as exc:
        raise UsersFileError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UsersFileError(f"{path}: not valid YAML ({yamlfile.describe(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsersFileError(f"{path}: expected a mapping of user name -> bcrypt hash")
    for name, value in data.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise UsersFileError(f"{path}: entry {name!r}: expected a quoted name and a "
                                 "bcrypt hash")
    return data


def write_users(path: str | Path, users: dict[str, str]) -> None:
    """Replace the file atomically; it is never readable by group or others."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(dict(sorted(users.items())), default_flow_style=False,
                          allow_unicode=True, sort_keys=False) if users else "{}\n"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(HEADER + body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Exclusive lock (``<file>.lock`` beside it) around a read-modify-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def set_password(path: str | Path, name: str, password: bytes,
                 rounds: int | None = None) -> bool:
    """Add ``name`` or change its password; True if the user is new."""
    check_name(name)
    hashed = hash_password(password, rounds)
    with locked(path):
        try:
            users = read_users(path)
        except FileNotFoundError:
            users = {}
        new = name not in users
        users[name] = hashed
        write_users(path, users)
    return new


def remove_user(path: str | Path, name: str) -> bool:
    """Remove ``name``; False if it was not there."""
    with locked(path):
        try:
            users = read_users(path)
        except FileNotFoundError:
            return False
        if users.pop(name, None) is None:
            return False
        write_users(path, users)
    return True


# --- archive user add | remove | list -------------------------------------------------


def configure_user(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--file", metavar="PATH",
                        help="users file (default: auth.users_file of the configuration)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", parents=[common], help="add a user, or change its password")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    remove = sub.add_parser("remove", parents=[common], help="remove a user")
    remove.add_argument("name", metavar="NAME")
    sub.add_parser("list", parents=[common], help="list the user names")


def _error(message: str, code: int = 1) -> int:
    print(f"archive user: {message}", file=sys.stderr)
    return code


def _read_password(args: argparse.Namespace) -> bytes:
    if args.password_stdin:
        line = sys.stdin.readline()
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            raise ValueError("no password on the first line of standard input")
        return line.encode("utf-8")
    if not sys.stdin.isatty():
        raise ValueError("standard input is not a terminal: use --password-stdin")
    first = getpass.getpass(f"Password for {args.name}: ")
    if getpass.getpass("Same password again: ") != first:
        raise ValueError("the two passwords differ; nothing changed")
    return first.encode("utf-8")


def run_user(args: argparse.Namespace, cfg: Config) -> int:
    """Manage the users of the 'file' authentication backend: add, remove, list."""
    path = Path(args.file or cfg.auth.users_file)
    if cfg.auth.backend != "file" and args.action != "list":
        print(f"archive user: note: auth.backend is {cfg.auth.backend!r}; {path} is only "
              "used by the 'file' backend", file=sys.stderr)
    try:
        if args.action == "list":
            try:
                names = sorted(read_users(path))
            except FileNotFoundError:
                names = []
            for name in names:
                print(name)
            return 0
        if args.action == "remove":
            if not remove_user(path, args.name):
                return _error(f"no user {args.name!r} in {path}")
            print(f"removed user {args.name} from {path}")
            return 0
        check_name(args.name)
        password = _read_password(args)
        new = set_password(path, args.name, password)
    except (ValueError, UsersFileError) as exc:
        return _error(str(exc), 2 if isinstance(exc, ValueError) else 1)
    except (EOFError, KeyboardInterrupt):
        return _error("cancelled; nothing changed", 130)
    except OSError as exc:
        return _error(f"{path}: {exc.strerror or exc}")
    print(f"{'added user' if new else 'changed the password of'} {args.name} in {path}")
    return 0
