"""DICOMweb bearer tokens over the network: issued, listed and revoked by ``archive
token`` (the CLI as a subprocess, on the node's database), used by ``dicomweb-client``
against ``archive serve`` with the real FerretDB.

Users in a file (bcrypt); ``admin`` may do everything, ``alice`` query and retrieve
patient ``ALICE-*`` only, ``carol`` query everything.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import bcrypt
import pytest
import requests
from acl_clients import archive_cli, node_with_users
from conftest import node_environment
from dicomweb_client.api import DICOMwebClient
from helpers import ROOT, image_dataset, stow, to_part10, wait_for

from acl import tokens
from acl.users import write_users

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

PASSWORDS = {"admin": "admin-secret", "alice": "alice-secret", "carol": "carol-secret"}
RULES = """
rules:
  - {principal: admin, service: "*"}
  - {principal: alice, service: Query, pattern: {PatientID: "ALICE-*"}}
  - {principal: alice, service: Retrieve, pattern: {PatientID: "ALICE-*"}}
  - {principal: carol, service: Query}
"""
INVALID = 'Bearer realm="dicom-archive", error="invalid_token"'


@pytest.fixture(scope="module")
def node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return node_with_users(module_node_factory, tmp_path_factory.mktemp("token-users"),
                           PASSWORDS, RULES, {"auth": {"throttle": {
                               "user_failures": 1000, "peer_failures": 1000}}})


@pytest.fixture(scope="module")
def corpus(node: Any) -> dict[str, str]:
    """One study of ALICE-1, one of BOB-1, stored by STOW-RS as admin (Basic)."""
    alice = image_dataset(patient_id="ALICE-1", patient_name="ALICE^A")
    bob = image_dataset(patient_id="BOB-1", patient_name="BOB^B")
    answer = stow(node, [to_part10(ds) for ds in (alice, bob)],
                  auth=("admin", PASSWORDS["admin"]))
    assert answer.status_code == 200, answer.text
    return {"alice": alice.StudyInstanceUID, "bob": bob.StudyInstanceUID}


def issue(node: Any, user: str, *options: str) -> str:
    done = archive_cli(node, "token", "issue", user, *options)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert tokens.parse(token) is not None, done.stdout
    return token


def user_cli(node: Any, *args: str, stdin: str | None = None
             ) -> subprocess.CompletedProcess[str]:
    """``archive --config FILE user ...`` (its actions take no --config of their own)."""
    return subprocess.run([sys.executable, "-m", "archive", "--config", str(node.config_path),
                           "user", *args], capture_output=True, text=True, cwd=ROOT,
                          env=node_environment(), timeout=60, input=stdin)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client(node: Any, token: str) -> DICOMwebClient:
    session = requests.Session()
    session.headers.update(bearer(token))
    return DICOMwebClient(node.http_url, session=session)


def test_a_token_acts_for_its_user_under_her_rules(node: Any, corpus: dict[str, str]
                                                   ) -> None:
    token = issue(node, "alice", "--label", "viewer on ward 3")
    web = client(node, token)
    studies = web.search_for_studies()
    assert [s["0020000D"]["Value"][0] for s in studies] == [corpus["alice"]]
    [instance] = web.retrieve_study(corpus["alice"],
                                    media_types=(("application/dicom", "*"),))
    assert instance.PatientID == "ALICE-1"
    with pytest.raises(requests.HTTPError) as hidden:
        web.retrieve_study(corpus["bob"], media_types=(("application/dicom", "*"),))
    assert hidden.value.response.status_code == 404  # as if it did not exist
    # the secret is stored nowhere, only its salted hash
    token_id, secret = tokens.parse(token).id, tokens.parse(token).secret  # type: ignore
    stored = node.db.tokens.find_one({"_id": token_id})
    assert stored["user"] == "alice" and secret.encode() not in repr(stored).encode()

    def audited() -> Any:
        return node.db.audit.find_one({"event": "QIDO-RS", "principal": "alice",
                                       "established": "bearer-token"})
    entry = wait_for(audited, 10)
    assert token_id in entry["basis"] and "viewer on ward 3" in entry["basis"]
    assert entry["restricted"] and secret not in repr(entry)
    trail = archive_cli(node, "audit", "--user", "alice")
    assert any("QIDO-RS" in line and "established=bearer-token" in line and token_id in line
               for line in trail.stdout.splitlines()), trail.stdout


def test_list_shows_tokens_never_secrets(node: Any, corpus: dict[str, str]) -> None:
    token = issue(node, "carol", "--expires", "2h", "--label", "nightly export")
    assert requests.get(f"{node.http_url}/studies", headers=bearer(token),
                        timeout=30).status_code == 200
    listed = archive_cli(node, "token", "list")
    assert listed.returncode == 0, listed.stderr
    parsed = tokens.parse(token)
    assert parsed is not None and parsed.secret not in listed.stdout
    [line] = [line for line in listed.stdout.splitlines() if parsed.id in line]
    assert "carol" in line and "active" in line and "nightly export" in line
    fields = line.split()
    assert fields[3] != fields[4] and fields[6] != "-"  # expires, last use written


def test_revoked_token_is_refused_at_once(node: Any, corpus: dict[str, str]) -> None:
    token = issue(node, "carol")
    url = f"{node.http_url}/studies"
    assert requests.get(url, headers=bearer(token), timeout=30).status_code == 200
    token_id = tokens.parse(token).id  # type: ignore[union-attr]
    done = archive_cli(node, "token", "revoke", token_id)
    assert done.returncode == 0 and f"revoked token {token_id} of carol" in done.stdout
    refused = requests.get(url, headers=bearer(token), timeout=30)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == INVALID
    again = archive_cli(node, "token", "revoke", token_id)
    assert again.returncode == 0 and "already revoked" in again.stdout
    listed = archive_cli(node, "token", "list", "--json").stdout
    assert '"state": "revoked"' in listed
    unknown = archive_cli(node, "token", "revoke", "0123456789abcdef")
    assert unknown.returncode == 1 and "no token" in unknown.stderr


def test_expired_token_is_refused(node: Any, corpus: dict[str, str]) -> None:
    token = issue(node, "carol", "--expires", "3s")
    url = f"{node.http_url}/studies"
    assert requests.get(url, headers=bearer(token), timeout=30).status_code == 200
    time.sleep(3.2)
    refused = requests.get(url, headers=bearer(token), timeout=30)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == INVALID


def _answer(response: requests.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = sorted((k.lower(), v) for k, v in response.headers.items()
                     if k.lower() != "date")
    return response.status_code, headers, response.content


def test_a_wrong_token_says_nothing_about_why(node: Any, corpus: dict[str, str]) -> None:
    token = issue(node, "alice")
    real = tokens.parse(token)
    assert real is not None
    other = tokens.new_token()
    wrong_secret = tokens.Issued(real.id, other.secret).token  # a real id
    unknown_id = tokens.Issued(other.id, real.secret).token    # a real secret
    url = f"{node.http_url}/studies"
    answers = {name: requests.get(url, headers=bearer(value), timeout=30)
               for name, value in (("wrong secret", wrong_secret),
                                   ("unknown id", unknown_id), ("garbage", "abc"))}
    assert answers["wrong secret"].status_code == 401
    assert _answer(answers["wrong secret"]) == _answer(answers["unknown id"]) \
        == _answer(answers["garbage"])

    def median(value: str) -> float:
        times = []
        for _ in range(15):
            started = time.perf_counter()
            requests.get(url, headers=bearer(value), timeout=30)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    assert abs(median(wrong_secret) - median(unknown_id)) < 0.05
    # the administrator's log and audit trail tell them apart
    log = node.log()
    assert f"wrong secret for token {real.id}" in log and "unknown token id" in log
    refused = wait_for(lambda: node.db.audit.find_one({"event": "HTTP-AUTH-RJ",
                                                       "token": real.id}), 10)
    assert refused["established"] == "refused" and refused["principal"] == "anonymous"
    assert "wrong secret" in refused["comment"] and other.secret not in repr(refused)


def test_a_removed_users_token_is_refused(node: Any, corpus: dict[str, str]) -> None:
    token = issue(node, "carol")
    url = f"{node.http_url}/studies"
    assert requests.get(url, headers=bearer(token), timeout=30).status_code == 200
    removed = user_cli(node, "remove", "carol")
    assert removed.returncode == 0, removed.stderr
    try:
        refused = requests.get(url, headers=bearer(token), timeout=30)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == INVALID
        assert "user 'carol' no longer known to backend file" in node.log()
        # and no token is issued for a user the file does not have
        done = archive_cli(node, "token", "issue", "carol")
        assert done.returncode == 2 and "no user 'carol'" in done.stderr
        assert done.stdout == ""
    finally:
        added = user_cli(node, "add", "carol", "--password-stdin",
                         stdin=PASSWORDS["carol"] + "\n")
        assert added.returncode == 0, added.stderr


def test_issue_refuses_bad_options(node: Any) -> None:
    for options, message in ((["--expires", "soon"], "is not a duration"),
                             (["--expires", "0s"], "longer than 0 seconds"),
                             (["--label", "a\nb"], "--label")):
        done = archive_cli(node, "token", "issue", "alice", *options)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stdout == ""
    done = archive_cli(node, "token", "issue", "anonymous")
    assert done.returncode == 2 and "not a user a token could stand for" in done.stderr


def test_the_database_away_is_503(node_factory: Any, private_ferretdb: Any,
                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    users = tmp_path_factory.mktemp("away-users") / "users.yaml"
    write_users(users, {"carol": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()})
    away = node_factory({"auth": {"backend": "file", "users_file": str(users)},
                         "database": {"timeout_seconds": 1}}, ferret=private_ferretdb)
    token = issue(away, "carol")
    url = f"{away.http_url}/studies"
    assert requests.get(url, headers=bearer(token), timeout=30).status_code == 200
    private_ferretdb.stop()
    answer = requests.get(url, headers=bearer(token), timeout=30)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    # FHIR: the same answer, as an OperationOutcome
    fhir = requests.get(away.http_url.replace("/dicom-web", "/fhir/ImagingStudy"),
                        headers=bearer(token), timeout=30)
    assert fhir.status_code == 503 and fhir.headers["retry-after"] == "5"
    assert fhir.headers["content-type"].startswith("application/fhir+json")
    assert fhir.json()["issue"][0]["code"] == "transient"
    assert away.running
    # the database back: the same token is good again, no restart of the node
    private_ferretdb.start()
    wait_for(lambda: requests.get(url, headers=bearer(token), timeout=30).status_code == 200,
             10, interval=0.2, message="the token accepted again")
