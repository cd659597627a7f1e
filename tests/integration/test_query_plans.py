"""The archive's queries and retrieves search an index on the embedded FerretDB.

Each C-FIND and retrieve is one find on its level's collection (``archive.find``);
with FerretDB patch 05 the conditions on indexed fields reach SQLite, whose plan
(``explain``) must search an index, never scan the table: a scan makes the query's
cost grow with the archive.  The answers themselves are checked over the network in
tests/e2e/test_find.py and test_retrieve.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import FerretDB, unique_name
from helpers import identifier, make_dataset, to_part10

from archive.find import retrieve_plan, search_plan
from archive.model import COLLECTION, IMAGE
from archive.query import translate
from archive.storage import Archive, ensure_indexes

pytestmark = pytest.mark.ferretdb

STUDY, SERIES = "1.2.826.0.1.3680043.10.2024.77", "1.2.826.0.1.3680043.10.2024.77.1"
SOPS = [f"{SERIES}.{n}" for n in range(1, 4)]


@pytest.fixture(scope="module")
def db(ferretdb: FerretDB, tmp_path_factory: pytest.TempPathFactory) -> Any:
    name = unique_name("plans")
    database = ferretdb.client[name]
    ensure_indexes(database)
    archive = Archive(database, journal=tmp_path_factory.mktemp("journal"))
    for sop in SOPS:
        ds = make_dataset(patient_id="PLAN-1", patient_name="PLAN^ONE", study_uid=STUDY,
                          series_uid=SERIES, sop_uid=sop, StudyDate="20240102",
                          AccessionNumber="ACC77")
        assert archive.store(to_part10(ds)).ok
    yield database
    ferretdb.client.drop_database(name)


def searched(db: Any, level: str, pre_filter: dict[str, Any]) -> str:
    """SQLite's plan for a find of ``pre_filter`` on the level's collection."""
    result = db.command("explain", {"find": COLLECTION[level], "filter": pre_filter})
    return " | ".join(str(p).split("detail=")[-1]
                      for p in result["queryPlanner"].get("Plan", []))


C_FIND = [
    ("patient by ID", "PATIENT", {"PatientID": "PLAN-1", "PatientName": ""}),
    ("studies by name prefix", "STUDY", {"PatientName": "PLAN*", "StudyInstanceUID": ""}),
    ("studies by date range", "STUDY", {"StudyDate": "20240101-20240131",
                                        "StudyInstanceUID": ""}),
    ("studies by accession", "STUDY", {"AccessionNumber": "ACC77", "StudyInstanceUID": ""}),
    ("studies by modality", "STUDY", {"ModalitiesInStudy": "CT", "StudyInstanceUID": ""}),
    ("studies of a patient", "STUDY", {"PatientID": "PLAN-1", "StudyInstanceUID": ""}),
    ("series of a study", "SERIES", {"StudyInstanceUID": STUDY, "SeriesInstanceUID": "",
                                     "Modality": ""}),
    ("images of a series", IMAGE, {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES,
                                   "SOPInstanceUID": "", "InstanceNumber": ""}),
    ("images by UID", IMAGE, {"SOPInstanceUID": "\\".join(SOPS[:2])}),
]


@pytest.mark.parametrize("level,keys", [(lv, k) for _, lv, k in C_FIND],
                         ids=[name for name, _, _ in C_FIND])
def test_c_find_searches_an_index(db: Any, level: str, keys: dict[str, Any]) -> None:
    ident = identifier(level, **keys)
    plan = search_plan(translate(ident, "STUDY" if level != "PATIENT" else "PATIENT"), ident)
    details = searched(db, level, plan.pre_filter)
    assert re.search(r"SEARCH .* USING (COVERING )?INDEX", details), details
    assert "SCAN" not in details, details


RETRIEVES = [
    ("PATIENT", {"PatientID": "PLAN-1"}),
    ("STUDY", {"StudyInstanceUID": STUDY}),
    ("SERIES", {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES}),
    (IMAGE, {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES,
             "SOPInstanceUID": SOPS[0]}),
]


@pytest.mark.parametrize("level,keys", RETRIEVES, ids=[lv for lv, _ in RETRIEVES])
def test_retrieve_searches_an_index_and_reads_no_dataset(db: Any, level: str,
                                                         keys: dict[str, Any]) -> None:
    plan = retrieve_plan(level, identifier(level, **keys))
    details = searched(db, IMAGE, plan.pre_filter)
    assert re.search(r"SEARCH .* USING (COVERING )?INDEX", details), details
    assert "SCAN" not in details, details
    found = list(db.instances.find(plan.pre_filter, plan.fields))
    wanted = SOPS[:1] if level == IMAGE else SOPS
    assert sorted(d["_id"] for d in found) == wanted
    assert all("dataset" not in d and d["file_id"] and d["SOPClassUID"] for d in found)


@pytest.mark.parametrize("kind", ["C-FIND IMAGE", "retrieve SERIES"])
def test_a_series_is_searched_in_its_own_index(db: Any, kind: str) -> None:
    """Not in its study's: SQLite, given both UIDs, took the first index and read every
    instance of the study, testing the series on each one's stored text."""
    if kind == "C-FIND IMAGE":
        ident = identifier(IMAGE, StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES,
                           SOPInstanceUID="")
        pre_filter = search_plan(translate(ident, "STUDY"), ident).pre_filter
    else:
        pre_filter = retrieve_plan("SERIES", identifier(
            "SERIES", StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES)).pre_filter
    details = searched(db, IMAGE, pre_filter)
    assert "_SeriesInstanceUID_" in details and "_StudyInstanceUID_" not in details, details
