"""pynetdicom clients acting for a user (User Identity, username only), for the access
control end-to-end suites: C-FIND / C-GET / C-MOVE / C-STORE as a given principal, the
archive CLI on a running node's configuration, rules applied in-process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
from helpers import ROOT, identifier, responses_for_the_sender
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from acl.rules import RuleStore
from acl.users import write_users
from acl.yamlrules import parse

FIND = PatientRootQueryRetrieveInformationModelFind
GET = PatientRootQueryRetrieveInformationModelGet
MOVE = PatientRootQueryRetrieveInformationModelMove
REFRESH = 0.2  # acl.refresh_seconds the suites give their nodes


def _identity(user: str | None) -> list[Any]:
    if user is None:
        return []
    item = UserIdentityNegotiation()
    item.user_identity_type = 1
    item.primary_field = user.encode()
    return [item]


@contextlib.contextmanager
def scu(node: Any, user: str | None = None, *, get: bool = False,
        received: list[str] | None = None) -> Iterator[Any]:
    """An association acting for ``user`` (None: anonymous); with ``get`` it also
    accepts C-STORE sub-operations, recording their SOP Instance UIDs in ``received``."""
    ae = AE(ae_title="ACLSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in (Verification, FIND, GET, MOVE, CTImageStorage, MRImageStorage):
        ae.add_requested_context(context)
    roles, handlers = [], []
    if get:
        roles = [build_role(c, scp_role=True) for c in (CTImageStorage, MRImageStorage)]

        def on_store(event: Any) -> int:
            assert received is not None
            received.append(str(event.dataset.SOPInstanceUID))
            return 0x0000
        handlers = [(evt.EVT_C_STORE, on_store)]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                         ext_neg=roles + _identity(user), evt_handlers=handlers)
    assert assoc.is_established
    responses_for_the_sender(assoc)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def find_as(node: Any, level: str, user: str, password: str, **keys: Any) -> list[Dataset]:
    """Study Root C-FIND answers as pynetdicom decodes them, acting for ``user`` with her
    password (User Identity type 2) on an association of its own; asserts success."""
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    item = UserIdentityNegotiation()
    item.user_identity_type = 2
    item.primary_field = user.encode()
    item.secondary_field = password.encode()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=[item])
    assert assoc.is_established
    responses_for_the_sender(assoc)
    found = []
    try:
        for status, answer in assoc.send_c_find(identifier(level, **keys),
                                                StudyRootQueryRetrieveInformationModelFind):
            assert status.Status in (0xFF00, 0x0000), hex(status.Status)
            if status.Status == 0xFF00:
                found.append(answer)
    finally:
        assoc.release()
        ae.shutdown()
    return found


def c_find(assoc: Any, level: str, **keys: Any) -> tuple[int, list[Dataset], Dataset]:
    """(final status, matches, final status dataset) of one C-FIND."""
    matches, final = [], Dataset()
    for status, found in assoc.send_c_find(identifier(level, **keys), FIND):
        if status.Status == 0xFF00:
            matches.append(found)
        else:
            final = status
    return int(final.Status), matches, final


def by_key(matches: list[Dataset], key: str, *values: str) -> dict[str, dict[str, Any]]:
    """Matches by ``key``, each as {keyword: value as text or sorted list}."""
    result = {}
    for ds in matches:
        row = {}
        for keyword in values:
            value = ds[keyword].value
            if keyword.endswith("InStudy"):
                value = sorted([value] if isinstance(value, str) else (value or []))
            row[keyword] = value if isinstance(value, list) else str(value)
        result[str(ds[key].value)] = row
    return result


def c_get(node: Any, user: str, level: str, **keys: Any) -> tuple[int, int, list[str]]:
    """(final status, completed sub-operations, SOP Instance UIDs received)."""
    received: list[str] = []
    final = Dataset()
    with scu(node, user, get=True, received=received) as assoc:
        for status, _ in assoc.send_c_get(identifier(level, **keys), GET):
            final = status
    return int(final.Status), int(final.get("NumberOfCompletedSuboperations", 0)), received


def c_get_final(node: Any, user: str, level: str,
                **keys: Any) -> tuple[int, str, int, list[str]]:
    """(final status, its Error Comment, completed sub-operations, UIDs received)."""
    received: list[str] = []
    final = Dataset()
    with scu(node, user, get=True, received=received) as assoc:
        for status, _ in assoc.send_c_get(identifier(level, **keys), GET):
            final = status
    return (int(final.Status), str(final.get("ErrorComment", "")),
            int(final.get("NumberOfCompletedSuboperations", 0)), received)


def c_move(node: Any, user: str, destination: str, level: str,
           **keys: Any) -> tuple[int, int]:
    final = Dataset()
    with scu(node, user) as assoc:
        for status, _ in assoc.send_c_move(identifier(level, **keys), destination, MOVE):
            final = status
    return int(final.Status), int(final.get("NumberOfCompletedSuboperations", 0))


def archive_cli(node: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "archive", *args, "--config",
                           str(node.config_path)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60, input=stdin)


def node_with_users(factory: Any, folder: Path, passwords: dict[str, str], rules: str,
                    overrides: dict[str, Any] | None = None) -> Any:
    """A node with access control on, users in a file (bcrypt, cheap rounds) checked by
    the ``file`` backend, and ``rules`` applied; ``overrides``: more configuration."""
    users = folder / "users.yaml"
    write_users(users, {name: bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()
                        for name, p in passwords.items()})
    config: dict[str, Any] = {"acl": {"enabled": True, "refresh_seconds": REFRESH},
                              "auth": {"backend": "file", "users_file": str(users)}}
    for key, value in (overrides or {}).items():
        config[key] = {**config.get(key, {}), **value}
    node = factory(config)
    use_rules(node, rules)
    return node


def use_rules(node: Any, text: str) -> None:
    """Apply rules in-process (the CLI has tests of its own) and wait for the node."""
    RuleStore(node.db).apply(parse(textwrap.dedent(text), "test"), "test")
    time.sleep(REFRESH * 2.5)
