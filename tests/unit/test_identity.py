"""Who an association acts for: :func:`acl.identity.resolve` as a table over backends,
the ``ae_principals_without_password`` flag and what the peer presents; the warnings
about broad mappings."""

from __future__ import annotations

import hashlib
import textwrap
from typing import Any

import pytest

from acl.identity import (
    AE_TITLE,
    ANONYMOUS,
    CLAIMED,
    NONE,
    REFUSED,
    VERIFIED,
    Certificate,
    bindings,
    broad_mappings,
    resolve,
)
from acl.yamlrules import parse
from archive.config import AePrincipal, Auth

DER = b"pretend-DER-of-the-viewer-certificate"
SHA = hashlib.sha256(DER).hexdigest()
VIEWER_CERT = Certificate.from_der(DER, ((("countryName", "FR"),),
                                         (("commonName", "viewer3"),)))
OTHER_CERT = Certificate("viewer3", "0" * 64)           # same CN, another key
WRONG_CN = Certificate("someone-else", SHA)

MAPPINGS = bindings(Auth(ae_principals={
    "WORKSTATION": AePrincipal("ws", ["127.0.0.1", "10.1.0.0/24"]),
    "VIEWER": AePrincipal("viewer", ["0.0.0.0/0", "::/0"], certificate_cn="viewer3",
                          certificate_sha256=":".join(SHA[i:i + 2] for i in range(0, 64, 2))),
    "V6": AePrincipal("v6", ["2001:db8::/64"]),
}))

# situation: (user, refused, calling AE, address, certificate)
SITUATIONS: dict[str, tuple[str | None, bool, str, str, Certificate | None]] = {
    "user, mapped AE, its address": ("alice", False, "WORKSTATION", "127.0.0.1", None),
    "refused identity, mapped AE, its address": (None, True, "WORKSTATION", "127.0.0.1", None),
    "no identity, mapped AE, its address": (None, False, "WORKSTATION", "127.0.0.1", None),
    "no identity, mapped AE, its network": (None, False, "WORKSTATION", "10.1.0.77", None),
    "no identity, mapped AE padded": (None, False, "WORKSTATION ", "127.0.0.1", None),
    "no identity, mapped AE, v4-mapped v6": (None, False, "WORKSTATION", "::ffff:127.0.0.1",
                                            None),
    "no identity, mapped AE, other address": (None, False, "WORKSTATION", "127.0.0.2", None),
    "no identity, mapped AE, next network": (None, False, "WORKSTATION", "10.1.1.1", None),
    "no identity, unmapped AE": (None, False, "WHOEVER", "127.0.0.1", None),
    "no identity, TLS AE, its certificate": (None, False, "VIEWER", "192.0.2.9", VIEWER_CERT),
    "no identity, TLS AE, no certificate": (None, False, "VIEWER", "192.0.2.9", None),
    "no identity, TLS AE, other key": (None, False, "VIEWER", "192.0.2.9", OTHER_CERT),
    "no identity, TLS AE, other CN": (None, False, "VIEWER", "192.0.2.9", WRONG_CN),
    "no identity, v6 AE, its /64": (None, False, "V6", "2001:db8::42", None),
    "no identity, v6 AE, v4 address": (None, False, "V6", "127.0.0.1", None),
}

USER = "user"  # the user's own name, verified or claimed depending on the backend
ANON = (ANONYMOUS, NONE)

#: situation -> expected (principal, established) for: backend none; backend file/ldap
#: with ae_principals_without_password false; file/ldap with it true.
TABLE: dict[str, tuple[tuple[str, str], tuple[str, str], tuple[str, str]]] = {
    "user, mapped AE, its address": (USER, USER, USER),
    "refused identity, mapped AE, its address": ((ANONYMOUS, REFUSED),) * 3,
    "no identity, mapped AE, its address": (("ws", AE_TITLE), ANON, ("ws", AE_TITLE)),
    "no identity, mapped AE, its network": (("ws", AE_TITLE), ANON, ("ws", AE_TITLE)),
    "no identity, mapped AE padded": (("ws", AE_TITLE), ANON, ("ws", AE_TITLE)),
    "no identity, mapped AE, v4-mapped v6": (("ws", AE_TITLE), ANON, ("ws", AE_TITLE)),
    "no identity, mapped AE, other address": (ANON,) * 3,
    "no identity, mapped AE, next network": (ANON,) * 3,
    "no identity, unmapped AE": (ANON,) * 3,
    "no identity, TLS AE, its certificate": (("viewer", AE_TITLE), ANON,
                                             ("viewer", AE_TITLE)),
    "no identity, TLS AE, no certificate": (ANON,) * 3,
    "no identity, TLS AE, other key": (ANON,) * 3,
    "no identity, TLS AE, other CN": (ANON,) * 3,
    "no identity, v6 AE, its /64": (("v6", AE_TITLE), ANON, ("v6", AE_TITLE)),
    "no identity, v6 AE, v4 address": (ANON,) * 3,
}


