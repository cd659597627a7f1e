"""Real peers against the node, over the network, both directions, every level.

- **Orthanc** (Debian's 1.10, started as the benchmarks start it: ``benchmarks.harness``)
  driven through its REST API: C-ECHO, C-FIND (``/modalities/ARCHIVE/query``; Patient
  Root at the Patient level, Study Root below), C-MOVE to itself
  (``/queries/{id}/answers/{n}/retrieve``, ``/modalities/ARCHIVE/move``: always Study
  Root, the Patient level included), C-STORE to the node (``/modalities/ARCHIVE/store``),
  with storage commitment too (the report on a new association to Orthanc);
- **pynetdicom's apps** as subprocesses (``python -m pynetdicom findscu | movescu |
  getscu | storescu``) at every level of both information models, movescu sending to
  Orthanc and to its own storage SCP;
- **DCMTK's findscu** with the keys it sends that are no dataset attributes.

One node and one Orthanc for the module.  The node holds a small corpus stored byte for
byte; what a peer receives is compared with the archive's GridFS copy (the dataset part,
which must be identical: the corpus has no trailing padding, which Orthanc drops).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import RunningNode
from helpers import (
    CT_IMAGE,
    DCMTK_ENV,
    MR_IMAGE,
    association,
    dataset_bytes,
    file_context,
    free_port,
    make_dataset,
    raw_sending,
    settled_counters,
    to_part10,
    wait_for,
)
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from archive.gridstore import GridStore
from benchmarks.harness import Orthanc  # it knows how to run Orthanc with a configuration

pytestmark = [pytest.mark.network, pytest.mark.ferretdb,
              pytest.mark.filterwarnings("ignore::UserWarning")]

TESTDATA = Path(pydicom.__file__).parent / "data" / "test_files"
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: (information model, level) of a C-FIND / C-MOVE / C-GET: Study Root has no PATIENT.
MODEL_LEVELS = [("P", level) for level in LEVELS] + [("S", level) for level in LEVELS[1:]]
NOT_FOUND = "no instance matches the identifier"


# --- the corpus -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    uid: str
    patient: str
    study: str
    series: str
    transfer_syntax: str
    path: Path


@dataclass
class Corpus:
    instances: list[Instance] = field(default_factory=list)
    stored: dict[str, bytes] = field(default_factory=dict)  # uid -> dataset bytes in GridFS

    def uids(self, **where: str) -> set[str]:
        return {i.uid for i in self.instances
                if all(getattr(i, k) == v for k, v in where.items())}

    def one(self, **where: str) -> Instance:
        return next(i for i in self.instances
                    if all(getattr(i, k) == v for k, v in where.items()))

    def distinct(self, attribute: str, **where: str) -> set[str]:
        return {getattr(i, attribute) for i in self.instances
                if all(getattr(i, k) == v for k, v in where.items())}


def _image(**kw: Any) -> Dataset:
    ds = make_dataset(**kw)
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(range(128))
    return ds


def _jpeg_ls(patient: str, study: str, series: str) -> Dataset:
    """pydicom's JPEG-LS lossless MR under new identifiers, without what DCMTK changes on
    storing (group lengths and trailing padding dropped, encapsulated OW made OB)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(TESTDATA / "MR_small_jpeg_ls_lossless.dcm")
    for elem in list(ds):
        if elem.tag.element == 0 or elem.tag == 0xFFFCFFFC:
            del ds[elem.tag]
    ds["PixelData"].VR = "OB"
    ds.PatientID, ds.PatientName = patient, f"PEER^{patient}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def build_corpus(folder: Path) -> Corpus:
    """PEER-A: study A1 (3 CT explicit, 2 MR implicit VR), study A2 (1 CT); PEER-B: one
    series of a JPEG-LS MR and a CT.  2 patients, 3 studies, 4 series, 8 instances."""
    corpus = Corpus()
    folder.mkdir(parents=True, exist_ok=True)

    def add(ds: Dataset, syntax: str | None = None) -> None:
        path = folder / f"{len(corpus.instances):02d}.dcm"
        if syntax is None:  # a pydicom file, kept in its own encoding
            syntax = str(ds.file_meta.TransferSyntaxUID)
            ds.save_as(path, enforce_file_format=True)
        else:
            path.write_bytes(to_part10(ds, syntax))
        corpus.instances.append(Instance(str(ds.SOPInstanceUID), str(ds.PatientID),
                                         str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                         syntax, path))

    a1, a2, b1 = generate_uid(), generate_uid(), generate_uid()
    ct, mr, single, mixed = (generate_uid() for _ in range(4))
    for n in range(3):
        add(_image(patient_id="PEER-A", study_uid=a1, series_uid=ct, InstanceNumber=n + 1),
            ExplicitVRLittleEndian)
    for n in range(2):
        add(_image(patient_id="PEER-A", study_uid=a1, series_uid=mr, sop_class=MR_IMAGE,
                   modality="MR", InstanceNumber=n + 1), ImplicitVRLittleEndian)
    add(_image(patient_id="PEER-A", study_uid=a2, series_uid=single), ExplicitVRLittleEndian)
    add(_jpeg_ls("PEER-B", b1, mixed))
    add(_image(patient_id="PEER-B", study_uid=b1, series_uid=mixed, sop_class=CT_IMAGE,
               InstanceNumber=2), ExplicitVRLittleEndian)
    return corpus


