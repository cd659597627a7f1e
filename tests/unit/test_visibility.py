"""Non-interference of the access rules (mongomock, generated cases).

A principal restricted by Query patterns must learn nothing about what is hidden: the
answers she gets from an archive holding visible and hidden instances -- hidden ones in
her own studies and series too, of another patient (accepted conflicts) or with other
descriptions -- must be exactly the answers an archive holding only the visible
instances gives, for every query: which entities, their attributes, every count and
Modalities / SOP Classes in Study, and what her keys match.  And her keys must never
be matched against a hidden document ("restrict first, then match").
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import mongomock
import pytest
from helpers import CT_IMAGE, MR_IMAGE, SECONDARY_CAPTURE, make_dataset, to_part10
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from acl import visibility
from acl.patterns import compile_pattern, to_json
from archive import matching
from archive.find import Finder
from archive.query import evaluate, translate
from archive.storage import Archive

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLASSES = {"CT": CT_IMAGE, "MR": MR_IMAGE, "OT": SECONDARY_CAPTURE}

instance = st.fixed_dictionaries({
    "patient": st.sampled_from(("TRIAL42-1", "TRIAL42-2", "OTHER-1", "OTHER-2")),
    "name": st.sampled_from(("DOE^JANE", "SMITH^JOHN", "TRIAL^ANON")),
    "study": st.sampled_from(("1.2.5.1", "1.2.5.2", "1.2.5.3")),
    "series": st.sampled_from(("1", "2", "3")),  # within the study
    "sop": st.integers(1, 12),
    "modality": st.sampled_from(sorted(CLASSES)),
    "description": st.sampled_from(("HEAD", "HEAD FOLLOW-UP", "CHEST", "SECRET")),
    "series_description": st.sampled_from(("AX T1", "COR", "SCOUT")),
})

PATTERNS = [
    {"PatientID": "TRIAL42-*"},
    {"Modality": "MR"},
    {"StudyDescription": "HEAD*"},
    {"PatientID": "TRIAL42-*", "Modality": "CT"},
    {"SeriesDescription": "AX*", "StudyDescription": "*FOLLOW*"},
    {"PatientName": "DOE^*"},
]

KEYS = {
    "PATIENT": ("PatientID", "PatientName", "NumberOfPatientRelatedStudies",
                "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"),
    "STUDY": ("StudyInstanceUID", "PatientID", "PatientName", "StudyDescription",
              "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"),
    "SERIES": ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription",
               "PatientID", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPInstanceUID", "SeriesInstanceUID", "SOPClassUID", "PatientID"),
}

matcher = st.fixed_dictionaries({
    "level": st.sampled_from(sorted(KEYS)),
    "model": st.sampled_from(("PATIENT", "STUDY")),
    "PatientID": st.sampled_from(("", "", "TRIAL42-1", "OTHER-1", "*-1", "TRIAL42-?")),
    "PatientName": st.sampled_from(("", "", "DOE*", "*SMITH*", "T?IAL*")),
    "StudyDescription": st.sampled_from(("", "", "HEAD", "*FOLLOW*", "SECRET", "CHEST")),
    "StudyInstanceUID": st.sampled_from(("", "", "1.2.5.1", "1.2.5.2")),
    "Modality": st.sampled_from(("", "", "CT", "MR")),
    "ModalitiesInStudy": st.sampled_from(("", "", "CT", "MR")),
    "NumberOfStudyRelatedInstances": st.sampled_from(("", "", "1", "2", "3")),
})


def part10(spec: dict[str, Any]) -> bytes:
    study = spec["study"]
    ds = make_dataset(patient_id=spec["patient"], patient_name=spec["name"],
                      study_uid=study, series_uid=f"{study}.{spec['series']}",
                      sop_uid=f"{study}.{spec['series']}.{spec['sop']}",
                      modality=spec["modality"], sop_class=CLASSES[spec["modality"]],
                      StudyDescription=spec["description"],
                      SeriesDescription=spec["series_description"])
    return to_part10(ds)


def identifier(spec: dict[str, Any]) -> tuple[Dataset, str]:
    level, model = spec["level"], spec["model"]
    if model == "STUDY" and level == "PATIENT":
        level = "STUDY"
    allowed = {"PATIENT": ("PatientID", "PatientName"),
               "STUDY": ("PatientID", "PatientName", "StudyDescription", "StudyInstanceUID",
                         "ModalitiesInStudy", "NumberOfStudyRelatedInstances"),
               "SERIES": ("PatientID", "PatientName", "StudyDescription", "StudyInstanceUID",
                          "Modality"),
               "IMAGE": ("PatientID", "StudyInstanceUID", "Modality")}[level]
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in KEYS[level]:
        setattr(ds, keyword, "")
    for keyword in allowed:
        if spec[keyword]:
            setattr(ds, keyword, spec[keyword])
    if model == "STUDY":  # Study Root has no PATIENT level: patient keys at STUDY only
        for keyword in ("NumberOfPatientRelatedStudies",):
            if keyword in ds:
                del ds[keyword]
    return ds, model


def answers(finder: Finder, ds: Dataset, model: str,
            patterns: list[dict[str, Any]] | None) -> list[str]:
    q = translate(ds, model)
    if patterns is None:
        found = finder.responses(q, ds)
    else:
        compiled = [compile_pattern(to_json(p)) for p in patterns]
        found = visibility.responses(finder, q, ds, compiled, model)
    rows = []
    for response in found:
        row = response.to_json_dict()
        for key in ("00080061", "00080062"):  # multi-valued: order is not significant
            if row.get(key, {}).get("Value"):
                row[key]["Value"] = sorted(row[key]["Value"])
        rows.append(repr(sorted(row.items())))
    return sorted(rows)


def build(instances: list[dict[str, Any]], tmp: Path, policy: str) -> tuple[Any, Archive]:
    db = mongomock.MongoClient(tz_aware=True).archive
    archive = Archive(db, "fs", "replace", tmp / f"j{random.getrandbits(48):x}", policy)
    for spec in instances:
        archive.store(part10(spec))
    return db, archive


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stored=st.lists(instance, min_size=1, max_size=14),
       rules=st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2, unique_by=repr),
       queries=st.lists(matcher, min_size=1, max_size=6),
       policy=st.sampled_from(("refuse", "accept")))
def test_restricted_answers_are_those_of_an_archive_without_hidden_data(
        tmp_path: Path, stored: list[dict[str, Any]], rules: list[dict[str, Any]],
        queries: list[dict[str, Any]], policy: str) -> None:
    full_db, full = build(stored, tmp_path, policy)
    compiled = [compile_pattern(to_json(p)) for p in rules]
    # The visible instances, as stored (a refused or replaced version is not there),
    # stored again alone in the order they were stored.
    visible = [doc for doc in sorted(full_db.instances.find(), key=lambda d: d["file_id"])
               if any(evaluate(c.filters["IMAGE"], doc) for c in compiled)]
    alone_db = mongomock.MongoClient(tz_aware=True).archive
    alone = Archive(alone_db, "fs", "replace", tmp_path / f"a{random.getrandbits(48):x}",
                    "accept")
    for doc in visible:
        assert alone.store(full.files.read(doc["file_id"])).ok
    for spec in queries:
        ds, model = identifier(spec)
        restricted = answers(Finder(full_db), ds, model, rules)
        assert restricted == answers(Finder(alone_db), ds, model, None), (spec, rules)
        assert restricted == answers(Finder(alone_db), ds, model, rules)
    # C-MOVE / C-GET by unique keys: the same instances, hidden ones never sent, a
    # hidden patient or study named exactly selects nothing
    restriction = {"$or": [c.filters["IMAGE"] for c in compiled]}
    for level, keys in retrieves(stored):
        request = Dataset()
        request.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(request, keyword, value)
        sent = {d["_id"] for d in Finder(full_db).instances(level, request, restriction)}
        assert sent == {d["_id"] for d in Finder(alone_db).instances(level, request)}, keys


def retrieves(stored: list[dict[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    """Retrieve identifiers naming what was stored, at every level."""
    requests: list[tuple[str, dict[str, str]]] = []
    for spec in stored[:4]:
        study = spec["study"]
        series = f"{study}.{spec['series']}"
        requests += [
            ("PATIENT", {"PatientID": spec["patient"]}),
            ("STUDY", {"PatientID": spec["patient"], "StudyInstanceUID": study}),
            ("STUDY", {"StudyInstanceUID": study}),
            ("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}),
            ("IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series,
                       "SOPInstanceUID": f"{series}.{spec['sop']}"}),
        ]
    return requests


def test_her_keys_are_never_matched_against_a_hidden_document(tmp_path: Path,
                                                             monkeypatch: Any) -> None:
    """Restrict first, then match: a wild card of hers is only ever evaluated on
    documents she may see (a slow match would otherwise time hidden values)."""
    stored = [
        {"patient": "TRIAL42-1", "name": "DOE^JANE", "study": "1.2.5.1", "series": "1",
         "sop": 1, "modality": "CT", "description": "HEAD", "series_description": "AX T1"},
        {"patient": "OTHER-1", "name": "SMITH^JOHN", "study": "1.2.5.2", "series": "1",
         "sop": 1, "modality": "CT", "description": "SECRET", "series_description": "AX"},
        # a hidden instance inside her own study (accepted conflict: mixed study)
        {"patient": "OTHER-2", "name": "SMITH^JOHN", "study": "1.2.5.1", "series": "2",
         "sop": 2, "modality": "MR", "description": "SECRET", "series_description": "COR"},
    ]
    db, _ = build(stored, tmp_path, "accept")
    seen: list[str] = []
    real = matching.Wildcard.matches

    def spy(self: matching.Wildcard, value: str) -> bool:
        if not self.head.chars and [m.chars for m in self.middle] in ([("E",)], [("e",)]):
            seen.append(value)  # her "*E*", not the rule's "TRIAL42-*"
        return real(self, value)

    monkeypatch.setattr(matching.Wildcard, "matches", spy)
    for level, key in (("STUDY", "StudyDescription"), ("SERIES", "StudyDescription"),
                       ("PATIENT", "PatientName"), ("IMAGE", "PatientID")):
        for model in ("PATIENT", "STUDY") if level != "PATIENT" else ("PATIENT",):
            ds = Dataset()
            ds.QueryRetrieveLevel = level
            setattr(ds, key, "*E*")
            seen.clear()
            answers(Finder(db), ds, model, [{"PatientID": "TRIAL42-*"}])
            hidden = {"SECRET", "SMITH^JOHN", "OTHER-1", "OTHER-2"}
            assert seen, "the spy saw no match of hers"
            assert not hidden & {v.upper() for v in seen}, (level, model, seen)
