"""FHIR R4 ImagingStudy (read and search) built from C-FIND answers.

A FHIR search is translated into a Study Root C-FIND identifier and answered by the
same code as QIDO-RS and C-FIND (:func:`archive.query.translate`, then
:meth:`archive.context.Context.answers`), so a restricted principal's Bundle holds
exactly the studies -- and in them the series and instances, with their counts -- her
C-FIND shows, and a study she may not see is not found exactly as one that does not
exist.  One page costs three C-FINDs: the studies (all of them are counted for
``Bundle.total``, the page is kept), then the page's series and its instances, both
matched on the list of the page's Study Instance UIDs.

Search parameters (R4 ImagingStudy, ``http://hl7.org/fhir/R4/imagingstudy.html``):

- ``patient``: ``Patient/{PatientID}`` or the Patient ID alone -> PatientID;
- ``identifier``: ``urn:oid:{StudyInstanceUID}`` (system ``urn:dicom:uid`` or none) ->
  StudyInstanceUID; any other value (no system) -> AccessionNumber;
- ``started``: FHIR dates with the prefixes eq, ge, le, gt, lt, sa, eb, repeated to
  bound both ends -> a StudyDate range;
- ``modality``: ``http://dicom.nema.org/resources/ontology/DCM|CT`` or ``CT`` ->
  ModalitiesInStudy;
- ``_id`` -> StudyInstanceUID; ``status`` (every study is ``available``);
- ``_count`` / ``_offset`` (the QIDO-RS limit / offset), ``_summary=count``,
  ``_format`` (JSON only), ``_pretty``.

Comma-separated values are alternatives (DICOM multiple value / UID list matching).
Token values are exact: ``*``, ``?`` and ``\\`` are refused rather than taken as DICOM
wild cards.  Any other parameter is refused (400, an OperationOutcome naming it): the
server is strict unless ``Prefer: handling=lenient`` asks it to leave them out.
"""

from __future__ import annotations

import calendar
import datetime
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from acl.rules import Decision
from archive.context import Context
from archive.model import IMAGE, PATIENT, SERIES, STUDY
from archive.query import translate
from archive.web import qido

FHIR_JSON = "application/fhir+json"
#: The media type of every answer, errors included (R4 is FHIR 4.0).
CONTENT_TYPE = f"{FHIR_JSON}; fhirVersion=4.0; charset=utf-8"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"
URI = "urn:ietf:rfc:3986"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
#: The contained Endpoint every ImagingStudy refers to: the DICOMweb service.
ENDPOINT_ID = "dicomweb"
#: Studies in one page unless ``_count`` says otherwise (each carries its instances).
DEFAULT_COUNT = 20
#: FHIR ``id`` (R4 2.24.0.1): a UID made of digits and dots always fits.
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: What the archive takes as a UID (archive.web.app): never a wild card.
_UID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")

STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "TimezoneOffsetFromUTC",
              "AccessionNumber", "PatientID", "PatientName", "StudyDescription",
              "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances")
SERIES_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "Modality",
               "SeriesDescription", "SeriesDate", "SeriesTime", "BodyPartExamined",
               "NumberOfSeriesRelatedInstances")
PATIENT_KEYS = ("PatientID", "PatientName", "PatientSex", "PatientBirthDate")
INSTANCE_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                 "InstanceNumber")

_PAGING = ("_count", "_offset")
_IGNORED = ("_format", "_pretty")
_PARAMETERS = ("patient", "patient:Patient", "identifier", "started", "modality", "_id",
               "status", "_summary") + _PAGING + _IGNORED
_STARTED = re.compile(r"(?P<prefix>[a-z]{2})?(?P<year>\d{4})(?:-(?P<month>\d{2})"
                      r"(?:-(?P<day>\d{2}))?)?(?P<time>T.*)?")
_DATE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_TIME = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?")
_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})")
_JSON_FORMATS = ("json", "application/json", FHIR_JSON)


class BadSearch(ValueError):
    """A search the service refuses (400), with the message the client reads."""


class NotJson(ValueError):
    """``_format`` or ``Accept`` asks for something other than JSON (406)."""


