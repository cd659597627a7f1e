"""Configuration: one YAML file, a few environment overrides, strict validation.

Every error names the key at fault and the CLI exits with status 2: an administrator
should never have to read a traceback to find a typo in the configuration.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from pydicom.uid import UID
from pymongo import uri_parser
from pymongo.errors import ConfigurationError as PyMongoConfigurationError
from pymongo.errors import InvalidURI

from archive import yamlfile

DEFAULT_PATH = Path("config/archive.yaml")


class ConfigError(Exception):
    """A configuration problem, with a message that names the key."""


@dataclass
class Destination:
    """A C-MOVE destination: where the archive opens the sub-association."""

    host: str
    port: int
    tls: bool = False


@dataclass
class EmbeddedDatabase:
    """The FerretDB server the node starts itself (SQLite handler, loopback only)."""

    enabled: bool = True
    binary: str = ".tools/bin/ferretdb"
    data_dir: str = "data/ferretdb"
    port: int = 27017
    #: Wait before restarting a FerretDB that exited while the node runs; doubles while
    #: it keeps failing (up to 60 s).
    restart_delay_seconds: float = 1.0
    #: The process that starts FerretDB keeps the lower half of its CPUs and runs
    #: FerretDB on the upper half (archive.ferretdb: the two hand each store back and
    #: forth).
    separate_cpus: bool = True


@dataclass
class Database:
    uri: str = "mongodb://127.0.0.1:27017/"
    name: str = "archive"
    gridfs_bucket: str = "fs"
    timeout_seconds: float = 5.0
    embedded: EmbeddedDatabase = field(default_factory=EmbeddedDatabase)


@dataclass
class Accept:
    """What C-STORE accepts: SOP classes and transfer syntaxes."""

    sop_classes: list[str] | str = "all"
    unknown_sop_classes: bool = False
    transfer_syntaxes: list[str] | str = "all"


@dataclass
class Query:
    pn_case_insensitive: bool = True
    combined_datetime: bool = True


@dataclass
class TLS:
    certificate: str = ""
    private_key: str = ""
    ca_certificate: str = ""


@dataclass
class Ldap:
    url: str = "ldap://127.0.0.1:389"
    bind_dn_template: str = "uid={username},ou=people,dc=example,dc=org"
    timeout_seconds: float = 5.0


@dataclass
class AePrincipal:
    """The principal of a calling AE title, granted only to the device where it is:
    an AE title alone is not a credential (anyone may send any title)."""

    principal: str
    #: Peer addresses or networks (CIDR) the title is accepted from.
    addresses: list[str] = field(default_factory=list)
    #: With mutual TLS: the client certificate's subject CN, and/or its SHA-256.
    certificate_cn: str = ""
    certificate_sha256: str = ""

    @staticmethod
    def not_a_mapping(value: Any) -> str:
        """The message for today's plain form ``{AE: principal}``."""
        return (f"an AE title alone is not a credential; bind it to the device: "
                f"{{principal: {value}, addresses: [192.0.2.10]}} (see README, Access "
                "control)")


@dataclass
class Throttle:
    """Limits on wrong passcodes (acl.throttle): per peer address and per user name,
    with back-off; attempts in a back-off are refused without checking."""

    enabled: bool = True
    peer_failures: int = 10          # failures one address may make before back-off
    user_failures: int = 5           # failures on one user name, from unknown addresses
    backoff_seconds: float = 1.0     # first back-off; doubles with each further failure
    max_backoff_seconds: float = 300.0
    forgive_seconds: float = 60.0    # one failure forgotten per this many seconds
    concurrent_checks: int = 1       # password checks running at once (bcrypt: 1 core)
    check_wait_seconds: float = 5.0  # longest wait for a check slot: then transient


@dataclass
class Auth:
    backend: str = "none"
    users_file: str = "config/users.yaml"
    ldap: Ldap = field(default_factory=Ldap)
    ae_principals: dict[str, AePrincipal] = field(default_factory=dict)
    #: With a backend that verifies passwords (file, ldap): may an association without
    #: a user identity act as its AE title's principal?  Off: it is anonymous.
    ae_principals_without_password: bool = False
    throttle: Throttle = field(default_factory=Throttle)