def store_corpus(node: RunningNode, corpus: Corpus) -> None:
    """Send every file's dataset bytes as they are, then keep GridFS's copy."""
    paths = [i.path for i in corpus.instances]
    with association(node, [file_context(p) for p in paths]) as assoc, raw_sending():
        for path in paths:
            assert assoc.send_c_store(path).Status == 0x0000, path
    files = GridStore(node.db)
    for inst in corpus.instances:
        doc = node.db.instances.find_one({"_id": inst.uid})
        corpus.stored[inst.uid] = dataset_bytes(files.read(doc["file_id"]))
        assert corpus.stored[inst.uid] == dataset_bytes(inst.path.read_bytes())


# --- Orthanc ----------------------------------------------------------------------------


class Peer(Orthanc):
    """Orthanc knowing the node as modality ``ARCHIVE``, with REST helpers."""

    def find(self, level: str, query: dict[str, str]) -> list[dict[str, Any]]:
        """C-FIND through ``/modalities/ARCHIVE/query``: the answers, simplified."""
        created = self.rest("POST", "/modalities/ARCHIVE/query",
                            {"Level": level, "Query": query})
        self.last_query = created["ID"]
        return self.rest("GET", f"/queries/{created['ID']}/answers?expand&simplify")

    def received(self) -> dict[str, bytes]:
        """The files Orthanc holds, by SOP Instance UID."""
        files = {}
        for inst in self.rest("GET", "/instances?expand"):
            uid = inst["MainDicomTags"]["SOPInstanceUID"]
            files[uid] = self.rest("GET", f"/instances/{inst['ID']}/file")
        return files

    def clear(self) -> None:
        for patient in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{patient}")

    def error(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, Orthanc's error document) of a call that must fail."""
        with pytest.raises(urllib.error.HTTPError) as caught:
            self.rest(method, path, body)
        return caught.value.code, json.loads(caught.value.read())


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"ORTHANC": free_port(), "ORTHANC_HTTP": free_port(), "PYSTORE": free_port()}


@pytest.fixture(scope="module")
def node(module_node_factory: Any, ports: dict[str, int]) -> RunningNode:
    return module_node_factory.start({"destinations": {
        "ORTHANC": {"host": "127.0.0.1", "port": ports["ORTHANC"]},
        "PYSTORE": {"host": "127.0.0.1", "port": ports["PYSTORE"]}}})


