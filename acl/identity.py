"""Who an association acts for, and how that was established (pure functions).

An association's principal comes from one of three places, in this order:

1. its **user identity** (User Identity Negotiation), as the backend accepted it:
   *verified* by ``file`` / ``ldap``, *claimed* with ``none``.  A refused identity
   rejects the association and never falls back to anything below;
2. its **calling AE title**, mapped in ``auth.ae_principals`` - but only from the
   addresses (and, with mutual TLS, the client certificate) the mapping is bound to,
   because anyone can send any AE title.  With a backend that verifies passwords, only
   when ``auth.ae_principals_without_password`` says so;
3. else ``anonymous``.

:func:`resolve` decides from plain values (no network, no clock); the node gathers
them per association (:meth:`archive.dimse.node.Node.principal`).  :func:`broad_mappings`
lists the mappings worth a warning at start: broad rights, wide networks, mappings
the backend makes inactive.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from acl.rules import ANY, QUERY, RETRIEVE, STORE, Rule
from archive.config import AePrincipal, Auth

ANONYMOUS = "anonymous"

#: How a principal was established (the ``established`` field of audit entries);
#: ``bearer-token``: by a DICOMweb bearer token (acl.tokens); ``os-user``: a command
#: run on the archive's machine (the local administrator), named by its OS user.
VERIFIED, CLAIMED, AE_TITLE, NONE, REFUSED, TOKEN, OS_USER = (
    "verified-user", "claimed-user", "ae-title", "anonymous", "refused", "bearer-token",
    "os-user")

#: Backends that verify a passcode: a mapped AE title must not stand in for one.
PASSWORD_BACKENDS = frozenset({"file", "ldap"})

#: Networks wider than these are worth a warning (IPv4 /24: 256 addresses).
WIDE_PREFIX = {4: 24, 6: 64}

#: Attribute of a pynetdicom Association holding its resolved :class:`Principal`.
ATTRIBUTE = "archive_principal"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Principal:
    """Who an association acts for (``name``), how (``established``), on what basis."""

    name: str
    established: str
    basis: str

    def describe(self) -> str:
        return f"{self.name} ({self.basis})"


@dataclass(frozen=True)
class Certificate:
    """What the node saw of a verified client certificate."""

    cn: str
    sha256: str  # lower-case hex, no colons

    @classmethod
    def from_der(cls, der: bytes, subject: Iterable[Iterable[tuple[str, str]]] = ()
                 ) -> Certificate:
        """``subject`` as :meth:`ssl.SSLSocket.getpeercert` gives it."""
        cn = next((value for rdn in subject for key, value in rdn if key == "commonName"), "")
        return cls(cn, hashlib.sha256(der).hexdigest())


@dataclass(frozen=True)
class Binding:
    """One ``auth.ae_principals`` entry, parsed."""

    ae_title: str
    principal: str
    networks: tuple[Network, ...]
    certificate_cn: str = ""
    certificate_sha256: str = ""

    @classmethod
    def from_config(cls, ae_title: str, entry: AePrincipal) -> Binding:
        return cls(ae_title, entry.principal,
                   tuple(ipaddress.ip_network(a, strict=True) for a in entry.addresses),
                   entry.certificate_cn, entry.certificate_sha256.replace(":", "").lower())

    def where(self) -> str:
        text = ", ".join(map(str, self.networks))
        if self.certificate_cn:
            text += f"; certificate CN {self.certificate_cn!r}"
        if self.certificate_sha256:
            text += f"; certificate SHA-256 {self.certificate_sha256[:16]}..."
        return text

    def mismatch(self, address: str, certificate: Certificate | None) -> str | None:
        """Why a peer is not the bound device (None: it is)."""
        peer = parse_address(address)
        if peer is None or not any(peer.version == n.version and peer in n
                                   for n in self.networks):
            return f"{address} is not in {', '.join(map(str, self.networks))}"
        if self.certificate_cn or self.certificate_sha256:
            if certificate is None:
                return "no verified client certificate"
            if self.certificate_cn and certificate.cn != self.certificate_cn:
                return f"certificate CN {certificate.cn!r} is not {self.certificate_cn!r}"
            if self.certificate_sha256 and certificate.sha256 != self.certificate_sha256:
                return f"certificate SHA-256 {certificate.sha256[:16]}... differs"
        return None


def parse_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer address; IPv4-mapped IPv6 (a dual-stack socket) as the IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def bindings(auth: Auth) -> dict[str, Binding]:
    """The configured mappings by AE title (the config is validated already)."""
    return {ae: Binding.from_config(ae, entry) for ae, entry in auth.ae_principals.items()}


def resolve(*, user: str | None, refused: bool, backend: str, ae_title: str, address: str,
            certificate: Certificate | None, mappings: Mapping[str, Binding],
            without_password: bool) -> Principal:
    """The principal of an association.

    ``user``: the identity the backend accepted (None: none sent, or refused);
    ``refused``: an identity was sent and refused (the association is rejected).
    """
    peer = f"{ae_title}@{address}"
    if refused:
        return Principal(ANONYMOUS, REFUSED, f"user identity refused, {peer}")
    if user:
        if backend in PASSWORD_BACKENDS:
            return Principal(user, VERIFIED, f"user verified by {backend}, {peer}")
        return Principal(user, CLAIMED, f"user name as claimed (backend {backend}), {peer}")
    binding = mappings.get(ae_title.strip())
    if binding is None:
        return Principal(ANONYMOUS, NONE, f"no user identity, AE title {ae_title} unmapped, "
                         f"from {address}")
    if backend in PASSWORD_BACKENDS and not without_password:
        return Principal(ANONYMOUS, NONE, f"no user identity; AE title {ae_title} not used "
                         f"without a password (backend {backend}), from {address}")
    why = binding.mismatch(address, certificate)
    if why is not None:
        return Principal(ANONYMOUS, NONE, f"no user identity; AE title {ae_title} from "
                         f"{address} is bound elsewhere: {why}")
    cert = f", certificate CN {certificate.cn!r}" if certificate and (
        binding.certificate_cn or binding.certificate_sha256) else ""
    return Principal(binding.principal, AE_TITLE,
                     f"AE title {ae_title} from {address}{cert}")


# --- warnings at start -------------------------------------------------------------------

_BROAD_SERVICES = (STORE, QUERY, RETRIEVE)


def broad_rights(rules: Iterable[Rule], principal: str) -> list[str]:
    """The rules giving ``principal`` (by name, not through ``*``) a service without a
    pattern, or every service: what an AE-title mapping then hands to a device."""
    found = []
    for rule in rules:
        if rule.principal != principal:
            continue
        if rule.service == ANY or (rule.service in _BROAD_SERVICES and rule.pattern is None):
            found.append(rule.describe())
    return found


def broad_mappings(mappings: Mapping[str, Binding], rules: Iterable[Rule], backend: str,
                   without_password: bool) -> list[str]:
    """One line per mapping that deserves an administrator's second look."""
    rules = tuple(rules)
    lines = []
    for ae, binding in mappings.items():
        head = f"auth.ae_principals.{ae} -> {binding.principal}"
        if backend in PASSWORD_BACKENDS and not without_password:
            lines.append(f"{head}: inactive, backend {backend} needs a password "
                         "(auth.ae_principals_without_password: false)")
        for network in binding.networks:
            if network.prefixlen == 0:
                lines.append(f"{head}: open to any address ({network})"
                             + ("" if binding.certificate_cn or binding.certificate_sha256
                                else ", and no certificate binding"))
            elif network.prefixlen < WIDE_PREFIX[network.version]:
                lines.append(f"{head}: a wide network ({network}, "
                             f"{network.num_addresses} addresses)")
        for rule in broad_rights(rules, binding.principal):
            lines.append(f"{head}: broad rights through {rule}")
    return lines
