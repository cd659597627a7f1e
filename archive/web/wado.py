"""WADO-RS (PS3.18 10.4): instances and their metadata, streamed.

A request names a study, a series or an instance; the instances it selects are those
a C-MOVE / C-GET of the same unique keys selects (:func:`archive.find.retrieve_plan`,
the access rules' instance filter included), so a hidden instance is not found, as one
that does not exist.  Files are sent as stored, chunk by chunk from GridFS
(:meth:`archive.gridstore.GridStore.stream_many`), never a whole study in memory;
metadata is each instance document's stored DICOM JSON, one at a time.

Bulk data: the stored DICOM JSON gives large binary values (Pixel Data, any binary
value over 1 KiB) as ``BulkDataURI`` ``gridfs:<file id>#<tag>``; the metadata served
names them by this service's URL instead, ``.../instances/{sop}/bulkdata/{path}``
(``path``: the tag, or for a value inside a sequence ``SEQTAG/ITEM/TAG``), which
:mod:`archive.bulkdata` answers from the stored file, as it answers ``/frames``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
from pydicom.dataset import Dataset

from archive import bulkdata, transcode
from archive.find import FIND_BATCH, Finder, projection, retrieve_plan
from archive.gridstore import GridStore
from archive.model import IMAGE, SERIES, STUDY
from archive.query import evaluate
from archive.web import multipart
from archive.web.negotiation import ANY_SYNTAX, DICOM, NotAcceptable

log = logging.getLogger("archive.web.wado")


def identifier(study: str, series: str | None = None, sop: str | None = None
               ) -> tuple[str, Dataset]:
    """The level and retrieve identifier of a WADO-RS path (UIDs checked already)."""
    ds = Dataset()
    ds.StudyInstanceUID = study
    level = STUDY
    if series is not None:
        ds.SeriesInstanceUID = series
        level = SERIES
    if sop is not None:
        ds.SOPInstanceUID = sop
        level = IMAGE
    ds.QueryRetrieveLevel = level
    return level, ds


def instances(finder: Finder, level: str, ident: Dataset,
              restriction: dict[str, Any] | None, fields: tuple[str, ...]
              ) -> Iterator[dict[str, Any]]:
    """Instance documents the identifier selects, as :meth:`Finder.instances` finds
    them, with ``fields`` read too (``dataset`` for metadata)."""
    plan = retrieve_plan(level, ident, restriction)
    wanted = projection({*plan.fields, *fields})
    for doc in finder.collection(IMAGE).find(plan.pre_filter, wanted, batch_size=FIND_BATCH):
        if evaluate(plan.exact, doc):
            yield doc


@dataclass(frozen=True)
class Item:
    sop: str
    transfer_syntax: str
    file_id: ObjectId


def items(finder: Finder, level: str, ident: Dataset,
          restriction: dict[str, Any] | None) -> list[Item]:
    """What a retrieve sends: one small record per instance, in the database's order."""
    found: dict[str, Item] = {}
    for doc in instances(finder, level, ident, restriction, ()):
        found.setdefault(doc["_id"], Item(doc["_id"], str(doc.get("TransferSyntaxUID", "")),
                                          doc["file_id"]))
    return list(found.values())


#: Pixel Data, Float Pixel Data, Double Float Pixel Data: what a rendered image shows.
PIXEL_TAGS = ("7FE00010", "7FE00008", "7FE00009")


def images(finder: Finder, level: str, ident: Dataset,
           restriction: dict[str, Any] | None) -> list[Item]:
    """The instances the identifier selects that hold pixels, for a study's or a
    series' thumbnail: a report, a key object selection or a rejection note in the study
    has none to show."""
    found: dict[str, Item] = {}
    for doc in instances(finder, level, ident, restriction,
                         tuple(f"dataset.{tag}" for tag in PIXEL_TAGS)):
        if any(tag in (doc.get("dataset") or {}) for tag in PIXEL_TAGS):
            found.setdefault(doc["_id"], Item(doc["_id"], str(doc.get("TransferSyntaxUID", "")),
                                              doc["file_id"]))
    return list(found.values())


def plan_syntaxes(selected: list[Item], accepted: set[str]) -> dict[str, str]:
    """What to send each instance in: its stored syntax when the client takes it (or
    any), else an uncompressed one it takes (Explicit VR Little Endian first) when
    the stored syntax can be decoded (:mod:`archive.transcode`).  NotAcceptable names
    the syntaxes that can be neither sent nor decoded for the client."""
    targets = [t for t in transcode.UNCOMPRESSED if t in accepted]
    plan: dict[str, str] = {}
    refused: set[str] = set()
    for item in selected:
        if ANY_SYNTAX in accepted or item.transfer_syntax in accepted:
            plan[item.sop] = item.transfer_syntax
        elif targets and transcode.decodable(item.transfer_syntax):
            plan[item.sop] = targets[0]
        else:
            refused.add(item.transfer_syntax)
    if refused:
        raise NotAcceptable(
            f"stored in {', '.join(sorted(refused))}, which the request does not accept"
            + (" and which cannot be decoded here" if targets else "")
            + " (ask for transfer-syntax=* to get the instances as stored)")
    return plan


