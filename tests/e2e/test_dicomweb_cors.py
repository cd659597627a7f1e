"""CORS for DICOMweb (``http.cors``) over the network: ``archive serve`` with the real
FerretDB, a browser's preflight and requests imitated with the headers a browser sends
(an OHIF of another origin): the allowed origin may read what a DICOMweb client reads,
a foreign one gets no permission, a preflight needs no credentials."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from acl_clients import archive_cli, use_rules
from helpers import image_dataset, stow, to_part10

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

VIEWER = "http://viewer.example:3000"


@pytest.fixture(scope="module")
def cors_node(module_node_factory: Any) -> Any:
    node = module_node_factory({
        "acl": {"enabled": True, "refresh_seconds": 0.2},
        "auth": {"backend": "none"},
        "http": {"cors": {"allow_origins": [VIEWER]}}})
    files = [to_part10(image_dataset(patient_id=f"CORS-{n}")) for n in range(2)]
    use_rules(node, """
rules:
  - {principal: viewer, service: Query}
  - {principal: viewer, service: Retrieve}
  - {principal: loader, service: Store}
""")
    stored = stow(node, files, auth=("loader", "x"))
    assert stored.status_code == 200, stored.text
    return node


def _preflight(node: Any, origin: str) -> httpx.Response:
    return httpx.options(f"{node.http_url}/studies", headers={
        "Origin": origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, accept"}, timeout=30)


def test_preflight_from_the_allowed_origin_needs_no_credentials(cors_node: Any) -> None:
    answer = _preflight(cors_node, VIEWER)
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == VIEWER
    allowed = answer.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "accept" in allowed
    assert "prefer" in allowed  # FHIR's Prefer: handling=lenient
    assert "GET" in answer.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in answer.headers  # not configured


def test_requests_from_the_allowed_origin_may_read_what_a_client_reads(
        cors_node: Any) -> None:
    token = archive_cli(cors_node, "token", "issue", "viewer").stdout.strip()
    answer = httpx.get(f"{cors_node.http_url}/studies", params={"limit": "1"},
                       headers={"Origin": VIEWER, "Authorization": f"Bearer {token}"},
                       timeout=30)
    assert answer.status_code == 200 and len(answer.json()) == 1
    assert answer.headers["access-control-allow-origin"] == VIEWER
    assert answer.headers["warning"].startswith("299")  # more results: the client reads it
    exposed = {h.strip().lower() for h in
               answer.headers["access-control-expose-headers"].split(",")}
    assert {"content-type", "warning", "content-location"} <= exposed
    # a refusal is readable too: the viewer can tell a bad token from a network error
    refused = httpx.get(f"{cors_node.http_url}/studies",
                        headers={"Origin": VIEWER, "Authorization": "Bearer nope"},
                        timeout=30)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == VIEWER


def test_a_foreign_origin_gets_no_permission(cors_node: Any) -> None:
    foreign = "https://evil.example"
    assert "access-control-allow-origin" not in _preflight(cors_node, foreign).headers
    answer = httpx.get(f"{cors_node.http_url}/studies", auth=("viewer", "x"),
                       headers={"Origin": foreign}, timeout=30)
    assert answer.status_code == 200  # the server answers; the browser hides it
    assert "access-control-allow-origin" not in answer.headers