@dataclass(frozen=True)
class StudySearch:
    """One FHIR search, translated: C-FIND matching keys and the page asked for."""

    keys: tuple[tuple[str, str], ...]
    count: int = DEFAULT_COUNT
    offset: int = 0
    #: a condition no study meets (another identifier system, an empty date range...)
    nothing: bool = False
    #: the search parameters as the links of the Bundle repeat them
    params: tuple[tuple[str, str], ...] = field(default=())
    pretty: bool = False


# -- the search parameters -------------------------------------------------------------


def parse_search(params: Iterable[tuple[str, str]], max_results: int,
                 lenient: bool = False) -> StudySearch:
    """The C-FIND keys of an ImagingStudy search; raises BadSearch / NotJson.

    ``lenient`` (``Prefer: handling=lenient``): unknown parameters are left out (and
    out of the Bundle's links, which say what was searched) instead of refused."""
    params = list(params)
    if len(params) > 50:
        raise BadSearch("more than 50 search parameters")
    keys: dict[str, str] = {}
    dates: list[tuple[datetime.date | None, datetime.date | None]] = []
    nothing, pretty = False, False
    count, offset = min(DEFAULT_COUNT, max_results), 0
    seen: set[str] = set()
    echoed = []
    for name, value in params:
        if name not in _PARAMETERS:
            if lenient:
                continue
            raise BadSearch(f"unknown search parameter {name[:60]!r} (supported: "
                            + ", ".join(p for p in _PARAMETERS if ":" not in p) + ")")
        if name in seen and name != "started":
            raise BadSearch(f"{name}: given more than once (comma-separate alternatives)")
        seen.add(name)
        if name not in _PAGING:
            echoed.append((name, value))
        if name == "_format":
            if value.strip().lower().split(";")[0] not in _JSON_FORMATS:
                raise NotJson(f"_format={value[:40]}: only JSON is served")
            continue
        if name == "_pretty":
            pretty = value.strip().lower() == "true"
            continue
        if value == "":
            raise BadSearch(f"{name}: empty value")
        if name == "_count":
            count = min(_number(name, value), max_results)
        elif name == "_offset":
            offset = _number(name, value)
        elif name == "_summary":
            if value != "count":
                raise BadSearch("_summary: only 'count' is supported")
            count = 0
        elif name == "started":
            dates.append(_date_range(value))
        elif name == "status":
            nothing |= "available" not in [c for _, c in _tokens(name, value)]
        else:
            keyword, text, impossible = _key(name, value)
            if keyword in keys:
                raise BadSearch(f"{name}: names the study as another parameter does")
            nothing |= impossible
            if not impossible:
                keys[keyword] = text
    if dates:
        low = max((d[0] for d in dates if d[0] is not None), default=None)
        high = min((d[1] for d in dates if d[1] is not None), default=None)
        if low is not None and high is not None and low > high:
            nothing = True
        else:
            keys["StudyDate"] = _dicom_range(low, high)
    return StudySearch(tuple(keys.items()), count, offset, nothing, tuple(echoed), pretty)


def parse_read(resource_id: str, params: Iterable[tuple[str, str]],
               keyword: str = "StudyInstanceUID") -> StudySearch:
    """The C-FIND key of a read (``_format`` and ``_pretty`` allowed): ``keyword``
    equal to the id; an id no entity can have matches nothing, as an unknown one."""
    pretty = False
    for name, value in params:
        if name not in _IGNORED:
            raise BadSearch(f"{name[:60]!r}: a read takes only _format and _pretty")
        if name == "_format" and value.strip().lower().split(";")[0] not in _JSON_FORMATS:
            raise NotJson(f"_format={value[:40]}: only JSON is served")
        pretty |= name == "_pretty" and value.strip().lower() == "true"
    possible = _is_id(resource_id) if keyword == "StudyInstanceUID" else \
        bool(FHIR_ID.fullmatch(resource_id))
    return StudySearch(((keyword, resource_id),) if possible else (), count=1,
                       nothing=not possible, pretty=pretty)


def _is_id(text: str) -> bool:
    """Whether ``text`` is a FHIR id that is also a UID the archive keeps."""
    return bool(FHIR_ID.fullmatch(text) and _UID.fullmatch(text))


def _number(name: str, value: str) -> int:
    text = value.strip()
    if not text.isdigit() or len(text) > 12:
        raise BadSearch(f"{name}: expected a non-negative integer, got {value[:20]!r}")
    return int(text)