@dataclass
class Acl:
    """Access rules (``python -m archive acl``): deny unless a rule allows."""

    enabled: bool = True
    refresh_seconds: float = 1.0  # how often a node re-reads the active ruleset
    #: Rules a node applies on its first start, when the database has never had a
    #: ruleset (so a new archive is usable as shipped); "" to start with none.
    initial_rules: str = "config/acl.yaml"


@dataclass
class Connections:
    """What one peer (IP address) may hold, and for how long (``archive.dimse.connections``).

    ``*_per_peer`` count connections from one IP address: those still waiting for their
    A-ASSOCIATE-RQ (pending) and associations.  Timeouts are seconds: ``request_timeout``
    from the TCP connection (TLS handshake included) to a complete A-ASSOCIATE-RQ;
    ``acse_timeout`` for negotiation and release; ``dimse_timeout`` between two PDUs of
    one DIMSE message, or for one PDU to arrive whole; ``network_timeout`` while an
    association has no message in progress, or the peer does not take a PDU.
    """

    associations_per_peer: int = 4
    pending_per_peer: int = 4
    max_pending: int = 20
    request_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0


@dataclass
class Receive:
    """How C-STORE datasets arrive (``archive.dimse.receiving``): large ones into a file.

    Datasets up to ``in_memory_max_mb`` MiB (as Part-10 files) are received and stored
    in memory, as before; so are files ``archive import`` reads.  A larger one goes to a
    file of ``folder`` as it arrives and is stored from there, in memory near one
    instance's metadata whatever its size, and faster (2 MiB: 4.0 ms of CPU instead of
    7.9; 8 MiB: 6.8 instead of 22.6).  In memory, a 130 KiB MR costs 0.5 ms less than
    from a file, a 520 KiB CT the same, and no file is made (0.5 ms more).  What a crash
    leaves in ``folder`` is deleted at the next start.
    """

    folder: str = "data/incoming"
    in_memory_max_mb: float = 1.0

    @property
    def in_memory_max_bytes(self) -> int:
        return int(self.in_memory_max_mb * 1024 * 1024)


@dataclass
class HttpTls:
    """HTTPS for DICOMweb: the PEM certificate (chain) and its private key, named as
    the DICOM port's ``tls:``; no certificate: plain HTTP."""

    certificate: str = ""
    private_key: str = ""


@dataclass
class Cors:
    """CORS for viewers served from another origin (OHIF elsewhere): the origins a
    browser may let read the answers; none (the default): no CORS header at all."""

    allow_origins: list[str] = field(default_factory=list)
    #: Whether a browser may send its own credentials (a Basic login it remembers) on
    #: cross-origin requests; a bearer token set by the viewer needs no such thing.
    allow_credentials: bool = False


@dataclass
class StorageCommitment:
    """Storage Commitment Push Model (``archive.dimse.commitment``): how the report of a
    request reaches a modality that released the association it asked on.

    The report then goes on a new association to the requester's AE title in
    ``destinations:``; a failed attempt is retried ``retry_seconds`` later, ``attempts``
    times in all, then given up (logged, and kept in the audit trail).
    """

    attempts: int = 4
    retry_seconds: float = 30.0


