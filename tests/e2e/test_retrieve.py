"""C-MOVE and C-GET end to end: the node as a subprocess on FerretDB, DCMTK and pynetdicom
on both sides (movescu/getscu and a pynetdicom SCU asking, storescp and a pynetdicom
storage SCP receiving).

One node (module scope) holds a small corpus stored byte-exactly through pynetdicom:
patient RETR-A (two studies, explicit and implicit VR little endian), RETR-C (JPEG 2000,
JPEG-LS, RLE, deflated and big endian instances), RETR-N (twelve small instances for
the cancel and kill tests) and RETR-T (every image pydicom ships in a compressed, deflated
or big endian syntax, one that no decoder can read among them, for transcoding).  Its
Move Destinations are fixed ports on which each test starts the receiver it needs.  What
a destination receives as stored is compared with the archive's GridFS copy (the dataset
part must be byte-identical); what it receives transcoded, with the pixels pydicom
decodes from the original.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
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
    TS_FLAGS,
    association,
    dataset_bytes,
    echoscu,
    file_context,
    free_port,
    identifier,
    make_dataset,
    port_open,
    raw_sending,
    to_part10,
    wait_for,
)
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from archive import transcode
from archive.dimse import retrieve
from archive.gridstore import GridStore

pytestmark = [pytest.mark.network, pytest.mark.ferretdb,
              pytest.mark.filterwarnings("ignore::UserWarning")]

TESTDATA = Path(pydicom.__file__).parent / "data" / "test_files"

MOVE = {"PATIENT": PatientRootQueryRetrieveInformationModelMove,
        "STUDY": StudyRootQueryRetrieveInformationModelMove}
GET = {"PATIENT": PatientRootQueryRetrieveInformationModelGet,
       "STUDY": StudyRootQueryRetrieveInformationModelGet}

#: The node's Move Destinations, each on a port fixed for the module.
DESTINATIONS = ("STORESCP", "UNCOMPRESSED", "IMPLICIT", "PYSCP", "CT_ONLY", "SLOW",
                "NOBODY")


# --- the corpus ------------------------------------------------------------------------


@dataclass
class Instance:
    uid: str
    patient: str
    study: str
    series: str
    sop_class: str
    transfer_syntax: str
    path: Path
    name: str = ""  # the pydicom test file it was made from


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

    def studies(self, patient: str) -> list[str]:
        return list(dict.fromkeys(i.study for i in self.instances if i.patient == patient))

    def series_of(self, study: str) -> list[str]:
        return list(dict.fromkeys(i.series for i in self.instances if i.study == study))


def _pixel_image(**kw: Any) -> Dataset:
    ds = make_dataset(**kw)
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(range(128))
    ds.add_new(0x00090010, "LO", "RETRIEVE TEST")  # a private block: VRs must survive
    ds.add_new(0x00091001, "DS", "1.5")
    return ds


def _relabel(source: Path, patient: str, study: str, series: str) -> Dataset:
    """A pydicom test file with new identifiers, in its own transfer syntax."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source)
    ds.PatientID, ds.PatientName = patient, f"RETRIEVE^{patient}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def build_corpus(folder: Path) -> Corpus:
    corpus = Corpus()
    folder.mkdir(parents=True, exist_ok=True)

    def add(ds: Dataset, syntax: str | None = None, name: str = "") -> None:
        path = folder / f"{len(corpus.instances):03d}.dcm"
        if syntax is None:  # a relabelled pydicom file, kept in its own encoding
            syntax = str(ds.file_meta.TransferSyntaxUID)
            ds.save_as(path, enforce_file_format=True)
        else:
            path.write_bytes(to_part10(ds, syntax))
        corpus.instances.append(Instance(str(ds.SOPInstanceUID), str(ds.PatientID),
                                         str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                         str(ds.SOPClassUID), syntax, path, name))

    study_1, study_2 = generate_uid(), generate_uid()
    series = [generate_uid() for _ in range(3)]
    for n in range(3):
        add(_pixel_image(patient_id="RETR-A", study_uid=study_1, series_uid=series[0],
                         InstanceNumber=n + 1), ExplicitVRLittleEndian)
    for n in range(2):
        add(_pixel_image(patient_id="RETR-A", study_uid=study_1, series_uid=series[1],
                         sop_class=MR_IMAGE, modality="MR", InstanceNumber=n + 1),
            ImplicitVRLittleEndian)
    add(_pixel_image(patient_id="RETR-A", study_uid=study_2, series_uid=series[2]),
        ExplicitVRLittleEndian)

    study_c, compressed, other = generate_uid(), generate_uid(), generate_uid()
    for name in ("JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"):
        add(_relabel(TESTDATA / name, "RETR-C", study_c, compressed), name=name)
    for name in ("image_dfl.dcm", "MR_small_bigendian.dcm"):
        add(_relabel(TESTDATA / name, "RETR-C", study_c, other), name=name)

    study_n, series_n = generate_uid(), generate_uid()
    for n in range(12):
        add(_pixel_image(patient_id="RETR-N", study_uid=study_n, series_uid=series_n,
                         InstanceNumber=n + 1), ExplicitVRLittleEndian)

    study_t, series_t = generate_uid(), generate_uid()
    for name in TRANSCODED:
        add(_relabel(TESTDATA / name, "RETR-T", study_t, series_t), name=name)
    return corpus