def _split(text: str, separator: str, unescape: bool) -> list[str]:
    """Split on ``separator`` not escaped with a backslash (R4 search 3.1.1.3.5);
    ``unescape``: the escapes of ``,``, ``|``, ``$`` and ``\\`` taken away."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char if unescape and char in ",|$\\" else "\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def _tokens(name: str, value: str) -> list[tuple[str | None, str]]:
    """``[system|]code`` alternatives: (system or None when not given, code)."""
    tokens = []
    for alternative in _split(value, ",", unescape=False):
        pieces = _split(alternative, "|", unescape=True)
        if len(pieces) > 2:
            raise BadSearch(f"{name}: {alternative[:60]!r} has more than one '|'")
        system, code = (None, pieces[0]) if len(pieces) == 1 else (pieces[0], pieces[1])
        if not code:
            raise BadSearch(f"{name}: {alternative[:60]!r} has no code")
        if any(c in code for c in "*?\\") or code == '""':
            raise BadSearch(f"{name}: {code[:60]!r}: '*', '?', '\\' and '\"\"' are not "
                            "searched for (FHIR token search is exact)")
        tokens.append((system, code))
    return tokens


def _key(name: str, value: str) -> tuple[str, str, bool]:
    """(DICOM keyword, C-FIND value, matches nothing) of one token parameter."""
    tokens = _tokens(name, value)
    if name in ("patient", "patient:Patient"):
        ids = []
        for system, code in tokens:
            if system is not None:
                raise BadSearch(f"{name}: a reference (Patient/ID or the ID), not a token")
            ids.append(code.rsplit("Patient/", 1)[-1] if "Patient/" in code else code)
        return "PatientID", "\\".join(ids), False
    if name == "modality":
        codes = [code for system, code in tokens if system in (None, DCM)]
        return "ModalitiesInStudy", "\\".join(codes), not codes
    if name == "_id":
        for _, code in tokens:
            if not _is_id(code):
                raise BadSearch(f"_id: {code[:70]!r} is not an ImagingStudy id")
        return "StudyInstanceUID", ",".join(code for _, code in tokens), False
    # identifier: a Study Instance UID as urn:oid, else an accession number
    uids = [code[8:] for system, code in tokens
            if system in (None, DICOM_UID) and code.startswith("urn:oid:")]
    accessions = [code for system, code in tokens
                  if system in (None, "") and not code.startswith("urn:oid:")]
    if uids and accessions:
        raise BadSearch("identifier: either Study Instance UIDs or accession numbers, "
                        "not both")
    if uids:
        for uid in uids:
            if not _UID.fullmatch(uid):
                raise BadSearch(f"identifier: {uid[:70]!r} is not a UID")
        return "StudyInstanceUID", ",".join(uids), False
    return "AccessionNumber", "\\".join(accessions), not accessions


def _date_range(value: str) -> tuple[datetime.date | None, datetime.date | None]:
    """The days a ``started`` value lets through, as (first, last); None: no bound."""
    found = _STARTED.fullmatch(value.strip())
    if found is None:
        raise BadSearch(f"started: {value[:40]!r} is not a FHIR date ([prefix]YYYY[-MM[-DD]])")
    if found["time"]:
        raise BadSearch("started: only dates are searched (StudyDate): YYYY, YYYY-MM or "
                        "YYYY-MM-DD")
    prefix = found["prefix"] or "eq"
    try:
        year = int(found["year"])
        month = int(found["month"]) if found["month"] else None
        day = int(found["day"]) if found["day"] else None
        first = datetime.date(year, month or 1, day or 1)
        last = datetime.date(year, month or 12,
                             day or calendar.monthrange(year, month or 12)[1])
    except ValueError:
        raise BadSearch(f"started: {value[:40]!r} is not a calendar date") from None
    one = datetime.timedelta(days=1)
    try:
        if prefix == "eq":
            return first, last
        if prefix == "ge":
            return first, None
        if prefix == "le":
            return None, last
        if prefix in ("gt", "sa"):
            return last + one, None
        if prefix in ("lt", "eb"):
            return None, first - one
    except OverflowError:  # after 9999-12-31 / before 0001-01-01: no day at all
        return datetime.date.max, datetime.date.min
    raise BadSearch(f"started: prefix {prefix!r} is not supported (eq, ge, le, gt, lt, "
                    "sa, eb)")


def _dicom_range(low: datetime.date | None, high: datetime.date | None) -> str:
    def text(day: datetime.date) -> str:  # strftime's %Y may not pad years before 1000
        return f"{day.year:04d}{day.month:02d}{day.day:02d}"

    if low is not None and low == high:
        return text(low)
    return f"{'' if low is None else text(low)}-{'' if high is None else text(high)}"


# -- running the C-FINDs ----------------------------------------------------------------


#: Answers are built as C-FIND sends them (raw values, read back by pydicom when a
#: resource is built): several times cheaper than element by element.
_ANSWER_SYNTAX = (False, True)  # explicit VR little endian


def _answers(context: Context, decision: Decision, level: str,
             keys: Iterable[tuple[str, str]], returned: Iterable[str]) -> Iterator[Dataset]:
    """C-FIND's answers (Study Root) to these keys, for the principal of ``decision``."""
    identifier = qido.identifier(level, keys, returned)
    query = translate(identifier, STUDY, **context.query_options)
    return context.answers(decision, query, identifier, STUDY, _ANSWER_SYNTAX)