def cases() -> list[Any]:
    out = []
    for situation, expected in TABLE.items():
        for backend in ("none", "file", "ldap"):
            for flag in (False, True):
                column = 0 if backend == "none" else (2 if flag else 1)
                want = expected[column]
                if want == USER:
                    want = ("alice", CLAIMED if backend == "none" else VERIFIED)
                out.append(pytest.param(situation, backend, flag, want,
                                        id=f"{situation}-{backend}-{'flag' if flag else 'noflag'}"))
    return out


def test_the_table_covers_every_situation() -> None:
    assert set(TABLE) == set(SITUATIONS)


@pytest.mark.parametrize(("situation", "backend", "flag", "expected"), cases())
def test_resolve(situation: str, backend: str, flag: bool, expected: tuple[str, str]) -> None:
    user, refused, ae, address, certificate = SITUATIONS[situation]
    got = resolve(user=user, refused=refused, backend=backend, ae_title=ae, address=address,
                  certificate=certificate, mappings=MAPPINGS, without_password=flag)
    assert (got.name, got.established) == expected
    assert address in got.basis  # the log line and the audit say from where
    if got.established == NONE and ae.strip() in MAPPINGS:
        assert "AE title" in got.basis  # and why the mapping did not apply


def test_basis_says_why_a_mapping_did_not_apply() -> None:
    def basis(**kw: Any) -> str:
        args: dict[str, Any] = {"user": None, "refused": False, "backend": "file",
                                "ae_title": "WORKSTATION", "address": "127.0.0.2",
                                "certificate": None, "mappings": MAPPINGS,
                                "without_password": True}
        return resolve(**{**args, **kw}).basis

    assert "127.0.0.2 is not in 127.0.0.1/32, 10.1.0.0/24" in basis()
    assert "without a password" in basis(without_password=False, address="127.0.0.1")
    assert "no verified client certificate" in basis(ae_title="VIEWER")
    assert "certificate CN 'someone-else'" in basis(ae_title="VIEWER", certificate=WRONG_CN)
    assert "certificate CN 'viewer3'" in basis(ae_title="VIEWER", certificate=VIEWER_CERT)
    assert "verified by file" in basis(user="alice")


def test_certificate_from_der() -> None:
    assert Certificate("viewer3", SHA) == VIEWER_CERT
    assert Certificate.from_der(b"x").cn == ""


RULES = parse(textwrap.dedent("""\
    rules:
      - {principal: "*", service: "*"}
      - {principal: ws, service: Query}
      - {principal: ws, service: Echo}
      - {principal: modality, service: Store, pattern: {Modality: CT}}
      - {principal: viewer, service: "*", pattern: {Modality: MR}}
    """), "rules.yaml")


def lines(auth: Auth, backend: str = "none", flag: bool = False) -> list[str]:
    return broad_mappings(bindings(auth), RULES, backend, flag)


def test_warnings_about_broad_rights() -> None:
    auth = Auth(ae_principals={"WS": AePrincipal("ws", ["127.0.0.1"]),
                               "CT": AePrincipal("modality", ["192.0.2.21"]),
                               "VIEW": AePrincipal("viewer", ["192.0.2.0/28"])})
    found = lines(auth)
    # an unrestricted Query rule for ws; "*" for viewer even with a pattern; not the
    # "*" principal's rule (it is everyone's, mapped or not); not a pattern-restricted
    # Store; not Echo
    assert found == [
        "auth.ae_principals.WS -> ws: broad rights through rule 2 (ws Query: any dataset, "
        "rules.yaml:3)",
        "auth.ae_principals.VIEW -> viewer: broad rights through rule 5 (viewer *: "
        "Modality=MR, rules.yaml:6)"]


def test_warnings_about_wide_networks_and_inactive_mappings() -> None:
    auth = Auth(ae_principals={"ANY": AePrincipal("modality", ["0.0.0.0/0"]),
                               "NET": AePrincipal("modality", ["10.0.0.0/16", "10.1.0.0/24",
                                                               "2001:db8::/48"]),
                               "OK": AePrincipal("modality", ["192.0.2.21"])})
    found = lines(auth)
    assert found == [
        "auth.ae_principals.ANY -> modality: open to any address (0.0.0.0/0), and no "
        "certificate binding",
        "auth.ae_principals.NET -> modality: a wide network (10.0.0.0/16, 65536 addresses)",
        "auth.ae_principals.NET -> modality: a wide network (2001:db8::/48, "
        "1208925819614629174706176 addresses)"]
    inactive = lines(Auth(ae_principals={"OK": AePrincipal("modality", ["192.0.2.21"])}),
                     "ldap", False)
    assert inactive == ["auth.ae_principals.OK -> modality: inactive, backend ldap needs a "
                        "password (auth.ae_principals_without_password: false)"]
    assert lines(Auth(ae_principals={"OK": AePrincipal("modality", ["192.0.2.21"])}),
                 "ldap", True) == []
