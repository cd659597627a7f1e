"""Helpers shared by the test suites: DCMTK and pynetdicom clients, Part-10 files,
archive consistency checks.

Importable as ``helpers`` from any test module (pytest puts ``tests/`` on ``sys.path``
through ``tests/conftest.py``); the DICOM client helpers are re-exported by the conftest.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: storescu option proposing each transfer syntax (besides the uncompressed ones).
TS_FLAGS: dict[str, str] = {
    "1.2.840.10008.1.2": "-xi",          # implicit VR little endian
    "1.2.840.10008.1.2.1": "-xe",        # explicit VR little endian
    "1.2.840.10008.1.2.2": "-xb",        # explicit VR big endian
    "1.2.840.10008.1.2.1.99": "-xd",     # deflated explicit VR little endian
    "1.2.840.10008.1.2.4.50": "-xy",     # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",     # JPEG extended
    "1.2.840.10008.1.2.4.70": "-xs",     # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",     # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",     # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",     # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",     # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",        # RLE lossless
}

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class Peer(Protocol):
    """Anything with a DICOM port and AE title (a RunningNode, a storescp...)."""

    port: int
    ae_title: str


@dataclass
class SimplePeer:
    port: int
    ae_title: str
    host: str = "127.0.0.1"


# --- small utilities ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process ``pid`` has used so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` updated recursively with ``overrides`` (mappings merged, the rest replaced)."""
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


# --- Part-10 files -----------------------------------------------------------------


def transfer_syntax_of(path: str | Path) -> str:
    """The file's (0002,0010) Transfer Syntax UID, '' when it has no readable meta."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = pydicom.filereader.read_file_meta_info(path)
        return str(meta.get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - not a Part-10 file: no flag
        return ""


def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + prefix + file meta group, dataset) of a Part-10 byte string.

    The meta group is always explicit VR little endian; the dataset is every byte after
    it, exactly as encoded (compressed, deflated or big endian alike).
    """
    if data[128:132] != b"DICM":
        raise ValueError("not a Part-10 file (no DICM prefix at offset 128)")
    offset = 132
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                b"UT", b"UV"}
    while offset + 8 <= len(data):
        group, _ = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            break
        vr = data[offset + 4:offset + 6]
        if vr in long_vrs:
            (length,) = struct.unpack_from("<I", data, offset + 8)
            offset += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            offset += 8 + length
    return data[:offset], data[offset:]


def dataset_bytes(data: bytes) -> bytes:
    return split_part10(data)[1]


def make_dataset(*, patient_id: str = "PAT-1", patient_name: str = "DOE^JOHN",
                 study_uid: str | None = None, series_uid: str | None = None,
                 sop_uid: str | None = None, sop_class: str = CT_IMAGE,
                 modality: str = "CT", **attributes: Any) -> Dataset:
    """A small image dataset with the attributes the archive keys on."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.Modality = modality
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def image_dataset(pixels: bytes | None = None, **kwargs: Any) -> Dataset:
    """A 64x64 16-bit CT image (random pixels unless given); see :func:`make_dataset`."""
    ds = make_dataset(Rows=64, Columns=64, BitsAllocated=16, BitsStored=12, HighBit=11,
                      PixelRepresentation=0, SamplesPerPixel=1,
                      PhotometricInterpretation="MONOCHROME2", **kwargs)
    ds.PixelData = pixels if pixels is not None else os.urandom(64 * 64 * 2)
    ds["PixelData"].VR = "OW"
    return ds


def write_images(directory: Path, count: int, *, study_uid: str | None = None,
                 series_uid: str | None = None, **kwargs: Any) -> list[Path]:
    """``count`` Part-10 CT images of one series (explicit VR little endian, nothing
    DCMTK re-encodes when it sends them), named 000.dcm, 001.dcm..."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    paths = []
    for n in range(count):
        path = directory / f"{n:03d}.dcm"
        path.write_bytes(to_part10(image_dataset(study_uid=study_uid, series_uid=series_uid,
                                                 InstanceNumber=n + 1, **kwargs)))
        paths.append(path)
    return paths