@dataclass
class Http:
    """DICOMweb (``archive.web``): served by ``archive serve`` beside the DICOM port, on
    the same address, under ``/dicom-web``."""

    enabled: bool = True
    port: int = 8080
    #: Most answers a QIDO-RS request gets, whatever its ``limit``.
    max_results: int = 10_000
    #: The service's root as clients reach it (behind a reverse proxy:
    #: ``https://pacs.example.org/dicom-web``): the base of the URLs in answers
    #: (RetrieveURL, BulkDataURI).  Empty: taken from each request.
    public_url: str = ""
    #: The UTC offset (``+01:00``) of the DICOM dates and times the archive holds (the
    #: modalities' zone): FHIR's ``started`` then carries StudyTime, which FHIR allows
    #: only with a zone.  Empty: dates alone.
    fhir_timezone: str = ""
    tls: HttpTls = field(default_factory=HttpTls)
    cors: Cors = field(default_factory=Cors)
    #: The web console (``archive.web.console``) at ``/`` on this port; false: DICOMweb only.
    console: bool = True
    #: The web console's "open in viewer" link: a viewer's URL with the placeholder
    #: ``{StudyInstanceUID}`` (OHIF: ``http://127.0.0.1:3000/viewer?StudyInstanceUIDs=
    #: {StudyInstanceUID}``).  Empty: no link.
    viewer_url: str = ""
    #: Connections held at once, by everyone and by one IP address; seconds a connection
    #: may take to send a request head; bytes a second a request body must come at,
    #: after ``request_timeout`` seconds of grace (``archive.web.guard``).
    max_connections: int = 512
    connections_per_peer: int = 64
    request_timeout: float = 30.0
    min_body_rate: float = 1024.0


#: Bounds of ``max_pdu_length``: a PDU is read whole into memory (one per association
#: at a time), and the node closes a connection announcing a longer one.
PDU_LENGTH_BOUNDS = (4096, 1 << 20)

#: Largest ``receive.in_memory_max_mb``: beyond, a dataset held in memory costs the node
#: several times its size (the issue this setting answers).
MAX_IN_MEMORY_MB = 1024.0


@dataclass
class Config:
    ae_title: str = "ARCHIVE"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 10
    #: The Maximum Length Received the node announces (PS3.8 D.1): the largest P-DATA
    #: PDU a sender may put a dataset in.  Every PDU costs pynetdicom the same work
    #: whatever its size: at pynetdicom's 16,382 bytes a CT slice comes in 32 of them.
    max_pdu_length: int = 131_072
    log_level: str = "INFO"
    duplicate_policy: str = "replace"
    #: A study (or series) of another patient, or a SOP Instance UID re-sent under
    #: another patient: refuse (0xC409) or accept (the study then holds both).
    hierarchy_conflicts: str = "refuse"
    journal: str = "data/journal"
    #: New instances of a series this node knows update their series, study and patient
    #: documents in batches written at least this often (and before any query on this
    #: node); 0: one update per level per instance.
    write_behind_seconds: float = 0.2
    #: At start, besides finishing what the journal names: "full" also runs
    #: ``archive check --repair`` in the background (damage a lost journal left).
    startup_check: str = "journal"
    receive: Receive = field(default_factory=Receive)
    database: Database = field(default_factory=Database)
    accept: Accept = field(default_factory=Accept)
    query: Query = field(default_factory=Query)
    destinations: dict[str, Destination] = field(default_factory=dict)
    storage_commitment: StorageCommitment = field(default_factory=StorageCommitment)
    auth: Auth = field(default_factory=Auth)
    acl: Acl = field(default_factory=Acl)
    tls: TLS = field(default_factory=TLS)
    connections: Connections = field(default_factory=Connections)
    http: Http = field(default_factory=Http)


#: Environment variable -> dotted key it overrides.
ENVIRONMENT = {
    "ARCHIVE_MONGO_URI": "database.uri",
    "ARCHIVE_DATABASE": "database.name",
    "ARCHIVE_PORT": "port",
    "ARCHIVE_AE_TITLE": "ae_title",
    "ARCHIVE_BIND_ADDRESS": "bind_address",
    "ARCHIVE_EMBEDDED_DATABASE": "database.embedded.enabled",
    "ARCHIVE_LOG_LEVEL": "log_level",
    "ARCHIVE_HTTP_PORT": "http.port",
}