def studies(context: Context, decision: Decision, search: StudySearch
            ) -> tuple[int, list[Dataset], list[Dataset], list[Dataset]]:
    """Every matching study counted; the page's studies, their series and instances,
    as the principal's C-FIND answers them (raises QueryError, qido.BadQuery, and
    PyMongoError as QIDO-RS does)."""
    if search.nothing:
        return 0, [], [], []
    answers = _answers(context, decision, STUDY, search.keys, STUDY_KEYS)
    total, page = 0, []
    for answer in answers:
        if search.offset <= total < search.offset + search.count:
            page.append(answer)
        total += 1
    uids = [str(a.StudyInstanceUID) for a in page if a.get("StudyInstanceUID")]
    if not uids:
        return total, page, [], []
    within = (("StudyInstanceUID", ",".join(uids)),)
    series = list(_answers(context, decision, SERIES, within, SERIES_KEYS))
    instances = list(_answers(context, decision, IMAGE, within, INSTANCE_KEYS))
    return total, page, series, instances


def patient(context: Context, decision: Decision, patient_id: str) -> Dataset | None:
    """The Patient Root C-FIND answer of one patient the principal may see, or None."""
    if not FHIR_ID.fullmatch(patient_id):
        return None
    identifier = qido.identifier(PATIENT, [("PatientID", patient_id)], PATIENT_KEYS)
    query = translate(identifier, PATIENT, **context.query_options)
    return next(iter(context.answers(decision, query, identifier, PATIENT)), None)


# -- the resources ---------------------------------------------------------------------