def to_part10(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Encode ``ds`` as a Part-10 file (meta group built from the dataset)."""
    ds = ds.copy()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = str(ds.get("SOPInstanceUID", "")).strip() or generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def part10_with_raw_dataset(dataset: bytes, sop_class: str = CT_IMAGE,
                            sop_instance: str | None = None,
                            transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """A Part-10 file whose meta group is valid and whose dataset is ``dataset`` verbatim
    (garbage, or a dataset the meta group lies about)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance or generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue() + dataset


# --- DCMTK clients -----------------------------------------------------------------


class StoreResult(subprocess.CompletedProcess):
    """A storescu run (one call per transfer syntax) as one CompletedProcess.

    ``args`` lists every command, ``returncode`` is the worst, ``stdout``/``stderr`` are
    concatenated; ``calls`` keeps each call and ``responses`` maps every file (as given)
    to storescu's verdict: "Success", "Failed: ...", "Warning: ...", "Unknown Status:
    0x...", "ignored" (storescu could not read the file), "no response" or "not sent".
    """

    def __init__(self, calls: list[subprocess.CompletedProcess[str]],
                 responses: dict[str, str]) -> None:
        super().__init__([c.args for c in calls],
                         max((c.returncode for c in calls), key=abs, default=0),
                         "".join(c.stdout or "" for c in calls),
                         "".join(c.stderr or "" for c in calls))
        self.calls = calls
        self.responses = responses

    @property
    def output(self) -> str:
        return "\n".join(f"$ {' '.join(map(str, c.args))}\n{c.stdout}{c.stderr}"
                         for c in self.calls)

    def succeeded(self) -> list[str]:
        return [f for f, r in self.responses.items() if r == "Success"]

    def failed(self) -> list[str]:
        return [f for f, r in self.responses.items() if r != "Success"]


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response(?: \((.*)\))?")
_IGNORED = re.compile(r"in file: (.+), ignoring file")
_STORE_FAILED = re.compile(r"Store Failed, file: (.+?):?$")


def parse_storescu(output: str, files: Iterable[str]) -> dict[str, str]:
    """Verdict per file from the output of ``storescu -v``."""
    responses = {f: "not sent" for f in files}
    current: str | None = None
    for line in output.splitlines():
        if m := _IGNORED.search(line):
            responses[m.group(1).strip()] = "ignored"
        elif m := _SENDING.search(line):
            current = m.group(1).strip()
            responses[current] = "no response"
        elif (m := _RESPONSE.search(line)) and current is not None:
            responses[current] = (m.group(1) or "response").strip()
            current = None
        elif (m := _STORE_FAILED.search(line)) and responses.get(m.group(1).strip()) in (
                "no response", "not sent"):
            responses[m.group(1).strip()] = "Failed: " + line.strip()
    return responses


def storescu_command(peer: Peer, files: list[str], flag: str | None,
                     extra_args: Iterable[str] = (), halt: bool = False) -> list[str]:
    cmd = ["storescu", "-v", "-R", "-aec", peer.ae_title]
    if not halt:
        cmd.append("-nh")
    if flag:
        cmd.append(flag)
    cmd += [*extra_args, getattr(peer, "host", "127.0.0.1"), str(peer.port), *files]
    return cmd


def storescu(node: Peer, *files: str | Path, extra_args: Iterable[str] = (),
             halt: bool = False, timeout: float = 300) -> StoreResult:
    """Send files with DCMTK's storescu, one call per transfer syntax.

    Each call gets ``-R`` (only the contexts the files need), ``-v`` (per-file responses
    to parse), ``-nh`` unless ``halt`` (keep going after a failed store) and the ``-x?``
    option proposing the files' own transfer syntax, so nothing is converted on the way.
    The result's ``responses`` maps every file to storescu's verdict.
    """
    groups: dict[str | None, list[str]] = {}
    for f in map(str, files):
        groups.setdefault(TS_FLAGS.get(transfer_syntax_of(f)), []).append(f)
    calls, responses = [], {}
    for flag, group in groups.items():
        proc = subprocess.run(storescu_command(node, group, flag, extra_args, halt),
                              capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout,
                              errors="replace")
        calls.append(proc)
        responses.update(parse_storescu(proc.stdout + proc.stderr, group))
    return StoreResult(calls, responses)


def echoscu(node: Peer, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-v", "-aec", node.ae_title, getattr(node, "host", "127.0.0.1"),
         str(node.port)], capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout)


