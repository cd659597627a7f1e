"""The dashboard's figures: totals; instances per modality, SOP class, sender, day and
week; the bytes stored, cumulated by day of receipt.

Computed from the instance documents a principal may see -- all of them, or those
her Query patterns match (:meth:`acl.rules.Decision.instance_filter`), the very
instances that make a patient, study or series visible to her in C-FIND
(:mod:`acl.visibility`) -- so her totals are what C-FIND's counts would add up to
on an archive holding only what she may see.  One find over the instances reading a
few indexed fields (and what her patterns read), decided exactly in Python as every
query is (:func:`archive.find.server_filter`, :func:`archive.query.evaluate`); the
cost grows with the number of instances.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID

from archive.find import FIND_BATCH, Finder, fields_read, projection, server_filter
from archive.model import IMAGE
from archive.query import evaluate

#: What each instance document contributes.
FIELDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SOPClassUID",
          "size", "source", "stored_at")
#: Days shown in the per-day chart: the most recent ones that received instances.
DAYS_SHOWN = 90
#: Weeks shown in the per-week chart (ISO weeks, the most recent ones).
WEEKS_SHOWN = 104
#: Bars of a chart by name (modality, SOP class, sender); the rest summed as "other".
BARS_SHOWN = 20


@dataclass
class Stats:
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    bytes: int = 0
    modalities: list[tuple[str, int]] = field(default_factory=list)
    sop_classes: list[tuple[str, int]] = field(default_factory=list)
    senders: list[tuple[str, int]] = field(default_factory=list)
    days: list[tuple[str, int]] = field(default_factory=list)
    weeks: list[tuple[str, int]] = field(default_factory=list)
    #: bytes of what is stored now, cumulated by the day it was received: how the
    #: archive grew (what was deleted since is not counted)
    growth: list[tuple[str, int]] = field(default_factory=list)

    def charts(self) -> dict[str, dict[str, list[Any]]]:
        """The charts' data, for the page's script: labels and values of each."""
        return {name: {"labels": [k for k, _ in bars], "values": [v for _, v in bars]}
                for name, bars in (("modalities", self.modalities),
                                   ("sop_classes", self.sop_classes),
                                   ("senders", self.senders), ("days", self.days),
                                   ("weeks", self.weeks), ("growth", self.growth))}


def compute(finder: Finder, restriction: dict[str, Any] | None) -> Stats:
    """The figures over the instances ``restriction`` lets through (None: all)."""
    wanted = projection({*FIELDS, *fields_read(restriction or {})})
    if finder.barrier is not None:  # the store's batched updates written first
        finder.barrier()
    docs = finder.collection(IMAGE).find(server_filter(restriction) if restriction else {},
                                         wanted, batch_size=FIND_BATCH * 10)
    return summarize(d for d in docs if restriction is None or evaluate(restriction, d))


def summarize(docs: Iterable[dict[str, Any]]) -> Stats:
    """The figures of instance documents (pure: what :func:`compute` adds up)."""
    patients: set[str] = set()
    studies: set[str] = set()
    series: set[str] = set()
    modalities: Counter[str] = Counter()
    sop_classes: Counter[str] = Counter()
    senders: Counter[str] = Counter()
    days: Counter[str] = Counter()
    weeks: Counter[str] = Counter()
    day_bytes: Counter[str] = Counter()
    stats = Stats()
    for doc in docs:
        size = int(doc.get("size") or 0)
        stats.instances += 1
        stats.bytes += size
        patients.add(str(doc.get("PatientID", "")))
        studies.add(str(doc.get("StudyInstanceUID", "")))
        series.add(str(doc.get("SeriesInstanceUID", "")))
        modalities[str(doc.get("Modality") or "(none)")] += 1
        sop_classes[str(doc.get("SOPClassUID") or "")] += 1
        senders[str(doc.get("source") or "(unknown)")] += 1
        stored = doc.get("stored_at")
        if isinstance(stored, datetime.datetime):
            day = stored.date()
            days[day.isoformat()] += 1
            year, week, _ = day.isocalendar()
            weeks[f"{year}-W{week:02d}"] += 1
            day_bytes[day.isoformat()] += size
    stats.patients, stats.studies, stats.series = len(patients), len(studies), len(series)
    stats.modalities = _top(modalities)
    stats.sop_classes = [(_sop_class_name(uid), n) for uid, n in _top(sop_classes)]
    stats.senders = _top(senders)
    stats.days = sorted(days.items())[-DAYS_SHOWN:]
    stats.weeks = sorted(weeks.items())[-WEEKS_SHOWN:]
    stats.growth = _cumulated(sorted(day_bytes.items()))
    return stats


def _cumulated(days: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Running totals from 0 the day before the first receipt, thinned to at most
    DAYS_SHOWN points (the last day kept: the total stored with a date of receipt)."""
    if not days:
        return []
    before = datetime.date.fromisoformat(days[0][0]) - datetime.timedelta(days=1)
    total, points = 0, [(before.isoformat(), 0)]
    for day, n in days:
        total += n
        points.append((day, total))
    step = -(-len(points) // DAYS_SHOWN)
    return points[::-1][::step][::-1]


def _top(counts: Counter[str]) -> list[tuple[str, int]]:
    """The largest counts (ties by name), the others summed as "other"."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown, rest = ranked[:BARS_SHOWN], ranked[BARS_SHOWN:]
    if rest:
        shown.append((f"other ({len(rest)})", sum(n for _, n in rest)))
    return shown


def _sop_class_name(uid: str) -> str:
    if not uid:
        return "(none)"
    name = UID(uid).name
    return name if name and name != uid else uid
