"""DICOM User Identity Negotiation (PS3.7 D.3.3.7) on the node's associations: the
EVT_USER_ID handler that asks the backend (:mod:`acl.auth`), the principal each
association acts for, and two patches of pynetdicom's acceptor.

A refused identity rejects the association (A-ASSOCIATE-RJ) and logs one line: who
(calling AE, address), which user, why - never the passcode.  The rejection is
*rejected-permanent* when the credentials are wrong (retrying cannot help) and
*rejected-transient* when the backend could not answer (LDAP unreachable, users file
missing): source "DICOM UL service-provider (ACSE related function)", reason
"no-reason-given" in both cases.  A verified identity becomes the association's
principal (:meth:`archive.dimse.node.Node.principal`) until the association ends; without
one, the principal comes from the calling AE title only where ``auth.ae_principals``
binds it (:mod:`acl.identity`), else it is ``anonymous``.

Two small patches of pynetdicom 3.0 (:func:`install`): it answers a positive User
Identity response only for types 3-5 although the requestor may ask for one with
types 1 and 2 too (the answer then has an empty server response, PS3.7 D.3.3.7.2);
and it always rejects a refused identity as *transient*.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pynetdicom import acse, evt
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import UserIdentityNegotiation

from acl import identity
from acl.auth import (
    IDENTITY_TYPES,
    USERNAME,
    USERNAME_PASSCODE,
    Authenticator,
    Guard,
    Refused,
    valid_username,
)

if TYPE_CHECKING:
    from archive.dimse.common import Serving

log = logging.getLogger("acl.auth")  # the name these lines were always logged under


# --- pynetdicom event handlers ------------------------------------------------------


def _peer(assoc: Any) -> str:
    requestor = assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}:{requestor.port}"


#: Attribute set on a pynetdicom Association whose user identity was refused:
#: True when the refusal is transient (see :func:`install`).
REFUSAL_ATTRIBUTE = "archive_identity_refusal_transient"


def handle_user_id(event: Event, node: Serving) -> tuple[bool, bytes | None]:
    """EVT_USER_ID: verify the identity, remember the principal, or refuse."""
    assoc = event.assoc
    kind = event.user_id_type
    label = IDENTITY_TYPES.get(kind, f"type {kind}")
    shown: str = "?"
    authenticator: Authenticator = node.context.authenticator
    try:
        raw = event.primary_field or b""
        shown = repr(raw[:64].decode("utf-8", "backslashreplace"))
        if kind not in (USERNAME, USERNAME_PASSCODE):
            raise Refused(f"{label} identities are not supported")
        username = valid_username(raw)
        passcode = (event.secondary_field or b"") if kind == USERNAME_PASSCODE else None
        guard: Guard | None = node.context.guard
        if guard is None:
            principal = authenticator.authenticate(username, passcode)
        else:
            principal = guard.authenticate(str(assoc.requestor.address), username,
                                           lambda: authenticator.authenticate(username,
                                                                              passcode))
    except Refused as exc:
        setattr(assoc, REFUSAL_ATTRIBUTE, exc.transient)
        log.warning("authentication refused %s user=%s (%s, backend %s): %s%s",
                    _peer(assoc), shown, label, authenticator.name, exc.reason,
                    " [transient]" if exc.transient else "")
        return False, None
    except Exception as exc:  # noqa: BLE001 - never a traceback with a passcode in it
        setattr(assoc, REFUSAL_ATTRIBUTE, True)
        log.error("authentication refused %s user=%s (%s, backend %s): internal error %s.%s",
                  _peer(assoc), shown, label, authenticator.name, type(exc).__module__,
                  type(exc).__qualname__)
        return False, None
    node.identities[id(assoc)] = principal
    log.info("authenticated %s user=%s (%s, backend %s)", _peer(assoc), shown, label,
             authenticator.name)
    requested = assoc.requestor.user_identity
    return True, (b"" if requested is not None and requested.positive_response_requested
                  else None)


def peer_certificate(assoc: Any) -> identity.Certificate | None:
    """The client certificate of a TLS association, when the node verified one."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        der = sock.getpeercert(binary_form=True)
        info = sock.getpeercert() or {}
    except (ValueError, OSError):  # handshake not done, or the connection is gone
        return None
    if not der:
        return None
    return identity.Certificate.from_der(der, info.get("subject", ()))


def principal_of(assoc: Any, node: Serving) -> identity.Principal:
    """Who an association acts for and how that was established, decided once per
    association (after its user identity was checked) and kept on it."""
    known = getattr(assoc, identity.ATTRIBUTE, None)
    if known is not None:
        return known
    requestor = assoc.requestor
    calling = str(requestor.ae_title).strip()
    context = node.context
    resolved = identity.resolve(
        user=node.identities.get(id(assoc)),
        refused=getattr(assoc, REFUSAL_ATTRIBUTE, None) is not None,
        backend=context.authenticator.name, ae_title=calling, address=str(requestor.address),
        certificate=peer_certificate(assoc) if calling in context.ae_bindings else None,
        mappings=context.ae_bindings,
        without_password=context.cfg.auth.ae_principals_without_password)
    setattr(assoc, identity.ATTRIBUTE, resolved)
    if calling in context.ae_bindings and resolved.established == identity.NONE:
        log.warning("%s: no mapped principal, anonymous (%s)", _peer(assoc), resolved.basis)
    else:
        log.info("%s acts as %s", _peer(assoc), resolved.describe())
    return resolved


def forget_identity(event: Event, node: Serving) -> None:
    """Association over (released, aborted, rejected, connection closed): drop its
    principal, so that a later association reusing the id() cannot inherit it."""
    node.identities.pop(id(event.assoc), None)


def handlers(node: Serving) -> list[tuple[Any, ...]]:
    """Event bindings: the identity check and the clean-up when an association ends."""
    end = (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_REJECTED, evt.EVT_CONN_CLOSE)
    return [(evt.EVT_USER_ID, handle_user_id, [node]),
            *[(event, forget_identity, [node]) for event in end]]


# --- pynetdicom patches -------------------------------------------------------------


def _positive_response(original: Callable[..., Any]) -> Callable[..., Any]:
    def check(self: Any) -> tuple[bool, UserIdentityNegotiation | None]:
        verified, response = original(self)
        request = self.requestor.user_identity
        if (verified and response is None and request is not None
                and request.positive_response_requested
                and request.user_identity_type in (USERNAME, USERNAME_PASSCODE)):
            response = UserIdentityNegotiation()
            response.server_response = b""  # PS3.7 D.3.3.7.2: empty for types 1 and 2
        return verified, response
    check.__wrapped__ = original  # type: ignore[attr-defined]
    return check


def _refusal_result(original: Callable[..., Any]) -> Callable[..., Any]:
    def send_reject(self: Any, result: int, source: int, diagnostic: int) -> None:
        transient = getattr(self.assoc, REFUSAL_ATTRIBUTE, None)
        if transient is not None and (result, source, diagnostic) == (0x02, 0x02, 0x01):
            result = 0x02 if transient else 0x01
        return original(self, result, source, diagnostic)
    send_reject.__wrapped__ = original  # type: ignore[attr-defined]
    return send_reject


def install() -> None:
    """Patch pynetdicom's acceptor once per process (see the module docstring)."""
    patches = (("_check_user_identity", _positive_response),
               ("send_reject", _refusal_result))
    for name, wrap in patches:
        current = getattr(acse.ACSE, name)
        if not hasattr(current, "__wrapped__"):
            setattr(acse.ACSE, name, wrap(current))