class StoreSCP:
    """DCMTK's storescp in bit-preserving mode: what a storescu call really sends.

    storescu re-encodes what it reads (group lengths dropped, padding, deflate level), so
    the bytes a peer receives are not always the file's; storescp ``+B`` writes them as
    they arrived.
    """

    def __init__(self, directory: Path, ae_title: str = "CAPTURE") -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory.parent / f"{directory.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            ["storescp", "+xa", "+B", "+uf", "-aet", self.ae_title, "-od",
             str(self.directory), str(self.port)], stdout=log, stderr=subprocess.STDOUT,
            env=DCMTK_ENV)
        wait_for(lambda: port_open(self.port), 10, message="storescp to listen")
        return self

    def take(self) -> dict[str, bytes]:
        """The files received so far, by SOP Instance UID, removed from the folder."""
        received = {}
        for path in self.directory.iterdir():
            meta = pydicom.filereader.read_file_meta_info(path)
            received[str(meta.MediaStorageSOPInstanceUID)] = path.read_bytes()
            path.unlink()
        return received

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- pynetdicom client -------------------------------------------------------------


def _nodelay(event: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def responses_for_the_sender(assoc: Any) -> Any:
    """Keep an association's reactor thread from taking responses off its DIMSE queue;
    returns ``assoc``.

    pynetdicom pauses the reactor for each request it sends by clearing an event and
    polling a flag the reactor sets just *before* waiting on that event: the flag can
    be stale (the reactor is past the event, about to read the queue), and the reactor
    then takes the response ("Received unexpected C-FIND service message", dropped)
    while ``send_c_find`` / ``send_c_store`` waits out the DIMSE timeout, or a pending
    C-FIND answer is silently lost.  Three threads sending C-FIND after C-FIND for two
    minutes beside a storing one: 3 of 6,669 waited out the timeout, 27 answers were
    lost; none since.  The reactor reads the queue without blocking only to serve
    requests from the peer: it is left only those (the node's own pynetdicom
    associations hold their reactor instead: ``archive.dimse.common.reactor_held``).
    """
    dimse = assoc.dimse
    waiting, take = dimse.msg_queue, dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if block:  # the sender, waiting for its response
            return take(block=True)
        with waiting.mutex:  # the reactor, looking for a request to serve
            if not waiting.queue or not getattr(waiting.queue[0][1], "is_valid_request",
                                                False):
                return None, None
            item = waiting.queue.popleft()
            waiting.not_full.notify()
            return item

    dimse.get_msg = get_msg
    return assoc


@contextlib.contextmanager
def association(node: Peer, contexts: Iterable[tuple[str, str]] = (),
                ae_title: str = "PYSCU", verification: bool = True,
                user: str | None = None, ext_neg: Iterable[Any] = (),
                evt_handlers: Iterable[Any] = ()) -> Iterator[Any]:
    """A pynetdicom association (TCP_NODELAY on) proposing one presentation context per
    (SOP class, transfer syntax) pair, acting for ``user`` (a User Identity with the name
    only; None: none); released on exit.  ``ext_neg``: more extended negotiation items
    (SCP/SCU roles of a C-GET); ``evt_handlers``: more handlers."""
    from pynetdicom import AE, evt
    from pynetdicom.pdu_primitives import UserIdentityNegotiation
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in dict.fromkeys(contexts):
        ae.add_requested_context(sop_class, [syntax])
    if verification:
        ae.add_requested_context(Verification)
    identity = []
    if user is not None:
        identity.append(UserIdentityNegotiation())
        identity[0].user_identity_type = 1
        identity[0].primary_field = user.encode()
    assoc = ae.associate(getattr(node, "host", "127.0.0.1"), node.port,
                         ae_title=node.ae_title, ext_neg=[*identity, *ext_neg],
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *evt_handlers])
    if not assoc.is_established:
        raise AssertionError(f"association with {node.ae_title}:{node.port} not established")
    responses_for_the_sender(assoc)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


