"""Metadata queries (archive.metadata_query) on the embedded FerretDB: seconds per query.

    python -m benchmarks.bench_metadata_query [--ferretdb BINARY] [--instances 10000]
        [--samples 3]

Starts a private FerretDB (SQLite handler, as the node embeds it), inserts
``--instances`` instance documents (~14 KiB of DICOM JSON each, pydicom's CT_small.dcm
with the Modality, Series Description and a private element varied per series, 10
instances a series, 3 series a study, and the level documents the archive keeps for
them, with its indexes) and measures the median seconds of
:func:`archive.metadata_query.run` for a few queries: on the level documents where it
can (unrestricted, every attribute stored at the level: series documents for studies
per Modality), on the instance documents otherwise (a private key, restricted to some
patients); beside
the same counts asked of FerretDB's aggregation pipeline (``$match``, ``$group`` twice).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness as h
from benchmarks.bench_ferretdb_reads import INSTANCES_PER_SERIES, Server, dataset_json, instance

MODALITIES = ("CT", "MR", "US")
DESCRIPTIONS = ("localizer", "t1 axial", "t2 sagittal", "dwi", "flair", "abdomen", "chest",
                "head")


def documents(count: int) -> list[dict[str, Any]]:
    template = dataset_json()
    docs = []
    for n in range(count):
        doc = instance(template, n)
        series = n // INSTANCES_PER_SERIES
        doc["dataset"] = {
            **template,
            "00100020": {"vr": "LO", "Value": [doc["PatientID"]]},
            "0020000D": {"vr": "UI", "Value": [doc["StudyInstanceUID"]]},
            "0020000E": {"vr": "UI", "Value": [doc["SeriesInstanceUID"]]},
            "00080018": {"vr": "UI", "Value": [doc["_id"]]},
            "00080060": {"vr": "CS", "Value": [MODALITIES[series % 3]]},
            "0008103E": {"vr": "LO", "Value": [DESCRIPTIONS[series % 8]]},
            "00190010": {"vr": "LO", "Value": ["ACME"]},
            "0019100C": {"vr": "IS", "Value": [(series % 4) * 500]},
        }
        docs.append(doc)
    return docs


def level_documents(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The patients, studies and series documents of these instances (attributes of the
    last instance of each, normalised fields, instance counter)."""
    from archive.levels import level_dataset, normalised_fields
    from archive.metadata_query import ENTITY_FIELD, INSTANCES_COUNTER
    from archive.model import COLLECTION, PATIENT, SERIES, STUDY

    result = {}
    for level in (PATIENT, STUDY, SERIES):
        latest: dict[str, dict[str, Any]] = {}
        counts: dict[str, int] = {}
        for doc in docs:
            uid = doc[ENTITY_FIELD[level]]
            latest[uid] = doc["dataset"]
            counts[uid] = counts.get(uid, 0) + 1
        result[COLLECTION[level]] = [
            {"_id": uid, **normalised_fields(level, data), "dataset": level_dataset(level, data),
             INSTANCES_COUNTER[level]: counts[uid]} for uid, data in latest.items()]
    return result


def main(argv: list[str] | None = None) -> int:
    from pymongo import MongoClient

    from archive.find import Finder
    from archive.metadata_query import parse, run
    from archive.storage import ensure_indexes

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ferretdb", type=Path, default=h.FERRETDB)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-metadata-") as folder:
        server = Server(args.ferretdb, Path(folder) / "ferretdb")
        client: MongoClient[Any] = MongoClient(f"mongodb://127.0.0.1:{server.port}/")
        try:
            db = client["archive"]
            ensure_indexes(db)
            began = time.perf_counter()
            docs = documents(args.instances)
            for start in range(0, len(docs), 500):
                db.instances.insert_many(docs[start:start + 500])
            for collection, levels in level_documents(docs).items():
                db[collection].insert_many(levels)
            print(f"{args.instances} instance documents inserted in "
                  f"{time.perf_counter() - began:.1f} s")
            finder = Finder(db)
            restriction = {"PatientID": {"$regex": "^PID00000"}}  # 10 of 167 patients
            cases = [
                ("series", ["Modality=MR"], ["SeriesDescription"], None),
                ("series", [], ["Modality"], None),
                ("instances", ["0019,100C=1000"], ["SeriesDescription"], None),
                ("studies", ["SeriesDescription=*t1*"], ["Modality"], None),
                ("series", ["Modality=MR"], ["SeriesDescription"], restriction),
                # the first query again, over the instances ({}: a restriction letting
                # everything through), for comparison with the pipeline below
                ("series", ["Modality=MR"], ["SeriesDescription"], {}),
            ]
            for level, keys, groups, restricted in cases:
                query = parse(level, keys, groups)
                times = []
                for _ in range(args.samples):
                    began = time.perf_counter()
                    result = run(finder, query, restricted)
                    times.append(time.perf_counter() - began)
                source = "IMAGE" if restricted is not None else query.source
                print(f"{query.describe():<52}{'restricted' if restricted else '':<11}"
                      f"{source:<8}"
                      f"{statistics.median(times):6.2f} s  {len(result.rows)} groups, "
                      f"{result.total} {query.level_name}, {result.instances} instances")
            pipeline = [
                {"$match": {"dataset.00080060.Value": "MR"}},
                {"$group": {"_id": {"d": "$dataset.0008103E.Value",
                                    "s": "$SeriesInstanceUID"}}},
                {"$group": {"_id": "$_id.d", "n": {"$sum": 1}}},
            ]
            try:
                began = time.perf_counter()
                groups = list(db.instances.aggregate(pipeline))
                print(f"{'aggregation pipeline: series by SeriesDescription, Modality=MR':<71}"
                      f"{time.perf_counter() - began:6.2f} s  {len(groups)} groups")
            except Exception as exc:  # noqa: BLE001 - what FerretDB does not implement
                print(f"aggregation pipeline refused: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:160]}")
        finally:
            client.close()
            server.process.terminate()
            server.process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