#: A pydicom test file whose JPEG stream no decoder here reads.
UNDECODABLE = "JPEG-lossy.dcm"


def _transcoded() -> list[str]:
    """pydicom's test images in a syntax other than explicit/implicit VR little endian,
    those pydicom re-encodes unchanged (a dataset encoded otherwise than its transfer
    syntax says is left out) and decodes, plus :data:`UNDECODABLE`."""
    names = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(TESTDATA.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(path)
                syntax = ds.file_meta.TransferSyntaxUID
                if "PixelData" not in ds or syntax in (ExplicitVRLittleEndian,
                                                       ImplicitVRLittleEndian):
                    continue
                ds.save_as(BytesIO())  # re-encoded unchanged, or left out
                ds.pixel_array  # noqa: B018 - decodable, or left out
            except Exception:  # noqa: BLE001 - not an image pydicom reads
                continue
            names.append(path.name)
    return [*names, UNDECODABLE]


TRANSCODED = _transcoded()


def store_corpus(node: RunningNode, corpus: Corpus) -> None:
    """Send every file's dataset bytes as they are (pynetdicom, no re-encoding)."""
    paths = [i.path for i in corpus.instances]
    with association(node, [file_context(p) for p in paths]) as assoc, raw_sending():
        for path in paths:
            assert assoc.send_c_store(path).Status == 0x0000, path
    files = GridStore(node.db)
    for inst in corpus.instances:
        doc = node.db.instances.find_one({"_id": inst.uid})
        assert doc is not None, inst.uid
        corpus.stored[inst.uid] = dataset_bytes(files.read(doc["file_id"]))
        assert corpus.stored[inst.uid] == dataset_bytes(inst.path.read_bytes())


# --- receivers ------------------------------------------------------------------------


class StoreSCP:
    """DCMTK's storescp writing what it receives bit for bit (``+B``)."""

    def __init__(self, directory: Path, ae_title: str, port: int, *flags: str) -> None:
        self.directory, self.ae_title, self.port, self.flags = directory, ae_title, port, flags
        directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        log = (self.directory.parent / f"{self.directory.name}.log").open("ab")
        self.process = subprocess.Popen(
            ["storescp", "+B", "+uf", *self.flags, "-aet", self.ae_title, "-od",
             str(self.directory), str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        wait_for(lambda: port_open(self.port), 10, 0.02, "storescp to listen")
        return self

    def received(self) -> dict[str, bytes]:
        """Files written so far, by SOP Instance UID (one being written is skipped)."""
        out = {}
        for path in self.directory.iterdir():
            try:
                meta = pydicom.filereader.read_file_meta_info(path)
            except Exception:  # noqa: BLE001 - still being written
                continue
            out[str(meta.MediaStorageSOPInstanceUID)] = path.read_bytes()
        return out

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class PyStoreSCP:
    """A pynetdicom storage SCP keeping each dataset's bytes exactly as received."""

    def __init__(self, ae_title: str, port: int, sop_classes: list[str] | None = None,
                 syntaxes: list[str] | None = None, delay: float = 0.0) -> None:
        self.ae_title, self.port, self.delay = ae_title, port, delay
        self.received: dict[str, tuple[str, bytes]] = {}  # uid -> (transfer syntax, bytes)
        self.ae = AE(ae_title=ae_title)
        self.ae.network_timeout = self.ae.dimse_timeout = 30
        classes = sop_classes or [cx.abstract_syntax for cx in AllStoragePresentationContexts]
        for uid in classes:
            self.ae.add_supported_context(uid, syntaxes or ALL_TRANSFER_SYNTAXES)
        self.server: Any = None

    def _store(self, event: Any) -> int:
        if self.delay:
            time.sleep(self.delay)
        self.received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax), event.request.DataSet.getvalue())
        return 0x0000

    def __enter__(self) -> PyStoreSCP:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()


# --- requesting -------------------------------------------------------------------------


@dataclass
class Outcome:
    """Every response of one C-MOVE/C-GET: pending ones, then the final one."""

    pending: list[Dataset]
    final: Dataset
    identifier: Dataset | None

    @property
    def status(self) -> int:
        return int(self.final.Status)

    def count(self, what: str) -> int:
        return int(self.final.get(f"NumberOf{what}Suboperations", -1))

    @property
    def failed_uids(self) -> set[str]:
        if self.identifier is None or "FailedSOPInstanceUIDList" not in self.identifier:
            return set()
        value = self.identifier.FailedSOPInstanceUIDList
        return {str(v) for v in ([value] if isinstance(value, str) else value) if v}


def pynetdicom_move(node: RunningNode, request: Dataset, destination: str,
                    model: str = "STUDY", cancel_after: int | None = None) -> Outcome:
    with association(node, [(MOVE[model], ExplicitVRLittleEndian)], "MOVESCU") as assoc:
        return _collect(assoc, assoc.send_c_move(request, destination, MOVE[model]),
                        MOVE[model], cancel_after)


def _collect(assoc: Any, responses: Iterator[tuple[Dataset, Dataset | None]],
             sop_class: str, cancel_after: int | None) -> Outcome:
    pending: list[Dataset] = []
    for status, ident in responses:
        assert status, "no response from the node (DIMSE timeout or association lost)"
        if status.Status in (0xFF00, 0xFF01):
            pending.append(status)
            if cancel_after is not None and len(pending) == cancel_after:
                cx = assoc._get_valid_context(sop_class, "", "scu")
                assoc.send_c_cancel(1, cx.context_id)  # send_c_move/get's default msg_id
            continue
        return Outcome(pending, status, ident)
    raise AssertionError("no final response")


def pynetdicom_get(node: RunningNode, request: Dataset, model: str = "STUDY", *,
                   syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,
                                                ImplicitVRLittleEndian),
                   classes: tuple[str, ...] = (CT_IMAGE, MR_IMAGE), delay: float = 0.0,
                   cancel_after: int | None = None) -> tuple[Outcome, dict[str, Any]]:
    """C-GET with a pynetdicom SCU taking the SCP role for ``classes`` x ``syntaxes``."""
    from pynetdicom import build_role

    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        if delay:
            time.sleep(delay)
        received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax), event.request.DataSet.getvalue())
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(GET[model], ExplicitVRLittleEndian)
    for uid in classes:  # one context per syntax: the stored one can be accepted as is
        for syntax in syntaxes:
            ae.add_requested_context(uid, syntax)
    roles = [build_role(uid, scp_role=True) for uid in classes]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        outcome = _collect(assoc, assoc.send_c_get(request, GET[model]), GET[model],
                           cancel_after)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return outcome, received