@contextlib.contextmanager
def raw_sending() -> Iterator[None]:
    """Make ``send_c_store(path)`` send the file's dataset bytes verbatim (no decoding,
    no re-encoding), as pynetdicom does with STORE_SEND_CHUNKED_DATASET."""
    from pynetdicom import _config

    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved


def file_context(path: str | Path) -> tuple[str, str]:
    """(SOP class, transfer syntax) of a Part-10 file, from its meta group."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


# --- archive invariants ------------------------------------------------------------


def consistency_problems(db: Any, bucket: str = "fs") -> list[str]:
    """Every way the archive's instances and GridFS files disagree with each other.

    Empty when each instance document (and each rejected one, kept until purged) names a
    whole GridFS file (and the originals it keeps) and each GridFS file (and chunk)
    belongs to one.
    """
    problems = []
    files = {f["_id"]: f for f in db[f"{bucket}.files"].find({}, {"length": 1, "chunkSize": 1})}
    chunks: dict[Any, set[int]] = {}
    for chunk in db[f"{bucket}.chunks"].find({}, {"files_id": 1, "n": 1}):
        chunks.setdefault(chunk["files_id"], set()).add(chunk["n"])
    referenced = set()
    for inst in [*db.instances.find({}, {"file_id": 1, "history": 1}),
                 *db.rejected.find({}, {"file_id": 1, "history": 1})]:
        referenced.add(inst["file_id"])
        for earlier in inst.get("history") or []:  # originals of corrected instances
            if earlier["file_id"] not in files:
                problems.append(f"instance {inst['_id']} names missing original "
                                f"{earlier['file_id']}")
            referenced.add(earlier["file_id"])
        if inst["file_id"] not in files:
            problems.append(f"instance {inst['_id']} names missing file {inst['file_id']}")
    for file_id, info in files.items():
        if file_id not in referenced:
            problems.append(f"GridFS file {file_id} belongs to no instance")
        expected = set(range(-(-info["length"] // info["chunkSize"])))
        if not expected <= chunks.get(file_id, set()):
            problems.append(f"GridFS file {file_id} lacks chunks "
                            f"{sorted(expected - chunks.get(file_id, set()))}")
    for file_id in set(chunks) - set(files):
        problems.append(f"chunks of {file_id} without a files document")
    return problems


def settled_counters(db: Any, timeout: float = 30) -> list[str]:
    """``counter_problems`` once the node's written-behind level updates are in (a node
    acknowledges a store before its level documents change: ``write_behind_seconds``)."""
    deadline = time.monotonic() + timeout
    while (problems := counter_problems(db)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return problems


def counter_problems(db: Any) -> list[str]:
    """Level documents whose counters or lists disagree with the instances."""
    problems = []
    instances = list(db.instances.find({}, {"SeriesInstanceUID": 1, "StudyInstanceUID": 1,
                                             "PatientID": 1, "Modality": 1, "SOPClassUID": 1}))
    by_series: dict[str, list[dict[str, Any]]] = {}
    for inst in instances:
        by_series.setdefault(inst["SeriesInstanceUID"], []).append(inst)
    series_docs = {s["_id"]: s for s in db.series.find()}
    if set(series_docs) != set(by_series):
        problems.append(f"series documents {sorted(set(series_docs) ^ set(by_series))} "
                        "without instances or missing")
    for uid, members in by_series.items():
        doc = series_docs.get(uid)
        if doc is None:
            continue
        if doc.get("NumberOfSeriesRelatedInstances") != len(members):
            problems.append(f"series {uid}: NumberOfSeriesRelatedInstances "
                            f"{doc.get('NumberOfSeriesRelatedInstances')} != {len(members)}")
        if sorted(doc.get("instances", [])) != sorted(m["_id"] for m in members):
            problems.append(f"series {uid}: instance list differs")
    by_study: dict[str, list[dict[str, Any]]] = {}
    for inst in instances:
        by_study.setdefault(inst["StudyInstanceUID"], []).append(inst)
    study_docs = {s["_id"]: s for s in db.studies.find()}
    if set(study_docs) != set(by_study):
        problems.append(f"study documents {sorted(set(study_docs) ^ set(by_study))} "
                        "without instances or missing")
    for uid, members in by_study.items():
        doc = study_docs.get(uid)
        if doc is None:
            continue
        n_series = len({m["SeriesInstanceUID"] for m in members})
        checks = {
            "NumberOfStudyRelatedInstances": (doc.get("NumberOfStudyRelatedInstances"),
                                              len(members)),
            "NumberOfStudyRelatedSeries": (doc.get("NumberOfStudyRelatedSeries"), n_series),
            "ModalitiesInStudy": (sorted(doc.get("ModalitiesInStudy", [])),
                                  sorted({m["Modality"] for m in members})),
            "SOPClassesInStudy": (sorted(doc.get("SOPClassesInStudy", [])),
                                  sorted({m["SOPClassUID"] for m in members})),
        }
        for key, (got, want) in checks.items():
            if got != want:
                problems.append(f"study {uid}: {key} {got} != {want}")
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for inst in instances:
        by_patient.setdefault(inst["PatientID"], []).append(inst)
    patient_docs = {p["_id"]: p for p in db.patients.find()}
    if set(patient_docs) != set(by_patient):
        problems.append(f"patient documents {sorted(set(patient_docs) ^ set(by_patient))} "
                        "without instances or missing")
    for pid, members in by_patient.items():
        doc = patient_docs.get(pid)
        if doc is None:
            continue
        checks = {
            "NumberOfPatientRelatedInstances": len(members),
            "NumberOfPatientRelatedSeries": len({m["SeriesInstanceUID"] for m in members}),
            "NumberOfPatientRelatedStudies": len({m["StudyInstanceUID"] for m in members}),
        }
        for key, want in checks.items():
            if doc.get(key) != want:
                problems.append(f"patient {pid!r}: {key} {doc.get(key)} != {want}")
    return problems


def identifier(level: str, **keys: Any) -> Dataset:
    """A C-FIND / C-MOVE / C-GET identifier at ``level`` with the given keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def stow_body(files: list[bytes]) -> tuple[bytes, str]:
    """A STOW-RS request body holding Part-10 ``files``, and its Content-Type."""
    boundary = f"stow-{uuid.uuid4().hex}"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + data + b"\r\n" for data in files) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(node: Any, files: list[bytes], auth: tuple[str, str] | None = None,
         **headers: str) -> requests.Response:
    """STOW-RS of ``files`` to the node's /studies."""
    body, content_type = stow_body(files)
    return requests.post(f"{node.http_url}/studies", data=body, auth=auth, timeout=120,
                         headers={"Content-Type": content_type, **headers})


class Raising:
    """A collection (or store) whose ``method`` raises ``error`` once, before touching
    anything: the database failing at one chosen step."""

    def __init__(self, target: Any, method: str, error: BaseException) -> None:
        self._target, self._method, self._error = target, method, error

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name != self._method or self._error is None:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            error, self._error = self._error, None
            raise error
        return call


def cpu_ms(pid: int) -> float:
    """CPU time all threads of a process have used so far (ms, from the scheduler's ns)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread just exited
            total += int(stat.read_text().split()[0])
    return total / 1e6