_CHOICES = {
    "duplicate_policy": ("replace", "keep", "reject"),
    "hierarchy_conflicts": ("refuse", "accept"),
    "startup_check": ("journal", "full"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "auth.backend": ("none", "file", "ldap"),
}


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, building nested dataclasses."""
    origin = get_origin(hint)
    if is_dataclass(hint):
        if not isinstance(value, dict):
            explain = getattr(hint, "not_a_mapping", None)
            if explain is not None and value is not None:
                raise ConfigError(f"{key}: {explain(value)}")
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, value_hint = get_args(hint)
        return {str(k): _convert(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings")
        return value
    if origin is not None:  # a union such as list[str] | str
        for option in get_args(hint):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected 'all' or a list of UIDs, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or isinstance(value, bool) and hint is not bool:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for name in data:
        if name not in known:
            raise ConfigError(f"{prefix}{name}: unknown key (known: {', '.join(sorted(known))})")
    values = {name: _convert(data[name], hints[name], prefix + name) for name in data}
    try:
        return cls(**values)
    except TypeError as exc:  # a required key (e.g. destination port) missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{dotted}: cannot override, the file has a non-mapping here")
    value: Any = raw
    if parts[-1] == "port":
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{dotted}: expected int, got {raw!r} from the environment") from None
    elif parts[-1] == "enabled":
        value = raw.strip().lower() in ("1", "true", "yes", "on")
    data[parts[-1]] = value


def _validate(cfg: Config) -> None:
    for dotted, choices in _CHOICES.items():
        obj: Any = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj not in choices:
            raise ConfigError(f"{dotted}: {obj!r} is not one of {', '.join(choices)}")
    if not 0 < len(cfg.ae_title.strip()) <= 16:
        raise ConfigError(f"ae_title: {cfg.ae_title!r} must have 1 to 16 characters")
    ports = {"port": cfg.port, "database.embedded.port": cfg.database.embedded.port,
             "http.port": cfg.http.port}
    ports.update({f"destinations.{ae}.port": d.port for ae, d in cfg.destinations.items()})
    for key, port in ports.items():
        if not 0 < port < 65536:
            raise ConfigError(f"{key}: {port} is not a TCP port")
    for ae in cfg.destinations:
        if not 0 < len(ae) <= 16:
            raise ConfigError(f"destinations.{ae}: an AE title has 1 to 16 characters")
    if not 1 <= cfg.storage_commitment.attempts <= 100:
        raise ConfigError("storage_commitment.attempts: must be between 1 and 100")
    if not 0 < cfg.storage_commitment.retry_seconds <= 3600:
        raise ConfigError("storage_commitment.retry_seconds: must be above 0 and at most 3600")
    if cfg.http.enabled and cfg.http.port == cfg.port:
        raise ConfigError(f"http.port: {cfg.http.port} is the DICOM port too")
    if cfg.http.max_results < 1:
        raise ConfigError("http.max_results: must be at least 1")
    _validate_http(cfg.http)
    if not 0 <= cfg.write_behind_seconds <= 60:
        raise ConfigError("write_behind_seconds: must be between 0 and 60")
    if not cfg.receive.folder.strip():
        raise ConfigError("receive.folder: a folder is needed (e.g. data/incoming)")
    if not 0 <= cfg.receive.in_memory_max_mb <= MAX_IN_MEMORY_MB:
        raise ConfigError(f"receive.in_memory_max_mb: must be between 0 (every dataset "
                          f"from its file) and {MAX_IN_MEMORY_MB:.0f}")
    if cfg.max_associations < 1:
        raise ConfigError("max_associations: must be at least 1")
    least, most = PDU_LENGTH_BOUNDS
    if not least <= cfg.max_pdu_length <= most:
        raise ConfigError(f"max_pdu_length: must be between {least} and {most} bytes")
    _validate_connections(cfg.connections, cfg.max_associations)
    if cfg.database.timeout_seconds <= 0:
        raise ConfigError("database.timeout_seconds: must be positive")
    if not 0 < cfg.database.embedded.restart_delay_seconds <= 60:
        raise ConfigError("database.embedded.restart_delay_seconds: must be above 0 and "
                          "at most 60")
    _validate_database(cfg.database)
    if not 0 < cfg.acl.refresh_seconds <= 60:
        raise ConfigError("acl.refresh_seconds: must be above 0 and at most 60")
    _validate_auth(cfg)
    for key in ("sop_classes", "transfer_syntaxes"):
        value = getattr(cfg.accept, key)
        if isinstance(value, str) and value != "all":
            raise ConfigError(f"accept.{key}: expected 'all' or a list of UIDs, got {value!r}")
        if isinstance(value, list):
            bad = [uid for uid in value if not UID(uid).is_valid]
            if bad or not value:
                raise ConfigError(f"accept.{key}: not UIDs: {bad}" if bad else
                                  f"accept.{key}: an empty list accepts nothing")


_SHA256 = re.compile(r"[0-9a-f]{64}")
#: An origin as a browser sends it: scheme, host, optional port; nothing else.
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def _validate_http(http: Http) -> None:
    """A key needs its certificate; origins are origins; credentials need named ones;
    the public URL is an http(s) URL, the viewer's one too, with its placeholder;
    connection limits are positive."""
    if http.max_connections < 1 or http.connections_per_peer < 1:
        raise ConfigError("http.max_connections, http.connections_per_peer: must be at "
                          "least 1")
    if http.connections_per_peer > http.max_connections:
        raise ConfigError(f"http.connections_per_peer ({http.connections_per_peer}) is more "
                          f"than http.max_connections ({http.max_connections})")
    if not 0 < http.request_timeout <= 3600:
        raise ConfigError("http.request_timeout: must be above 0 and at most 3600 seconds")
    if not 0 < http.min_body_rate <= 1e9:
        raise ConfigError("http.min_body_rate: must be above 0 and at most 1e9 bytes a second")
    if http.public_url and not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?",
                                            http.public_url):
        raise ConfigError(f"http.public_url: {http.public_url!r} is not an http(s) URL")
    if http.fhir_timezone and not re.fullmatch(r"[+-](0\d|1[0-3]):[0-5]\d|[+-]14:00",
                                               http.fhir_timezone):
        raise ConfigError(f"http.fhir_timezone: {http.fhir_timezone!r} is not a UTC offset "
                          "(+HH:MM or -HH:MM, at most 14:00)")
    if http.tls.private_key and not http.tls.certificate:
        raise ConfigError("http.tls.private_key: given without http.tls.certificate")
    if http.viewer_url and not (re.fullmatch(r"https?://[^\s]+", http.viewer_url)
                                and "{StudyInstanceUID}" in http.viewer_url):
        raise ConfigError(f"http.viewer_url: {http.viewer_url!r} is not an http(s) URL "
                          "with the placeholder {StudyInstanceUID}")
    for origin in http.cors.allow_origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(f"http.cors.allow_origins: {origin!r} is not an origin "
                              "(scheme://host[:port], no path, no trailing slash; or '*')")
    if http.cors.allow_credentials and "*" in http.cors.allow_origins:
        raise ConfigError("http.cors.allow_credentials: not with allow_origins '*' (any web "
                          "site could then act with the browser's credentials): list the "
                          "viewers' origins")


def _validate_auth(cfg: Config) -> None:
    """AE-title principals bound to addresses (and certificates); throttle limits."""
    for ae, binding in cfg.auth.ae_principals.items():
        key = f"auth.ae_principals.{ae}"
        if not 0 < len(ae.strip()) <= 16 or ae != ae.strip() or "\\" in ae:
            raise ConfigError(f"{key}: an AE title has 1 to 16 characters, no backslash, "
                              "no leading or trailing space")
        if not binding.principal.strip() or binding.principal == "*":
            raise ConfigError(f"{key}.principal: a user name is needed ('*' is not one)")
        if not binding.addresses:
            raise ConfigError(f"{key}.addresses: list the device's addresses or networks, "
                              "e.g. [192.0.2.10, 198.51.100.0/28] (0.0.0.0/0 and ::/0 for "
                              "any address)")
        for address in binding.addresses:
            try:
                ipaddress.ip_network(address, strict=True)
            except ValueError:
                raise ConfigError(f"{key}.addresses: {address!r} is not an IP address or "
                                  "network (192.0.2.10, 192.0.2.0/24, 2001:db8::/64)") from None
        fingerprint = binding.certificate_sha256.replace(":", "").lower()
        if binding.certificate_sha256 and not _SHA256.fullmatch(fingerprint):
            raise ConfigError(f"{key}.certificate_sha256: expected 64 hexadecimal digits "
                              "(colons allowed)")
        if (binding.certificate_cn or binding.certificate_sha256) and not (
                cfg.tls.certificate and cfg.tls.ca_certificate):
            raise ConfigError(f"{key}: a certificate binding needs mutual TLS "
                              "(tls.certificate and tls.ca_certificate)")
    t = cfg.auth.throttle
    for name in ("peer_failures", "user_failures", "concurrent_checks"):
        if getattr(t, name) < 1:
            raise ConfigError(f"auth.throttle.{name}: must be at least 1")
    for name in ("backoff_seconds", "forgive_seconds", "check_wait_seconds"):
        if not getattr(t, name) > 0:
            raise ConfigError(f"auth.throttle.{name}: must be positive")
    if t.max_backoff_seconds < t.backoff_seconds:
        raise ConfigError("auth.throttle.max_backoff_seconds: must be at least backoff_seconds")


#: Longest timeout accepted: a day (anything longer is a typo, or no timeout at all).
MAX_TIMEOUT = 86400.0


def _validate_connections(connections: Connections, max_associations: int) -> None:
    """Limits of at least 1 that fit inside the global ones; timeouts above 0."""
    for key in ("associations_per_peer", "pending_per_peer", "max_pending"):
        if getattr(connections, key) < 1:
            raise ConfigError(f"connections.{key}: must be at least 1")
    if connections.associations_per_peer > max_associations:
        raise ConfigError(f"connections.associations_per_peer: "
                          f"{connections.associations_per_peer} is more than max_associations "
                          f"({max_associations}): set it to {max_associations} or less")
    if connections.pending_per_peer > connections.max_pending:
        raise ConfigError(f"connections.pending_per_peer: {connections.pending_per_peer} is "
                          f"more than connections.max_pending ({connections.max_pending})")
    for key in ("request_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        value = getattr(connections, key)
        if not 0 < value <= MAX_TIMEOUT:
            raise ConfigError(f"connections.{key}: {value!r} must be above 0 and at most "
                              f"{MAX_TIMEOUT:.0f} seconds")


def _validate_database(database: Database) -> None:
    """A URI pymongo can use and a name MongoDB accepts, checked before connecting."""
    if not database.uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(f"database.uri: {database.uri!r} must start with mongodb:// "
                          "or mongodb+srv://")
    if database.uri.startswith("mongodb://"):
        try:
            uri_parser.parse_uri(database.uri)
        except (InvalidURI, PyMongoConfigurationError, ValueError) as exc:
            raise ConfigError(f"database.uri: {database.uri!r} is not usable ({exc})") from None
    name = database.name
    if not name or len(name) > 63 or any(c in name for c in '/\\. "$\0'):
        raise ConfigError(f"database.name: {name!r} is not a MongoDB database name "
                          "(1 to 63 characters, none of / \\ . space \" $)")


def display_uri(uri: str) -> str:
    """The database URI as logs and messages may show it: any password replaced."""
    return re.sub(r"^(mongodb(?:\+srv)?://[^:@/?]*):[^@/?]*@", r"\1:***@", uri)


def load(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read, override from the environment, and validate the configuration."""
    environ = os.environ if environ is None else environ
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yamlfile.safe_load(text) or {}
    except yamlfile.YamlLimitError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yamlfile.describe(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for variable, dotted in ENVIRONMENT.items():
        if variable in environ:
            _set_dotted(data, dotted, environ[variable])
    cfg = _build(Config, data)
    _validate(cfg)
    return cfg