_FINAL_RESPONSE = re.compile(r"Received Final (?:Move|Get) Response \(([^)]*)\)")


def dcmtk_retrieve(tool: str, node: RunningNode, level: str, keys: dict[str, str],
                   *args: str, model: str = "STUDY") -> subprocess.CompletedProcess[str]:
    command = [tool, "-v", "-S" if model == "STUDY" else "-P", "-aec", node.ae_title,
               "-to", "20", "-td", "30", "-k", f"QueryRetrieveLevel={level}"]
    for key, value in keys.items():
        command += ["-k", f"{key}={value}"]
    command += [*args, "127.0.0.1", str(node.port)]
    return subprocess.run(command, capture_output=True, text=True, env=DCMTK_ENV,
                          timeout=60, errors="replace")


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {name: free_port() for name in DESTINATIONS}


@pytest.fixture(scope="module")
def node(module_node_factory: Any, ports: dict[str, int]) -> RunningNode:
    destinations = {ae: {"host": "127.0.0.1", "port": port} for ae, port in ports.items()}
    return module_node_factory.start({"destinations": destinations})


@pytest.fixture(scope="module")
def corpus(node: RunningNode, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    corpus = build_corpus(tmp_path_factory.mktemp("retrieve-corpus"))
    store_corpus(node, corpus)
    return corpus


@pytest.fixture
def storescp(tmp_path: Path, ports: dict[str, int]) -> Iterator[Any]:
    """``start(ae_title, *flags)``: a storescp on that destination's port."""
    started: list[StoreSCP] = []

    def start(ae_title: str, *flags: str) -> StoreSCP:
        scp = StoreSCP(tmp_path / ae_title.lower(), ae_title, ports[ae_title], *flags)
        started.append(scp.start())
        return scp

    yield start
    for scp in started:
        scp.stop()


def assert_identical(received: dict[str, bytes], corpus: Corpus, uids: set[str]) -> None:
    """Part-10 files received: their dataset part is the archive's stored bytes."""
    assert set(received) == uids
    for uid in uids:
        assert dataset_bytes(received[uid]) == corpus.stored[uid], uid


def assert_counts(outcome: Outcome, completed: int, failed: int = 0, warning: int = 0) -> None:
    assert (outcome.count("Completed"), outcome.count("Failed"), outcome.count("Warning")) \
        == (completed, failed, warning), outcome.final
    total = completed + failed + warning
    previous = total
    for n, rsp in enumerate(outcome.pending, start=1):  # one pending per sub-operation
        done = (rsp.NumberOfCompletedSuboperations + rsp.NumberOfFailedSuboperations
                + rsp.NumberOfWarningSuboperations)
        assert rsp.NumberOfRemainingSuboperations + done == total, rsp
        assert rsp.NumberOfRemainingSuboperations < previous
        assert done == n
        previous = rsp.NumberOfRemainingSuboperations


# --- C-MOVE with DCMTK -------------------------------------------------------------------


def test_movescu_study_to_storescp_byte_identical(node: RunningNode, corpus: Corpus,
                                                  storescp: Any) -> None:
    scp = storescp("STORESCP", "+xa")
    study = corpus.studies("RETR-A")[0]
    proc = dcmtk_retrieve("movescu", node, "STUDY", {"StudyInstanceUID": study},
                          "-aem", "STORESCP")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _FINAL_RESPONSE.findall(proc.stdout + proc.stderr) == ["Success"], proc.stderr
    assert_identical(scp.received(), corpus, corpus.uids(study=study))
    assert re.search(r"C-MOVE MOVESCU@\S+ level=STUDY dest=STORESCP@127.0.0.1:\d+ -> "
                     r"0x0000: matched=5 completed=5 failed=0 warning=0", node.log())


def test_movescu_patient_root_to_pynetdicom_scp(node: RunningNode, corpus: Corpus,
                                                ports: dict[str, int]) -> None:
    with PyStoreSCP("PYSCP", ports["PYSCP"]) as scp:
        proc = dcmtk_retrieve("movescu", node, "PATIENT", {"PatientID": "RETR-A"},
                              "-aem", "PYSCP", model="PATIENT")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _FINAL_RESPONSE.findall(proc.stdout + proc.stderr) == ["Success"]
    uids = corpus.uids(patient="RETR-A")
    assert set(scp.received) == uids
    for uid in uids:
        syntax, data = scp.received[uid]
        assert syntax == corpus.one(uid=uid).transfer_syntax
        assert data == corpus.stored[uid], uid


def test_movescu_compressed_and_exotic_syntaxes_sent_as_stored(
        node: RunningNode, corpus: Corpus, storescp: Any) -> None:
    """JPEG 2000, JPEG-LS, RLE, deflated, big endian: all sent as stored, unconverted."""
    scp = storescp("STORESCP", "+xa")
    proc = dcmtk_retrieve("movescu", node, "PATIENT", {"PatientID": "RETR-C"},
                          "-aem", "STORESCP", model="PATIENT")
    assert _FINAL_RESPONSE.findall(proc.stdout + proc.stderr) == ["Success"], proc.stdout
    received = scp.received()
    assert_identical(received, corpus, corpus.uids(patient="RETR-C"))
    for uid, data in received.items():
        meta = pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == corpus.one(uid=uid).transfer_syntax


# --- C-MOVE with pynetdicom: levels, models, counts --------------------------------------


LEVEL_CASES = [
    ("PATIENT", "PATIENT"),
    ("PATIENT", "STUDY"),
    ("STUDY", "STUDY"),
    ("PATIENT", "SERIES"),
    ("STUDY", "SERIES"),
    ("PATIENT", "IMAGE"),
    ("STUDY", "IMAGE"),
]


def _request(corpus: Corpus, model: str, level: str) -> tuple[Dataset, set[str]]:
    study = corpus.studies("RETR-A")[0]
    series = corpus.series_of(study)
    keys: dict[str, Any] = {}
    if model == "PATIENT":
        keys["PatientID"] = "RETR-A"
    if level == "PATIENT":
        return identifier(level, **keys), corpus.uids(patient="RETR-A")
    keys["StudyInstanceUID"] = study
    if level == "STUDY":
        return identifier(level, **keys), corpus.uids(study=study)
    if level == "SERIES":
        keys["SeriesInstanceUID"] = series[1]
        return identifier(level, **keys), corpus.uids(series=series[1])
    keys["SeriesInstanceUID"] = series[0]
    wanted = sorted(corpus.uids(series=series[0]))[:2]
    return identifier(level, SOPInstanceUID=wanted, **keys), set(wanted)


@pytest.mark.parametrize(("model", "level"), LEVEL_CASES)
def test_move_every_level_and_model(node: RunningNode, corpus: Corpus, ports: dict[str, int],
                                    model: str, level: str) -> None:
    request, uids = _request(corpus, model, level)
    with PyStoreSCP("PYSCP", ports["PYSCP"]) as scp:
        outcome = pynetdicom_move(node, request, "PYSCP", model)
    assert outcome.status == 0x0000
    assert_counts(outcome, completed=len(uids))
    assert len(outcome.pending) == len(uids) - 1
    assert set(scp.received) == uids
    assert all(scp.received[u][1] == corpus.stored[u] for u in uids)


@pytest.mark.parametrize(("model", "level"), LEVEL_CASES)
def test_move_of_nothing_fails_without_contacting_the_destination(
        node: RunningNode, corpus: Corpus, ports: dict[str, int], model: str,
        level: str) -> None:
    """Unknown UIDs at every level: 0xC000 saying so, not Success with zero.  NOBODY
    listens nowhere: contacting it would have answered 0xA702."""
    unknown = [("PATIENT", "PatientID", "NOBODY-" + generate_uid()[-8:]),
               ("STUDY", "StudyInstanceUID", generate_uid()),
               ("SERIES", "SeriesInstanceUID", generate_uid()),
               ("IMAGE", "SOPInstanceUID", generate_uid())]
    depth = [lvl for lvl, _, _ in unknown].index(level)
    keys = {keyword: value for _, keyword, value in unknown[:depth + 1]}
    outcome = pynetdicom_move(node, identifier(level, **keys), "NOBODY", model)
    assert (outcome.status, outcome.final.ErrorComment) == \
        (0xC000, "no instance matches the identifier")
    assert outcome.pending == []


def test_get_of_named_instances_reports_those_not_found(node: RunningNode,
                                                        corpus: Corpus) -> None:
    """Two of four SOP Instance UIDs exist: both sent, the others listed as failed."""
    present = sorted(corpus.uids(patient="RETR-N"))[:2]
    absent = [generate_uid(), generate_uid()]
    request = identifier("IMAGE", StudyInstanceUID=corpus.one(patient="RETR-N").study,
                         SeriesInstanceUID=corpus.one(patient="RETR-N").series,
                         SOPInstanceUID=[present[0], absent[0], present[1], absent[1]])
    outcome, received = pynetdicom_get(node, request)
    assert outcome.status == 0xB000
    assert (outcome.count("Completed"), outcome.count("Failed")) == (2, 2)
    assert outcome.failed_uids == set(absent)
    assert set(received) == set(present)


# --- refusals ----------------------------------------------------------------------------


def test_unknown_destination_refused_with_comment(node: RunningNode, corpus: Corpus,
                                                  ports: dict[str, int]) -> None:
    study = corpus.studies("RETR-A")[0]
    with PyStoreSCP("PYSCP", ports["PYSCP"]) as scp:
        outcome = pynetdicom_move(node, identifier("STUDY", StudyInstanceUID=study),
                                  "ELSEWHERE")
        time.sleep(0.2)
    assert outcome.status == 0xA801
    assert "ELSEWHERE" in outcome.final.ErrorComment
    assert outcome.pending == [] and scp.received == {}


def test_unknown_destination_with_movescu(node: RunningNode, corpus: Corpus) -> None:
    study = corpus.studies("RETR-A")[0]
    proc = dcmtk_retrieve("movescu", node, "STUDY", {"StudyInstanceUID": study},
                          "-aem", "ELSEWHERE")
    output = proc.stdout + proc.stderr
    assert _FINAL_RESPONSE.findall(output) == ["Refused: MoveDestinationUnknown"], output


@pytest.mark.parametrize("request_keys", [
    {"QueryRetrieveLevel": "STUDY"},                           # no Study Instance UID
    {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "*"},  # a wildcard
    {"QueryRetrieveLevel": "FRAME", "StudyInstanceUID": "1.2.3"},
    {"StudyInstanceUID": "1.2.3"},                             # no level
])
def test_bad_identifier_refused(node: RunningNode, corpus: Corpus, request_keys: dict[str, str],
                                ports: dict[str, int]) -> None:
    request = Dataset()
    for keyword, value in request_keys.items():
        setattr(request, keyword, value)
    with PyStoreSCP("PYSCP", ports["PYSCP"]) as scp:
        outcome = pynetdicom_move(node, request, "PYSCP")
        get_outcome, got = pynetdicom_get(node, request)
    for result in (outcome, get_outcome):
        assert result.status == 0xA900, result.final
        assert result.final.ErrorComment
    assert scp.received == {} and got == {}


def test_destination_refusing_a_sop_class_counts_failures(
        node: RunningNode, corpus: Corpus, ports: dict[str, int]) -> None:
    mr = corpus.uids(patient="RETR-A", sop_class=MR_IMAGE)
    ct = corpus.uids(patient="RETR-A", sop_class=CT_IMAGE)
    with PyStoreSCP("CT_ONLY", ports["CT_ONLY"], [CT_IMAGE]) as scp:
        some = pynetdicom_move(node, identifier("PATIENT", PatientID="RETR-A"), "CT_ONLY",
                               "PATIENT")
        series = corpus.one(uid=next(iter(mr))).series
        none = pynetdicom_move(node, identifier("SERIES", StudyInstanceUID=corpus.one(
            uid=next(iter(mr))).study, SeriesInstanceUID=series), "CT_ONLY")
    assert some.status == 0xB000
    assert_counts(some, completed=len(ct), failed=len(mr))
    assert some.failed_uids == mr
    assert set(scp.received) == ct
    assert none.status == 0xA702
    assert_counts(none, completed=0, failed=len(mr))
    assert none.failed_uids == mr


@pytest.mark.parametrize(("destination", "comment"), [
    ("NOBODY", "cannot be reached"),         # nothing listens on its port
    ("UNCOMPRESSED", "rejected the association"),  # an SCP of another AE title
])
def test_destination_refusing_the_association_fails_every_instance(
        node: RunningNode, corpus: Corpus, ports: dict[str, int], destination: str,
        comment: str) -> None:
    # (Not storescp --refuse: it closes the connection as it sends A-ASSOCIATE-RJ, and
    # the rejection is lost about half the time: read as "no answer" by pynetdicom too.)
    study = corpus.studies("RETR-A")[0]
    with contextlib.ExitStack() as stack:
        if destination != "NOBODY":
            refusing = stack.enter_context(PyStoreSCP("SOMEONE_ELSE", ports[destination]))
            refusing.ae.require_called_aet = True
        outcome = pynetdicom_move(node, identifier("STUDY", StudyInstanceUID=study),
                                  destination)
    uids = corpus.uids(study=study)
    assert outcome.status == 0xA702
    assert comment in outcome.final.ErrorComment
    assert_counts(outcome, completed=0, failed=len(uids))
    assert outcome.failed_uids == uids
    assert echoscu(node).returncode == 0


# --- transfer syntaxes -----------------------------------------------------------------


def test_compressed_to_uncompressed_only_destination_decompressed(
        node: RunningNode, corpus: Corpus, storescp: Any) -> None:
    scp = storescp("UNCOMPRESSED")  # storescp's default: uncompressed syntaxes only
    compressed = corpus.one(name="JPEG2000.dcm")
    request = identifier("SERIES", StudyInstanceUID=compressed.study,
                         SeriesInstanceUID=compressed.series)
    outcome = pynetdicom_move(node, request, "UNCOMPRESSED")
    uids = corpus.uids(series=compressed.series)
    assert outcome.status == 0x0000, outcome.final
    assert_counts(outcome, completed=len(uids))
    received = {uid: pydicom.dcmread(BytesIO(data)) for uid, data in scp.received().items()}
    assert set(received) == uids
    for uid, got in received.items():
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert_same_pixels(got, corpus.one(uid=uid))


# --- transcoding every syntax pydicom's test files come in --------------------------------


def _part10(uid: str, sop_class: str, syntax: str, data: bytes) -> Dataset:
    """A received dataset's bytes, read in the transfer syntax they came in."""
    meta = b"\0" * 128 + b"DICM" + retrieve.file_meta(sop_class, uid, syntax)
    return pydicom.dcmread(BytesIO(meta + data))


def assert_same_pixels(got: Dataset, original: Instance) -> None:
    """``got`` is ``original`` transcoded: same instance, the pixels pydicom decodes from
    the original file, flagged lossy if its syntax may have been."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = pydicom.dcmread(TESTDATA / original.name if original.name else original.path)
        expected = source.pixel_array
    assert got.SOPInstanceUID == original.uid
    assert (got.Rows, got.Columns) == (source.Rows, source.Columns)
    assert (got.pixel_array == expected).all(), original.name
    if transcode.is_lossy(original.transfer_syntax):
        assert got.LossyImageCompression == "01", original.name


def _retr_t(corpus: Corpus) -> tuple[Dataset, set[str], str]:
    """The RETR-T study's request, the UIDs that can be transcoded and the one that
    cannot."""
    bad = corpus.one(patient="RETR-T", name=UNDECODABLE).uid
    request = identifier("STUDY", StudyInstanceUID=corpus.studies("RETR-T")[0])
    return request, corpus.uids(patient="RETR-T") - {bad}, bad


def test_every_syntax_moved_to_a_destination_taking_only_little_endian(
        node: RunningNode, corpus: Corpus, ports: dict[str, int]) -> None:
    """pydicom's JPEG, JPEG-LS, JPEG 2000, RLE, deflated and big endian images arrive in
    Explicit/Implicit VR Little Endian, their pixels those pydicom decodes; the one no
    decoder reads fails with its reason and the others still arrive."""
    request, good, bad = _retr_t(corpus)
    assert {corpus.one(uid=u).transfer_syntax for u in good} >= set(TS_FLAGS) - {
        ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    with PyStoreSCP("PYSCP", ports["PYSCP"],
                    syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as scp:
        outcome = pynetdicom_move(node, request, "PYSCP")
    assert outcome.status == 0xB000, outcome.final
    assert_counts(outcome, completed=len(good), failed=1)
    assert outcome.failed_uids == {bad}
    assert outcome.final.ErrorComment.startswith("cannot decode JPEG Extended")
    assert set(scp.received) == good
    for uid, (syntax, data) in scp.received.items():
        original = corpus.one(uid=uid)
        assert syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        assert_same_pixels(_part10(uid, original.sop_class, syntax, data), original)
    assert re.search(rf"C-MOVE MOVESCU\S+ level=STUDY dest=PYSCP\S+ -> 0xB000 cannot decode "
                     rf"JPEG Extended.*matched={len(good) + 1} completed={len(good)} failed=1 "
                     rf"warning=0 converted={len(good)}", node.log())


def test_every_syntax_moved_to_an_implicit_only_storescp(
        node: RunningNode, corpus: Corpus, storescp: Any) -> None:
    scp = storescp("IMPLICIT", "+xi")
    request, good, bad = _retr_t(corpus)
    outcome = pynetdicom_move(node, request, "IMPLICIT")
    assert outcome.status == 0xB000, outcome.final
    assert outcome.failed_uids == {bad}
    received = {uid: pydicom.dcmread(BytesIO(data)) for uid, data in scp.received().items()}
    assert set(received) == good
    for uid, got in received.items():
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert_same_pixels(got, corpus.one(uid=uid))


def test_every_syntax_got_by_getscu_taking_uncompressed_only(
        node: RunningNode, corpus: Corpus, tmp_path: Path) -> None:
    """getscu proposes the uncompressed syntaxes only (its default)."""
    _, good, bad = _retr_t(corpus)
    proc = dcmtk_retrieve("getscu", node, "STUDY",
                          {"StudyInstanceUID": corpus.studies("RETR-T")[0]},
                          "+B", "-od", str(tmp_path))
    output = proc.stdout + proc.stderr
    assert "C-GET Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in output
    assert re.search(rf"Completed Suboperations +: {len(good)}\s.*Failed Suboperations +: 1\s",
                     output, re.DOTALL), output
    received = {str(p_ds.SOPInstanceUID): p_ds for p_ds in
                (pydicom.dcmread(p) for p in tmp_path.iterdir())}
    assert set(received) == good, output
    for uid, got in received.items():
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert_same_pixels(got, corpus.one(uid=uid))
    assert bad not in received


def test_every_syntax_got_by_pynetdicom_taking_uncompressed_only(
        node: RunningNode, corpus: Corpus) -> None:
    request, good, bad = _retr_t(corpus)
    classes = tuple({corpus.one(uid=u).sop_class for u in good | {bad}})
    outcome, received = pynetdicom_get(node, request, classes=classes,
                                       syntaxes=(ImplicitVRLittleEndian,))
    assert outcome.status == 0xB000, outcome.final
    assert_counts(outcome, completed=len(good), failed=1)
    assert outcome.failed_uids == {bad}
    assert set(received) == good
    for uid, (syntax, data) in received.items():
        original = corpus.one(uid=uid)
        assert syntax == ImplicitVRLittleEndian
        assert_same_pixels(_part10(uid, original.sop_class, syntax, data), original)


def test_compressed_sent_as_stored_when_accepted_even_with_uncompressed_offered(
        node: RunningNode, corpus: Corpus) -> None:
    """Transcoding is the fallback only: a requestor accepting every syntax gets the
    stored bytes (the one that cannot be decoded too)."""
    request, _, _ = _retr_t(corpus)
    uids = corpus.uids(patient="RETR-T")
    classes = tuple({corpus.one(uid=u).sop_class for u in uids})
    outcome, received = pynetdicom_get(node, request, classes=classes, syntaxes=(
        ExplicitVRLittleEndian, ImplicitVRLittleEndian, *sorted(
            {corpus.one(uid=u).transfer_syntax for u in uids})))
    assert outcome.status == 0x0000
    assert set(received) == uids
    for uid, (syntax, data) in received.items():
        assert syntax == corpus.one(uid=uid).transfer_syntax
        assert data == corpus.stored[uid]


def test_explicit_vr_converted_for_implicit_only_destination(
        node: RunningNode, corpus: Corpus, storescp: Any) -> None:
    scp = storescp("IMPLICIT", "+xi")
    study = corpus.studies("RETR-A")[0]
    outcome = pynetdicom_move(node, identifier("STUDY", StudyInstanceUID=study), "IMPLICIT")
    uids = corpus.uids(study=study)
    assert outcome.status == 0x0000
    assert_counts(outcome, completed=len(uids))
    received = scp.received()
    assert set(received) == uids
    for uid, data in received.items():
        got = pydicom.dcmread(BytesIO(data))
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        original = corpus.one(uid=uid)
        if original.transfer_syntax == ImplicitVRLittleEndian:  # sent as stored
            assert dataset_bytes(data) == corpus.stored[uid]
        expected = pydicom.dcmread(original.path)
        assert got.PixelData == expected.PixelData
        private = got[0x00091001].value  # UN once read back from implicit VR
        assert (private.decode() if isinstance(private, bytes) else private).strip() == "1.5"
        assert [e.tag for e in got] == [e.tag for e in expected]


def test_deflated_and_big_endian_converted_for_implicit_only_destination(
        node: RunningNode, corpus: Corpus, storescp: Any) -> None:
    scp = storescp("IMPLICIT", "+xi")
    deflated = corpus.one(transfer_syntax=DeflatedExplicitVRLittleEndian)
    request = identifier("SERIES", StudyInstanceUID=deflated.study,
                         SeriesInstanceUID=deflated.series)
    outcome = pynetdicom_move(node, request, "IMPLICIT")
    assert outcome.status == 0x0000
    assert_counts(outcome, completed=2)
    received = {uid: pydicom.dcmread(BytesIO(data)) for uid, data in scp.received().items()}
    big = corpus.one(transfer_syntax=ExplicitVRBigEndian)
    little = pydicom.dcmread(TESTDATA / "MR_small.dcm")  # the same image, little endian
    assert received[big.uid].PixelData == little.PixelData
    assert received[big.uid].Rows == little.Rows
    assert received[deflated.uid].PixelData == pydicom.dcmread(deflated.path).PixelData


# --- failures during the transfer ------------------------------------------------------


def _move_in_background(node: RunningNode, request: Dataset, destination: str,
                        **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["outcome"] = pynetdicom_move(node, request, destination, **kw)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_destination_killed_mid_move(node: RunningNode, corpus: Corpus, storescp: Any) -> None:
    scp = storescp("SLOW", "+xa", "--sleep-after", "1")
    study = corpus.studies("RETR-N")[0]
    uids = corpus.uids(study=study)
    started = time.monotonic()
    thread, result = _move_in_background(node, identifier("STUDY", StudyInstanceUID=study),
                                         "SLOW")
    wait_for(lambda: scp.received(), 20, 0.05, "a first instance at the destination")
    scp.kill()
    thread.join(30)
    assert not thread.is_alive(), "the C-MOVE did not end after the destination died"
    outcome = result["outcome"]
    assert outcome.status in (0xB000, 0xA702)
    assert outcome.count("Failed") >= len(uids) - 3
    assert outcome.count("Completed") + outcome.count("Failed") == len(uids)
    assert outcome.failed_uids and outcome.failed_uids <= uids
    assert time.monotonic() - started < 20
    assert echoscu(node).returncode == 0


def test_cancel_mid_move(node: RunningNode, corpus: Corpus, ports: dict[str, int]) -> None:
    study = corpus.studies("RETR-N")[0]
    with PyStoreSCP("PYSCP", ports["PYSCP"], delay=0.1) as scp:
        outcome = pynetdicom_move(node, identifier("STUDY", StudyInstanceUID=study), "PYSCP",
                                  cancel_after=2)
    assert outcome.status == 0xFE00
    remaining = outcome.count("Remaining")
    completed = outcome.count("Completed")
    assert remaining > 0 and completed >= 2
    assert completed + remaining + outcome.count("Failed") == len(corpus.uids(study=study))
    assert len(scp.received) == completed
    assert re.search(r"C-MOVE MOVESCU\S+ level=STUDY dest=PYSCP\S+ -> 0xFE00", node.log())


def test_requestor_aborting_mid_move_stops_the_transfer(node: RunningNode, corpus: Corpus,
                                                        ports: dict[str, int]) -> None:
    study = corpus.studies("RETR-N")[0]
    request = identifier("STUDY", StudyInstanceUID=study)
    with PyStoreSCP("PYSCP", ports["PYSCP"], delay=0.1) as scp, \
            association(node, [(MOVE["STUDY"], ExplicitVRLittleEndian)], "ABORTER") as assoc:
        for n, _ in enumerate(assoc.send_c_move(request, "PYSCP", MOVE["STUDY"])):
            if n == 1:
                assoc.abort()
                break
        line = wait_for(lambda: re.search(r"C-MOVE ABORTER\S+ .*", node.log()), 10,
                        message="the C-MOVE log line")
        time.sleep(0.3)
        received = len(scp.received)
    assert "no final response" in line.group(0)
    assert received < len(corpus.uids(study=study))
    assert echoscu(node).returncode == 0


def test_movescu_cancel(node: RunningNode, corpus: Corpus, ports: dict[str, int]) -> None:
    study = corpus.studies("RETR-N")[0]
    with PyStoreSCP("SLOW", ports["SLOW"], delay=0.1):
        proc = dcmtk_retrieve("movescu", node, "STUDY", {"StudyInstanceUID": study},
                              "-aem", "SLOW", "--cancel", "2")
    assert "Cancel" in " ".join(_FINAL_RESPONSE.findall(proc.stdout + proc.stderr)), \
        proc.stdout + proc.stderr


# --- C-GET -------------------------------------------------------------------------------


def test_getscu_study_byte_identical(node: RunningNode, corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "getscu"
    out.mkdir()
    study = corpus.studies("RETR-A")[0]
    proc = dcmtk_retrieve("getscu", node, "STUDY", {"StudyInstanceUID": study},
                          "+B", "-od", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    received = {str(pydicom.filereader.read_file_meta_info(p).MediaStorageSOPInstanceUID):
                p.read_bytes() for p in out.iterdir()}
    assert set(received) == corpus.uids(study=study)
    # getscu proposes one context per SOP class listing the uncompressed syntaxes and
    # gets Explicit VR Little Endian: the implicit VR instances are converted to it.
    explicit = corpus.uids(study=study, transfer_syntax=ExplicitVRLittleEndian)
    assert_identical({u: d for u, d in received.items() if u in explicit}, corpus, explicit)
    for uid in set(received) - explicit:
        got = pydicom.dcmread(BytesIO(received[uid]))
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.PixelData == pydicom.dcmread(corpus.one(uid=uid).path).PixelData
    assert re.search(r"C-GET GETSCU\S+ level=STUDY -> 0x0000: matched=5 completed=5",
                     node.log())


@pytest.mark.parametrize(("model", "level"), [("PATIENT", "PATIENT"), ("STUDY", "SERIES"),
                                              ("PATIENT", "IMAGE")])
def test_pynetdicom_get(node: RunningNode, corpus: Corpus, model: str, level: str) -> None:
    request, uids = _request(corpus, model, level)
    outcome, received = pynetdicom_get(node, request, model)
    assert outcome.status == 0x0000
    assert_counts(outcome, completed=len(uids))
    assert set(received) == uids
    assert all(received[u][1] == corpus.stored[u] for u in uids)


def test_get_converts_or_fails_by_what_the_requestor_accepts(node: RunningNode,
                                                             corpus: Corpus) -> None:
    study = corpus.studies("RETR-A")[0]
    uids = corpus.uids(study=study)
    outcome, received = pynetdicom_get(node, identifier("STUDY", StudyInstanceUID=study),
                                       syntaxes=(ImplicitVRLittleEndian,))
    assert outcome.status == 0x0000
    assert {ts for ts, _ in received.values()} == {ImplicitVRLittleEndian}
    assert set(received) == uids
    compressed = corpus.one(name="JPEG2000.dcm")
    request = identifier("SERIES", StudyInstanceUID=compressed.study,
                         SeriesInstanceUID=compressed.series)
    uids = corpus.uids(series=compressed.series)
    classes = {corpus.one(uid=u).sop_class for u in uids}
    outcome, received = pynetdicom_get(node, request, classes=tuple(classes))
    assert outcome.status == 0x0000  # decompressed
    assert set(received) == uids
    assert {ts for ts, _ in received.values()} == {ExplicitVRLittleEndian}
    other = next(c for c in (CT_IMAGE, MR_IMAGE) if c not in classes)
    outcome, received = pynetdicom_get(node, request, classes=(other,))
    assert outcome.status == 0xA702
    assert outcome.failed_uids == uids
    assert outcome.final.ErrorComment.startswith("SOP class not accepted")
    assert received == {}


def test_cancel_mid_get(node: RunningNode, corpus: Corpus) -> None:
    study = corpus.studies("RETR-N")[0]
    outcome, received = pynetdicom_get(node, identifier("STUDY", StudyInstanceUID=study),
                                       delay=0.1, cancel_after=2)
    assert outcome.status == 0xFE00
    assert outcome.count("Remaining") > 0
    assert outcome.count("Completed") == len(received) >= 2
    assert echoscu(node).returncode == 0


def test_node_keeps_serving(node: RunningNode, corpus: Corpus) -> None:
    assert node.running
    assert echoscu(node).returncode == 0
    assert "unexpected error" not in node.log()

