"""The FerretDB patch set (ferretdb/patches/): what each patch guarantees, on a real server.

Each test here fails against a FerretDB built without its patch; to check, build one
(``ferretdb/build /tmp/ferretdb-release none``) and run these tests with
``ARCHIVE_TEST_FERRETDB=/tmp/ferretdb-release``.
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.ferretdb

# --- 01-sqlite-id-index -------------------------------------------------------------


def test_a_lookup_by_id_uses_the_id_index(mongo_db: Any) -> None:
    """Without the patch SQLite scans the whole table for every lookup by _id."""
    mongo_db.docs.insert_many([{"_id": f"doc-{n}", "n": n} for n in range(50)])
    plan = mongo_db.command("explain", {"find": "docs", "filter": {"_id": "doc-7"}})
    details = " ".join(plan["queryPlanner"]["Plan"])
    assert "USING INDEX" in details and "SCAN" not in details, details
    assert mongo_db.docs.find_one({"_id": "doc-7"})["n"] == 7
