"""A private OpenLDAP server (Debian's slapd) for the authentication end-to-end tests.

:class:`Slapd` writes a ``slapd.conf`` (mdb database, suffix ``dc=example,dc=org``) in
a working folder, loads an ``ou=people`` tree offline with ``slapadd`` (passwords hashed
``{SSHA}`` by ``slappasswd``), and runs ``slapd -d 0`` in the foreground on a free
loopback port.  :meth:`Slapd.stop` and :meth:`Slapd.start` may be called again and
again (same port, same data): the tests use them to take the directory away from a
running archive node and bring it back; :meth:`Slapd.pause` / :meth:`Slapd.resume`
(SIGSTOP / SIGCONT) make it a server that accepts connections and never answers.

Only processes this module started are ever signalled, by their own id.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
SLAPPASSWD = shutil.which("slappasswd") or "/usr/sbin/slappasswd"
SCHEMA = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")

SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
BIND_DN_TEMPLATE = f"uid={{username}},{PEOPLE}"


class SlapdError(RuntimeError):
    """slapd could not be set up or started."""


def available() -> bool:
    return all(Path(p).is_file() for p in (SLAPD, SLAPADD, SLAPPASSWD)) and SCHEMA.is_dir()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def escape_rdn_value(value: str) -> str:
    """RFC 4514 escaping, for the test entries' DNs (independent of acl.auth's)."""
    out = "".join("\\" + c if c in '\\",+;<>=' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _ssha(password: str) -> str:
    done = subprocess.run([SLAPPASSWD, "-h", "{SSHA}", "-T", "/dev/stdin"],
                          input=password.encode(), capture_output=True, check=True)
    return done.stdout.decode().strip()


class Slapd:
    """slapd on ``127.0.0.1:<port>`` with ``users`` (uid -> password) under ou=people."""

    def __init__(self, workdir: str | Path, users: Mapping[str, str]) -> None:
        if not available():
            raise SlapdError("slapd, slapadd or slappasswd not installed (apt install slapd)")
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.users = dict(users)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / "slapd.log"
        self.conf = self.workdir / "slapd.conf"
        self._configure()

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def dn(self, uid: str) -> str:
        return f"uid={escape_rdn_value(uid)},{PEOPLE}"

    def _configure(self) -> None:
        db = self.workdir / "db"
        db.mkdir(exist_ok=True)
        schemas = "\n".join(f"include {SCHEMA / name}.schema"
                            for name in ("core", "cosine", "nis", "inetorgperson"))
        self.conf.write_text(f"""{schemas}
pidfile {self.workdir / 'slapd.pid'}
argsfile {self.workdir / 'slapd.args'}
modulepath {MODULES}
moduleload back_mdb
loglevel none

database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "cn=admin,{SUFFIX}"
directory {db}
access to attrs=userPassword by anonymous auth by self read by * none
access to * by * read
""", encoding="utf-8")
        entries = [
            f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
            "dc: example\no: Example\n",
            f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        ]
        for uid, password in self.users.items():
            entries.append(
                f"dn: {self.dn(uid)}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\n"
                f"sn: {uid}\nuserPassword: {_ssha(password)}\n")
        ldif = self.workdir / "people.ldif"
        ldif.write_text("\n".join(entries), encoding="utf-8")
        done = subprocess.run([SLAPADD, "-q", "-f", str(self.conf), "-l", str(ldif)],
                              capture_output=True)
        if done.returncode:
            raise SlapdError(f"slapadd failed: {done.stderr.decode(errors='replace')}")

    def start(self, timeout: float = 10.0) -> Slapd:
        if self.process is not None and self.process.poll() is None:
            return self
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [SLAPD, "-d", "0", "-f", str(self.conf), "-h", f"{self.url}/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SlapdError(f"slapd exited with status {self.process.returncode}: "
                                 + self.log.read_text(errors="replace")[-2000:])
            if port_open(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise SlapdError(f"slapd did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # in case it was paused
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # the port must be free again (a stopped directory refuses connections)
        deadline = time.monotonic() + timeout
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, never answered."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@contextlib.contextmanager
def running_slapd(workdir: str | Path, users: Mapping[str, str]) -> Iterator[Slapd]:
    """``with running_slapd(tmp, {"alice": "pw"}) as ldap: ...`` - stopped on exit."""
    server = Slapd(workdir, users).start()
    try:
        yield server
    finally:
        server.stop()