def _get(ds: Dataset, keyword: str) -> Any:
    """An answer's value, None when stored data pydicom cannot read back (an IS of
    letters...): one odd attribute leaves a resource without it, never fails it."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError):
        return None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    if value is None or value == "":
        return None
    if not isinstance(value, str | PersonName | int | float) and hasattr(value, "__iter__"):
        value = next(iter(value), None)
        if value is None:
            return None
    text = str(value).strip()
    return text or None


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = _get(ds, keyword)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = value.split("\\")
    elif not hasattr(value, "__iter__"):
        value = [value]
    return [str(v).strip() for v in value if str(v).strip()]


def _unsigned(ds: Dataset, keyword: str) -> int | None:
    text = _text(ds, keyword)
    try:
        number = int(float(text)) if text is not None else None
    except (ValueError, OverflowError):
        return None
    return number if number is not None and 0 <= number < 2**31 else None


def person_name(value: Any) -> str | None:
    """A DICOM PN as a FHIR display: prefix, given, middle, family, suffix."""
    if value is None or str(value).strip() == "":
        return None
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    parts = [name.name_prefix, name.given_name, name.middle_name, name.family_name,
             name.name_suffix]
    text = " ".join(p.strip() for p in parts if p and p.strip())
    return text or str(value).strip() or None


def date_time(date: str | None, time: str | None, offset: str | None) -> str | None:
    """A FHIR dateTime of DICOM DA, TM and a UTC offset (``+0100`` or ``+01:00``): the
    time only with an offset (FHIR requires a zone with a time), else the date alone;
    None when the date is no calendar date."""
    found = _DATE.fullmatch(date or "")
    if found is None:
        return None
    try:
        day = datetime.date(*(int(g) for g in found.groups()))
    except ValueError:
        return None
    text = day.isoformat()
    clock = _TIME.fullmatch(time or "")
    zone = _OFFSET.fullmatch(offset or "")
    if clock is None or zone is None:
        return text
    hours, minutes, seconds = (int(g or 0) for g in clock.groups()[:3])
    zone_hours, zone_minutes = int(zone[2]), int(zone[3])
    if hours > 23 or minutes > 59 or seconds > 59 or zone_minutes > 59 or \
            zone_hours * 60 + zone_minutes > 14 * 60:
        return text
    fraction = clock[4] or ""
    return f"{text}T{hours:02d}:{minutes:02d}:{seconds:02d}{fraction}" \
           f"{zone[1]}{zone[2]}:{zone[3]}"


def endpoint(dicomweb_url: str) -> dict[str, Any]:
    """The DICOMweb service, as the Endpoint every ImagingStudy contains."""
    return {
        "resourceType": "Endpoint", "id": ENDPOINT_ID, "status": "active",
        "connectionType": {"system": CONNECTION_TYPE, "code": "dicom-wado-rs"},
        "name": "DICOMweb (WADO-RS, QIDO-RS, STOW-RS)",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": dicomweb_url,
    }


def _coding(system: str, code: str | None) -> dict[str, str] | None:
    code = " ".join((code or "").split())
    return {"system": system, "code": code} if code else None


def _series(answer: Dataset, instances: list[Dataset], timezone: str) -> dict[str, Any]:
    resource: dict[str, Any] = {"uid": str(answer.SeriesInstanceUID).strip()}
    number = _unsigned(answer, "SeriesNumber")
    if number is not None:
        resource["number"] = number
    # Modality is Type 1 (1..1 in FHIR too): "OT" (other) for a dataset without one
    resource["modality"] = _coding(DCM, _text(answer, "Modality")) or _coding(DCM, "OT")
    description = _text(answer, "SeriesDescription")
    if description:
        resource["description"] = description
    count = _unsigned(answer, "NumberOfSeriesRelatedInstances")
    if count is not None:
        resource["numberOfInstances"] = count
    body_part = _text(answer, "BodyPartExamined")
    if body_part:  # a DICOM CS term, no SNOMED code: the text only
        resource["bodySite"] = {"display": body_part}
    started = date_time(_text(answer, "SeriesDate"), _text(answer, "SeriesTime"),
                        timezone)
    if started:
        resource["started"] = started
    listed = []
    for instance in sorted(instances, key=_instance_order):
        uid = _text(instance, "SOPInstanceUID")
        if uid is None or not FHIR_ID.fullmatch(uid):
            continue  # no FHIR id can name it (a UID with '_', '+', ...)
        item: dict[str, Any] = {
            "uid": uid,
            "sopClass": {"system": URI,
                         "code": f"urn:oid:{_text(instance, 'SOPClassUID') or ''}"}}
        number = _unsigned(instance, "InstanceNumber")
        if number is not None:
            item["number"] = number
        listed.append(item)
    if listed:
        resource["instance"] = listed
    return resource


def _instance_order(ds: Dataset) -> tuple[int, str]:
    number = _unsigned(ds, "InstanceNumber")
    return (number if number is not None else 2**31, _text(ds, "SOPInstanceUID") or "")


def _series_order(ds: Dataset) -> tuple[int, str]:
    number = _unsigned(ds, "SeriesNumber")
    return (number if number is not None else 2**31, _text(ds, "SeriesInstanceUID") or "")


def resource_id(study_uid: str) -> str | None:
    """The ImagingStudy id of a study: its UID, when it is a FHIR id (every conformant
    UID is); None for a UID with other characters, which no id can name reversibly."""
    return study_uid if FHIR_ID.fullmatch(study_uid) else None


def imaging_study(study: Dataset, series: list[Dataset], instances: list[Dataset],
                  dicomweb_url: str, timezone: str = "") -> dict[str, Any]:
    """One ImagingStudy of a study's C-FIND answer and its series' and instances';
    ``timezone``: the UTC offset of times without one (``http.fhir_timezone``)."""
    uid = str(study.StudyInstanceUID).strip()
    resource: dict[str, Any] = {"resourceType": "ImagingStudy"}
    rid = resource_id(uid)
    if rid is not None:
        resource["id"] = rid
    resource["contained"] = [endpoint(dicomweb_url)]
    identifiers: list[dict[str, Any]] = [
        {"use": "official", "system": DICOM_UID, "value": f"urn:oid:{uid}"}]
    accession = _text(study, "AccessionNumber")
    if accession:
        identifiers.append({"use": "usual", "type": {"coding": [
            {"system": V2_0203, "code": "ACSN"}]}, "value": accession})
    resource["identifier"] = identifiers
    resource["status"] = "available"
    modalities = [c for c in (_coding(DCM, m) for m in _values(study, "ModalitiesInStudy"))
                  if c]
    if modalities:
        resource["modality"] = modalities
    resource["subject"] = subject(_text(study, "PatientID"),
                                  person_name(_get(study, "PatientName")))
    started = date_time(_text(study, "StudyDate"), _text(study, "StudyTime"),
                        _text(study, "TimezoneOffsetFromUTC") or timezone)
    if started:
        resource["started"] = started
    referrer = person_name(_get(study, "ReferringPhysicianName"))
    if referrer:
        resource["referrer"] = {"display": referrer}
    resource["endpoint"] = [{"reference": f"#{ENDPOINT_ID}"}]
    for keyword, name in (("NumberOfStudyRelatedSeries", "numberOfSeries"),
                          ("NumberOfStudyRelatedInstances", "numberOfInstances")):
        number = _unsigned(study, keyword)
        if number is not None:
            resource[name] = number
    description = _text(study, "StudyDescription")
    if description:
        resource["description"] = description
    by_series: dict[str, list[Dataset]] = {}
    for instance in instances:
        by_series.setdefault(_text(instance, "SeriesInstanceUID") or "", []).append(instance)
    listed = [_series(s, by_series.get(_text(s, "SeriesInstanceUID") or "", []), timezone)
              for s in sorted(series, key=_series_order)
              if FHIR_ID.fullmatch(_text(s, "SeriesInstanceUID") or "")]
    if listed:
        resource["series"] = listed
    return resource


def subject(patient_id: str | None, name: str | None) -> dict[str, Any]:
    """The Reference to the patient: ``Patient/{PatientID}`` when the ID is a FHIR id,
    the ID as an identifier, the name as display."""
    reference: dict[str, Any] = {}
    if patient_id and FHIR_ID.fullmatch(patient_id):
        reference["reference"] = f"Patient/{patient_id}"
    if patient_id:
        reference["identifier"] = {"value": patient_id}
    reference["display"] = name or patient_id or "unknown patient"
    return reference


_GENDER = {"M": "male", "F": "female", "O": "other"}


def patient_resource(answer: Dataset) -> dict[str, Any]:
    """A Patient of a Patient Root C-FIND answer: ID, name, sex, birth date."""
    patient_id = str(answer.PatientID).strip()
    resource: dict[str, Any] = {"resourceType": "Patient", "id": patient_id,
                                "identifier": [{"value": patient_id}]}
    value = _get(answer, "PatientName")
    text = person_name(value)
    if text:
        name = value if isinstance(value, PersonName) else PersonName(str(value))
        human: dict[str, Any] = {"text": text}
        if name.family_name.strip():
            human["family"] = name.family_name.strip()
        given = [p.strip() for p in (name.given_name, name.middle_name) if p.strip()]
        if given:
            human["given"] = given
        for part, key in ((name.name_prefix, "prefix"), (name.name_suffix, "suffix")):
            if part.strip():
                human[key] = [part.strip()]
        resource["name"] = [human]
    sex = (_text(answer, "PatientSex") or "").upper()
    resource["gender"] = _GENDER.get(sex, "unknown")
    birth = date_time(_text(answer, "PatientBirthDate"), None, None)
    if birth:
        resource["birthDate"] = birth
    return resource


def resources(page: list[Dataset], series: list[Dataset], instances: list[Dataset],
              dicomweb_url: str, timezone: str = "") -> list[dict[str, Any]]:
    """The ImagingStudy of each study of ``page``, in its order."""
    series_of: dict[str, list[Dataset]] = {}
    for answer in series:
        series_of.setdefault(_text(answer, "StudyInstanceUID") or "", []).append(answer)
    instances_of: dict[str, list[Dataset]] = {}
    for answer in instances:
        instances_of.setdefault(_text(answer, "StudyInstanceUID") or "", []).append(answer)
    return [imaging_study(study, series_of.get(_text(study, "StudyInstanceUID") or "", []),
                          instances_of.get(_text(study, "StudyInstanceUID") or "", []),
                          dicomweb_url, timezone)
            for study in page]


def bundle(found: list[dict[str, Any]], total: int, search: StudySearch, fhir_url: str
           ) -> dict[str, Any]:
    """The searchset Bundle of one page, with self / previous / next links."""
    def link(relation: str, offset: int) -> dict[str, str]:
        query = urlencode(list(search.params) + [("_count", str(search.count)),
                                                 ("_offset", str(offset))])
        return {"relation": relation, "url": f"{fhir_url}/ImagingStudy?{query}"}

    links = [link("self", search.offset)]
    if search.count and search.offset > 0:
        links.append(link("previous", max(0, search.offset - search.count)))
    if search.count and search.offset + search.count < total:
        links.append(link("next", search.offset + search.count))
    entries = []
    for resource in found:
        entry: dict[str, Any] = {}
        if "id" in resource:
            entry["fullUrl"] = f"{fhir_url}/ImagingStudy/{resource['id']}"
        entry["resource"] = resource
        entry["search"] = {"mode": "match"}
        entries.append(entry)
    result: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": total,
                              "link": links}
    if entries:
        result["entry"] = entries
    return result


#: The search parameters of ImagingStudy, as the CapabilityStatement lists them.
_SEARCH_PARAMETERS = (
    ("patient", "reference", "ImagingStudy-patient",
     "Patient/{PatientID} or the Patient ID alone (PatientID)"),
    ("identifier", "token", "clinical-identifier",
     "urn:oid:{StudyInstanceUID} (system urn:dicom:uid or none), else the AccessionNumber"),
    ("started", "date", "ImagingStudy-started",
     "dates (YYYY, YYYY-MM, YYYY-MM-DD) with eq, ge, le, gt, lt, sa, eb (StudyDate)"),
    ("modality", "token", "ImagingStudy-modality",
     f"{DCM}|code or the code alone (ModalitiesInStudy)"),
    ("status", "token", "ImagingStudy-status", "every study is available"),
    ("_id", "token", "Resource-id", "the StudyInstanceUID"),
)
#: When what :func:`capabilities` says last changed.
CAPABILITIES_DATE = "2026-12-02"


def capabilities(fhir_url: str) -> dict[str, Any]:
    """The CapabilityStatement (``/metadata``): what this server does."""
    return {
        "resourceType": "CapabilityStatement", "status": "active",
        "date": CAPABILITIES_DATE, "kind": "instance",
        "software": {"name": "dicom-archive"},
        "implementation": {"description": "ImagingStudy of a DICOM archive (C-FIND)",
                           "url": fhir_url},
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "resource": [
            {"type": "ImagingStudy",
             "interaction": [{"code": "read"}, {"code": "search-type"}],
             "searchParam": [
                 {"name": name, "type": kind,
                  "definition": f"http://hl7.org/fhir/SearchParameter/{definition}",
                  "documentation": text}
                 for name, kind, definition, text in _SEARCH_PARAMETERS]},
            {"type": "Patient", "interaction": [{"code": "read"}]},
        ]}],
    }


#: OperationOutcome issue type of each HTTP status (R4 valueset issue-type).
_ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
                405: "not-supported", 406: "not-supported", 500: "exception",
                503: "transient"}


def outcome(status: int, message: str) -> dict[str, Any]:
    """An OperationOutcome for an answer other than success."""
    return {"resourceType": "OperationOutcome", "issue": [{
        "severity": "fatal" if status >= 500 else "error",
        "code": _ISSUE_CODES.get(status, "processing"),
        "diagnostics": message or "error"}]}


def lenient(prefer: str | None) -> bool:
    """Whether a ``Prefer`` header asks for ``handling=lenient`` (R4 search 3.1.1.2)."""
    return any(item.strip().lower().replace(" ", "") == "handling=lenient"
               for item in (prefer or "").split(","))


def json_accepted(accept: str | None) -> bool:
    """Whether ``Accept`` lets a FHIR JSON answer through (none, ``*/*``, JSON)."""
    if not accept:
        return True
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("*/*", "application/*") or media in _JSON_FORMATS:
            return True
    return False


__all__ = ["BadSearch", "NotJson", "StudySearch", "parse_search", "parse_read", "studies",
           "patient", "patient_resource", "resources", "bundle", "outcome", "endpoint",
           "imaging_study", "capabilities"]