def multipart_body(files: GridStore, selected: list[Item], plan: dict[str, str],
                   boundary: str) -> Iterator[bytes]:
    """The response body: one part per instance, its stored bytes a chunk at a time,
    or (``plan`` names another syntax) the instance transcoded, read whole.

    The first part's failure (FileNotFoundError, transcode.Undecodable) is raised, before
    anything is sent, for the caller to answer it; a later file that vanished meanwhile
    (a concurrent replacement), or a later instance whose decoding fails, ends the body
    early: the client sees a multipart body without its closing delimiter, never a wrong
    file.
    """
    streams = files.stream_many(item.file_id for item in selected)
    sent = False
    for item, (_, chunks) in zip(selected, streams, strict=True):
        syntax = plan[item.sop]
        content_type = f"{DICOM}; transfer-syntax={syntax}" if syntax else DICOM
        header = multipart.part_header(boundary, content_type)
        try:
            if syntax != item.transfer_syntax:
                chunks = iter((transcode.to_uncompressed(b"".join(chunks), syntax),))
            first = next(chunks, b"")
        except (FileNotFoundError, transcode.Undecodable) as exc:
            if not sent:
                raise
            log.error("WADO-RS: %s: %s; response cut short", item.sop, exc)
            return
        sent = True
        yield header + first
        try:
            yield from chunks
        except FileNotFoundError as exc:
            log.error("WADO-RS: %s: %s; response cut short", item.sop, exc)
            return
        yield multipart.CRLF
    yield multipart.closing(boundary)


def metadata_body(first: dict[str, Any], rest: Iterator[dict[str, Any]], base: str
                  ) -> Iterator[bytes]:
    """A JSON array of the instances' stored DICOM JSON, one document at a time, their
    bulk data named by URLs under ``base`` (the service's root)."""
    yield b"[" + _json(first, base)
    for doc in rest:
        yield b"," + _json(doc, base)
    yield b"]"


def _json(doc: dict[str, Any], base: str) -> bytes:
    dataset = doc.get("dataset", {})
    dataset = with_bulk_uris(dataset, instance_url(base, dataset) + "/bulkdata")
    return json.dumps(dataset, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _uid(dataset: dict[str, Any], tag: str) -> str:
    value = dataset.get(tag, {}).get("Value") or [""]
    return str(value[0])


def instance_url(base: str, dataset: dict[str, Any]) -> str:
    return (f"{base}/studies/{_uid(dataset, STUDY_UID)}/series/{_uid(dataset, SERIES_UID)}"
            f"/instances/{_uid(dataset, SOP_UID)}")


def with_bulk_uris(dataset: dict[str, Any], prefix: str, path: str = "") -> dict[str, Any]:
    """The dataset with each stored ``gridfs:`` BulkDataURI replaced by ``prefix/path``
    (the dataset itself when it has none; changed elements are copies)."""
    changed: dict[str, Any] = {}
    for key, elem in dataset.items():
        uri = elem.get("BulkDataURI")
        if uri is not None and uri.startswith("gridfs:"):
            changed[key] = {**elem, "BulkDataURI": f"{prefix}/{path}{key}"}
        elif elem.get("vr") == "SQ" and elem.get("Value"):
            items = elem["Value"]
            new = [with_bulk_uris(item, prefix, f"{path}{key}/{i}/")
                   for i, item in enumerate(items)]
            if any(a is not b for a, b in zip(new, items, strict=True)):
                changed[key] = {**elem, "Value": new}
    return {**dataset, **changed} if changed else dataset


STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


def parse_frame_list(text: str) -> list[int]:
    """``"1,3,5"`` -> [1, 3, 5]; ValueError unless positive integers, commas between."""
    parts = text.split(",")
    if len(parts) > MAX_FRAMES_ASKED or not all(p.isdigit() and len(p) <= 9 for p in parts):
        raise ValueError(f"{text[:40]!r}: frame numbers are positive integers separated by "
                         f"commas (at most {MAX_FRAMES_ASKED})")
    numbers = [int(p) for p in parts]
    if min(numbers) < 1:
        raise ValueError("frame numbers start at 1")
    return numbers


#: Frame numbers one request may list.
MAX_FRAMES_ASKED = 10000


def parts_body(parts: Iterator[bulkdata.Part], media: str, syntax: str | None,
               boundary: str) -> Iterator[bytes]:
    """A multipart body of ``parts`` (frames, bulk values, rendered images), each read
    when sent, a large one piece by piece; ``syntax``: the transfer syntax of DICOM
    pixel data (None: an image)."""
    content_type = f"{media}; transfer-syntax={syntax}" if syntax else media
    for data in parts:
        if isinstance(data, bytes):
            yield multipart.part_header(boundary, content_type) + data + multipart.CRLF
        else:
            yield multipart.part_header(boundary, content_type)
            yield from data
            yield multipart.CRLF
    yield multipart.closing(boundary)