@pytest.fixture(scope="module")
def corpus(node: RunningNode, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    corpus = build_corpus(tmp_path_factory.mktemp("peers-corpus"))
    store_corpus(node, corpus)
    return corpus


@pytest.fixture(scope="module")
def orthanc(node: RunningNode, ports: dict[str, int],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    peer = Peer(tmp_path_factory.mktemp("orthanc"), aet="ORTHANC", dicom_port=ports["ORTHANC"],
                http_port=ports["ORTHANC_HTTP"],
                modalities={"ARCHIVE": ("127.0.0.1", node.port)})
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def empty_orthanc(orthanc: Peer) -> Peer:
    orthanc.clear()
    return orthanc


def assert_received(received: dict[str, bytes], corpus: Corpus, uids: set[str],
                    converted: bool = False) -> None:
    """Exactly these instances arrived, each dataset byte for byte the archive's -- or,
    with ``converted``, in the transfer syntax the receiver accepted instead of the
    stored one (pynetdicom's getscu accepts Implicit VR Little Endian only): then with
    the same attributes and values."""
    assert set(received) == uids
    for uid in uids:
        syntax = pydicom.dcmread(BytesIO(received[uid]), stop_before_pixels=True) \
            .file_meta.TransferSyntaxUID
        stored = corpus.one(uid=uid)
        if converted and syntax != stored.transfer_syntax:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = pydicom.dcmread(BytesIO(received[uid]))
                want = pydicom.dcmread(stored.path)
            assert got == want, uid
            continue
        assert syntax == stored.transfer_syntax, uid
        assert dataset_bytes(received[uid]) == corpus.stored[uid], uid


# --- Orthanc as the client ------------------------------------------------------------


def test_orthanc_echo(orthanc: Peer) -> None:
    assert orthanc.rest("POST", "/modalities/ARCHIVE/echo", {}) == {}


#: (Orthanc's level, its query, the answers' key and values) for every level.
def _orthanc_queries(corpus: Corpus) -> list[tuple[str, dict[str, str], str, set[str]]]:
    a1 = corpus.one(patient="PEER-A", series=corpus.one(patient="PEER-A").series).study
    mixed = corpus.one(patient="PEER-B").series
    return [
        ("Patient", {"PatientID": ""}, "PatientID", {"PEER-A", "PEER-B"}),
        ("Study", {"StudyInstanceUID": ""}, "StudyInstanceUID", corpus.distinct("study")),
        ("Series", {"StudyInstanceUID": a1}, "SeriesInstanceUID",
         corpus.distinct("series", study=a1)),
        ("Instance", {"SeriesInstanceUID": mixed}, "SOPInstanceUID", corpus.uids(series=mixed)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["Patient", "Study", "Series", "Instance"])
def test_orthanc_queries_every_level(orthanc: Peer, corpus: Corpus, index: int) -> None:
    level, query, key, expected = _orthanc_queries(corpus)[index]
    answers = orthanc.find(level, query)
    assert sorted(a[key] for a in answers) == sorted(expected)


def test_orthanc_finds_a_single_instance(orthanc: Peer, corpus: Corpus) -> None:
    """Orthanc puts (0002,0003) in its IMAGE-level identifier: it used to match nothing."""
    wanted = corpus.one(patient="PEER-B")
    answers = orthanc.find("Instance", {"SOPInstanceUID": wanted.uid})
    assert [(a["SOPInstanceUID"], a["SeriesInstanceUID"], a["StudyInstanceUID"])
            for a in answers] == [(wanted.uid, wanted.series, wanted.study)]
    assert orthanc.find("Instance", {"SOPInstanceUID": generate_uid()}) == []


@pytest.mark.parametrize("index", range(4), ids=["Patient", "Study", "Series", "Instance"])
def test_orthanc_retrieves_every_level(empty_orthanc: Peer, corpus: Corpus,
                                       index: int) -> None:
    """Query, then "retrieve" the first answer into Orthanc itself (C-MOVE, Study Root
    even at the Patient level)."""
    a = corpus.one(patient="PEER-A")
    level, query, key, expected = [
        ("Patient", {"PatientID": "PEER-A"}, "patient", "PEER-A"),
        ("Study", {"StudyInstanceUID": a.study}, "study", a.study),
        ("Series", {"SeriesInstanceUID": a.series}, "series", a.series),
        ("Instance", {"SOPInstanceUID": corpus.one(patient="PEER-B").uid}, "uid",
         corpus.one(patient="PEER-B").uid),  # the JPEG-LS one: sent compressed, as stored
    ][index]
    assert len(empty_orthanc.find(level, query)) == 1
    empty_orthanc.rest("POST", f"/queries/{empty_orthanc.last_query}/answers/0/retrieve",
                       {"TargetAet": "ORTHANC", "Synchronous": True})
    uids = {i.uid for i in corpus.instances if getattr(i, key) == expected}
    assert_received(empty_orthanc.received(), corpus, uids)


def test_orthanc_retrieve_of_an_unknown_instance_fails_saying_so(empty_orthanc: Peer,
                                                                 corpus: Corpus) -> None:
    inst = corpus.one(patient="PEER-A")
    status, error = empty_orthanc.error("POST", "/modalities/ARCHIVE/move", {
        "Level": "Instance", "TargetAet": "ORTHANC", "Synchronous": True,
        "Resources": [{"StudyInstanceUID": inst.study, "SeriesInstanceUID": inst.series,
                       "SOPInstanceUID": generate_uid()}]})
    assert status == 422
    assert "0xC000" in error["Details"] and "resource not found" in error["Details"]
    assert empty_orthanc.received() == {}


def test_orthanc_stores_into_the_node(empty_orthanc: Peer, node: RunningNode,
                                      tmp_path: Path) -> None:
    """Orthanc as the sender: files uploaded to it, then sent to the node by study; the
    node keeps each dataset as Orthanc sends it (Orthanc's file, byte for byte)."""
    study, series = generate_uid(), generate_uid()
    sent = {}
    for n, syntax in enumerate((ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                ExplicitVRLittleEndian)):
        ds = _image(patient_id="FROM-ORTHANC", study_uid=study, series_uid=series,
                    InstanceNumber=n + 1)
        created = empty_orthanc.rest("POST", "/instances", to_part10(ds, syntax))
        sent[str(ds.SOPInstanceUID)] = created["ID"]
    studies = empty_orthanc.rest("GET", "/studies")
    assert len(studies) == 1

    job = empty_orthanc.rest("POST", "/modalities/ARCHIVE/store",
                             {"Resources": studies, "Synchronous": True})

    assert (job["InstancesCount"], job["FailedInstancesCount"]) == (3, 0)
    files = GridStore(node.db)
    for uid, orthanc_id in sent.items():
        doc = node.db.instances.find_one({"_id": uid})
        assert doc is not None and doc["source"] == "ORTHANC"
        as_orthanc_has_it = empty_orthanc.rest("GET", f"/instances/{orthanc_id}/file")
        assert dataset_bytes(files.read(doc["file_id"])) == dataset_bytes(as_orthanc_has_it)
    assert settled_counters(node.db) == []  # level documents are written behind
    assert node.db.series.find_one({"_id": series})["NumberOfSeriesRelatedInstances"] == 3


def test_orthanc_asks_the_node_for_storage_commitment(empty_orthanc: Peer,
                                                     node: RunningNode) -> None:
    """Orthanc's store job with ``StorageCommitment``: an N-ACTION after the C-STOREs,
    the report on Orthanc's own DICOM port (``destinations: ORTHANC``), read back through
    ``/storage-commitment/{transaction}``."""
    study = generate_uid()
    for n in range(2):
        empty_orthanc.rest("POST", "/instances", to_part10(_image(
            patient_id="COMMIT", study_uid=study, InstanceNumber=n + 1)))
    studies = empty_orthanc.rest("GET", "/studies")

    job = empty_orthanc.rest("POST", "/modalities/ARCHIVE/store", {
        "Resources": studies, "Synchronous": True, "StorageCommitment": True})

    transaction = job["StorageCommitmentTransactionUID"]
    report: dict[str, Any] = {}

    def answered() -> bool:
        report.update(empty_orthanc.rest("GET", f"/storage-commitment/{transaction}"))
        return report["Status"] != "Pending"

    wait_for(answered, 30, message="Orthanc to receive the report")
    assert report["Status"] == "Success", report
    assert report["RemoteAET"] == node.ae_title
    assert f"transaction={transaction}: event type 1 (2 committed, 0 failed) reported on " \
        "a new association to ORTHANC@" in node.log()  # Orthanc releases after N-ACTION


# --- pynetdicom's apps ------------------------------------------------------------------


def pynetdicom_app(app: str, node: RunningNode, model: str | None, keys: dict[str, str],
                   *extra: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pynetdicom", app, "127.0.0.1", str(node.port),
               "-aec", node.ae_title, *([f"-{model}"] if model else [])]
    for key, value in keys.items():
        command += ["-k", f"{key}={value}"]
    command += list(extra)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


_RESULT = re.compile(r"(?:Find|Move|Get) SCP Result: 0x([0-9A-Fa-f]{4})")


def final_status(result: subprocess.CompletedProcess[str]) -> int:
    found = _RESULT.findall(result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    return int(found[-1], 16)


def read_folder(folder: Path) -> dict[str, bytes]:
    """Part-10 files written by a tool, by SOP Instance UID."""
    files = {}
    for path in folder.iterdir():
        if path.is_file():
            meta = pydicom.filereader.read_file_meta_info(path)
            files[str(meta.MediaStorageSOPInstanceUID)] = path.read_bytes()
    return files


def retrieve_keys(corpus: Corpus, level: str, model: str) -> tuple[dict[str, str], set[str]]:
    """A retrieve identifier at ``level`` (PEER-A's first study, series, instance)."""
    a = corpus.one(patient="PEER-A")
    keys = {"QueryRetrieveLevel": level}
    if model == "P":
        keys["PatientID"] = a.patient
    if level == "PATIENT":
        return keys, corpus.uids(patient=a.patient)
    keys["StudyInstanceUID"] = a.study
    if level == "STUDY":
        return keys, corpus.uids(study=a.study)
    keys["SeriesInstanceUID"] = a.series
    if level == "SERIES":
        return keys, corpus.uids(series=a.series)
    keys["SOPInstanceUID"] = a.uid
    return keys, {a.uid}


#: Identifier keys -> the corpus attribute they name.
ATTRIBUTE = {"PatientID": "patient", "StudyInstanceUID": "study",
             "SeriesInstanceUID": "series", "SOPInstanceUID": "uid"}
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
          "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


@pytest.mark.parametrize(("model", "level"), MODEL_LEVELS)
def test_pynetdicom_findscu(node: RunningNode, corpus: Corpus, tmp_path: Path, model: str,
                            level: str) -> None:
    """Every entity of the level below PEER-A's first study and series (as far as the
    level has them): the retrieve identifier with its unique key universal."""
    keys, _ = retrieve_keys(corpus, level, model)
    unique = UNIQUE[level]
    keys[unique] = ""
    parents = {ATTRIBUTE[k]: v for k, v in keys.items() if k in ATTRIBUTE and v}
    if not keys.get("PatientID"):  # the corpus only: other tests store more
        keys["PatientID"] = "PEER-*"
    wanted = {getattr(i, ATTRIBUTE[unique]) for i in corpus.instances
              if all(getattr(i, a) == v for a, v in parents.items())}

    result = pynetdicom_app("findscu", node, model, keys, "-w", cwd=tmp_path)

    assert final_status(result) == 0x0000
    responses = [pydicom.dcmread(p) for p in sorted(tmp_path.glob("rsp*.dcm"))]
    assert sorted(str(r[unique].value) for r in responses) == sorted(wanted)
    assert len(wanted) > 1 or level == "IMAGE" and len(wanted) == 3
    assert all(r.QueryRetrieveLevel == level for r in responses)


@pytest.mark.parametrize(("model", "level"), MODEL_LEVELS)
def test_pynetdicom_getscu(node: RunningNode, corpus: Corpus, tmp_path: Path, model: str,
                           level: str) -> None:
    keys, expected = retrieve_keys(corpus, level, model)
    result = pynetdicom_app("getscu", node, model, keys, "-od", str(tmp_path / "got"),
                            cwd=tmp_path)
    assert final_status(result) == 0x0000
    assert_received(read_folder(tmp_path / "got"), corpus, expected, converted=True)


@pytest.mark.parametrize(("model", "level"), MODEL_LEVELS)
def test_pynetdicom_movescu(node: RunningNode, corpus: Corpus, ports: dict[str, int],
                            tmp_path: Path, model: str, level: str) -> None:
    """movescu's own storage SCP as the Move Destination (PYSTORE)."""
    keys, expected = retrieve_keys(corpus, level, model)
    result = pynetdicom_app("movescu", node, model, keys, "-aem", "PYSTORE", "--store",
                            "--store-port", str(ports["PYSTORE"]), "--store-aet", "PYSTORE",
                            "-od", str(tmp_path / "moved"), cwd=tmp_path)
    assert final_status(result) == 0x0000
    assert_received(read_folder(tmp_path / "moved"), corpus, expected)


def test_pynetdicom_movescu_to_orthanc(node: RunningNode, corpus: Corpus,
                                       empty_orthanc: Peer, tmp_path: Path) -> None:
    """Orthanc as the Move Destination of another SCU."""
    keys, expected = retrieve_keys(corpus, "STUDY", "S")
    result = pynetdicom_app("movescu", node, "S", keys, "-aem", "ORTHANC", cwd=tmp_path)
    assert final_status(result) == 0x0000
    assert_received(empty_orthanc.received(), corpus, expected)


@pytest.mark.parametrize("app", ["findscu", "getscu", "movescu"])
def test_pynetdicom_apps_name_an_instance_by_its_media_storage_uid(
        node: RunningNode, corpus: Corpus, ports: dict[str, int], tmp_path: Path,
        app: str) -> None:
    """(0002,0003) alone names the instance, as SOP Instance UID would."""
    wanted = corpus.one(patient="PEER-B", transfer_syntax=ExplicitVRLittleEndian)
    keys = {"QueryRetrieveLevel": "IMAGE", "MediaStorageSOPInstanceUID": wanted.uid}
    if app == "findscu":
        keys["SOPInstanceUID"] = ""
        result = pynetdicom_app(app, node, "S", keys, "-w", cwd=tmp_path)
        assert final_status(result) == 0x0000
        responses = [pydicom.dcmread(p) for p in tmp_path.glob("rsp*.dcm")]
        assert [r.SOPInstanceUID for r in responses] == [wanted.uid]
        assert all(0x00020003 not in r for r in responses)  # never returned
        return
    extra = ["-od", str(tmp_path / "got")]
    if app == "movescu":
        extra += ["-aem", "PYSTORE", "--store", "--store-port", str(ports["PYSTORE"]),
                  "--store-aet", "PYSTORE"]
    result = pynetdicom_app(app, node, "S", keys, *extra, cwd=tmp_path)
    assert final_status(result) == 0x0000
    assert_received(read_folder(tmp_path / "got"), corpus, {wanted.uid},
                    converted=app == "getscu")


@pytest.mark.parametrize("app", ["getscu", "movescu"])
def test_pynetdicom_retrieve_of_an_unknown_instance_fails(node: RunningNode, corpus: Corpus,
                                                          tmp_path: Path, app: str) -> None:
    inst = corpus.one(patient="PEER-A")
    keys = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": inst.study,
            "SeriesInstanceUID": inst.series, "SOPInstanceUID": generate_uid()}
    extra = ["-aem", "PYSTORE"] if app == "movescu" else ["-od", str(tmp_path / "got")]
    result = pynetdicom_app(app, node, "S", keys, *extra, cwd=tmp_path)
    assert final_status(result) == 0xC000


def test_pynetdicom_storescu(node: RunningNode, tmp_path: Path) -> None:
    folder = tmp_path / "to-send"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    sent = {}
    for n in range(3):
        ds = _image(patient_id="FROM-STORESCU", study_uid=study, series_uid=series,
                    InstanceNumber=n + 1)
        path = folder / f"{n}.dcm"
        path.write_bytes(to_part10(ds, ExplicitVRLittleEndian))
        sent[str(ds.SOPInstanceUID)] = path
    result = subprocess.run(
        [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(node.port),
         str(folder), "-r", "-aec", node.ae_title, "-xe"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    files = GridStore(node.db)
    for uid, path in sent.items():
        doc = node.db.instances.find_one({"_id": uid})
        assert doc is not None, result.stderr
        assert dataset_bytes(files.read(doc["file_id"])) == dataset_bytes(path.read_bytes())


# --- DCMTK ------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "keys"), [
    ("STUDY", ["0008,0000", "0010,0000", "0010,0020=PEER-*", "0020,000D"]),  # group lengths
    ("IMAGE", ["0002,0003={uid}", "0008,0018"]),  # file meta alias alone
    ("IMAGE", ["0002,0010=1.2.840.10008.1.2.4.50", "0002,0003={uid}", "0008,0018={uid}"]),
])
def test_dcmtk_findscu_keys_that_are_no_attributes(node: RunningNode, corpus: Corpus,
                                                   tmp_path: Path, level: str,
                                                   keys: list[str]) -> None:
    wanted = corpus.one(patient="PEER-B").uid
    command = ["findscu", "-S", "-aec", node.ae_title, "-X", "-od", str(tmp_path),
               "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        command += ["-k", key.format(uid=wanted)]
    result = subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True,
                            text=True, env=DCMTK_ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    responses = [pydicom.dcmread(p) for p in sorted(tmp_path.glob("rsp*.dcm"))]
    if level == "STUDY":
        assert sorted(r.StudyInstanceUID for r in responses) == sorted(corpus.distinct("study"))
    else:
        assert [r.SOPInstanceUID for r in responses] == [wanted]
    for response in responses:  # only dataset attributes come back
        assert all(elem.tag.group != 0x0002 and elem.tag.element != 0 for elem in response)
