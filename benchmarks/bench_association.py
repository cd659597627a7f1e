"""Association latency, phase by phase: this archive against Orthanc, DCMTK's storescp
and a bare pynetdicom SCP, with every association of each system taking turns.

    python -m benchmarks.bench_association [--associations 300] [--rounds 3]
                                           [--source-ref HEAD] [--baseline-ref REF]
                                           [--systems archive,orthanc,storescp,pyscp]

A DICOM client spends a small query's time mostly on the association around it:
``findscu`` against Orthanc takes some 23 ms, of which the process start-up is most and
the association a few milliseconds.  A whole ``findscu`` run blurs that; here a client
replays, from a raw socket, the PDUs that ``echoscu`` and ``findscu`` send (recorded
once per system through a proxy) and times three phases of each association:

- ``associate``: the TCP connection and the A-ASSOCIATE-RQ, until the A-ASSOCIATE-AC;
- ``request``: the C-ECHO or C-FIND request, until its final response;
- ``release``: the A-RELEASE-RQ, until the A-RELEASE-RP.

``echo`` runs on every system; ``find`` (the series of a study: the series level, five
series, the return keys of ``bench_find``) on those that answer C-FIND (the archive
and Orthanc), after the same small study was sent to each.  The systems take turns
association by association (the order alternating), so a machine that speeds up or
slows down affects them alike.  ``--baseline-ref`` adds the archive as of another commit
(``archive@REF``): the effect of a change, measured the same way.

Prints the median and the 10th and 90th percentiles of each phase, per system, and the
archive's ratio of the medians to each other system's; writes
``bench-data/results/association.json``.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import corpus as corpus_module
from benchmarks import harness as h

SYSTEMS = ("archive", "orthanc", "storescp", "pyscp")
#: Systems that answer C-FIND.
FINDERS = ("archive", "orthanc")
PHASES = ("associate", "request", "release")
#: PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP = 1, 2, 4, 5, 6
#: DIMSE statuses of a response that another one follows (PS3.7 C.4.1.1.4).
PENDING = (0xFF00, 0xFF01)
#: Command elements (group 0000) read: Status, Command Data Set Type and its "no data
#: set" value (PS3.7 E.1).
STATUS, DATA_SET_TYPE, NO_DATASET = 0x0900, 0x0800, 0x0101
#: The study sent to the systems that answer C-FIND: one patient, five series.
STUDY = corpus_module.Parameters(patients=1, studies=1, series=5, instances=2, seed=7)
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "NumberOfSeriesRelatedInstances")


# --- PDUs ---------------------------------------------------------------------------


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU; EOFError if the peer closed the connection."""
    header = _read_exactly(sock, 6)
    return header + _read_exactly(sock, struct.unpack(">L", header[2:6])[0])


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the peer closed the connection")
        data += chunk
    return bytes(data)


def _pdvs(pdu: bytes) -> Iterator[tuple[int, bytes]]:
    """(message control header, fragment) of each presentation data value of a
    P-DATA-TF PDU (PS3.8 9.3.5.1)."""
    offset = 6
    while offset + 6 <= len(pdu):
        length = struct.unpack(">L", pdu[offset:offset + 4])[0]
        yield pdu[offset + 5], pdu[offset + 6:offset + 4 + length]
        offset += 4 + length


def command_value(command: bytes, element: int) -> int | None:
    """The US value of (0000,``element``) in a command set (implicit VR little endian)."""
    offset = 0
    while offset + 8 <= len(command):
        group, elem, length = struct.unpack("<HHL", command[offset:offset + 8])
        if (group, elem) == (0x0000, element) and length == 2:
            return int(struct.unpack("<H", command[offset + 8:offset + 10])[0])
        offset += 8 + length
    return None


class Responses:
    """Reads the command sets of P-DATA-TF PDUs: whether the final response came."""

    def __init__(self) -> None:
        self.command = bytearray()

    def final(self, pdu: bytes) -> bool:
        """Whether ``pdu`` ends with a response that is not pending."""
        done = False
        for control, fragment in _pdvs(pdu):
            if not control & 0x01:  # a dataset fragment
                continue
            self.command += fragment
            if control & 0x02:  # the command's last fragment
                status = command_value(bytes(self.command), STATUS)
                self.command.clear()
                done = status is not None and status not in PENDING
        return done


def record(port: int, tool: Callable[[int], list[str]]) -> list[bytes]:
    """The PDUs a DCMTK tool sends in one association with the service on ``port``,
    relayed through a proxy on a free port."""
    listener = socket.create_server((h.LOOPBACK, 0))
    proxy_port = listener.getsockname()[1]
    sent: list[bytes] = []
    failure: list[BaseException] = []

    def relay() -> None:
        try:
            listener.settimeout(30)
            client, _ = listener.accept()
            with client, socket.create_connection((h.LOOPBACK, port), timeout=10) as server:
                client.settimeout(10)
                while True:
                    pdu = read_pdu(client)
                    sent.append(pdu)
                    server.sendall(pdu)
                    if pdu[0] in (A_ASSOCIATE_RQ, A_RELEASE_RQ):
                        client.sendall(read_pdu(server))
                        if pdu[0] == A_RELEASE_RQ:
                            return
                    elif pdu[0] == P_DATA_TF and _request_complete(pdu):
                        answers = Responses()
                        while True:
                            answer = read_pdu(server)
                            client.sendall(answer)
                            if answers.final(answer):
                                break
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failure.append(exc)
        finally:
            listener.close()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    run = h.run_tool(tool(proxy_port), timeout=60)
    thread.join(10)
    if failure or not run.ok or not sent or sent[-1][0] != A_RELEASE_RQ:
        raise h.BenchmarkError(f"recording {tool(proxy_port)[0]} failed: "
                               f"{failure or run.output[-500:]}")
    return sent


def _request_complete(pdu: bytes) -> bool:
    """Whether a request's P-DATA-TF ends its message: the last fragment of its dataset,
    or of a command set that announces no dataset (C-ECHO: Command Data Set Type
    0x0101, whole in one fragment)."""
    last = False
    for control, fragment in _pdvs(pdu):
        if control & 0x02:
            last = not control & 0x01 or command_value(fragment, DATA_SET_TYPE) == NO_DATASET
    return last


def replay(port: int, pdus: Sequence[bytes]) -> tuple[float, float, float]:
    """One association of recorded PDUs: (associate, request, release) in seconds."""
    started = time.perf_counter()
    with socket.create_connection((h.LOOPBACK, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)  # an answer missed by the parsing fails the run, not hangs it
        sock.sendall(pdus[0])
        if read_pdu(sock)[0] != A_ASSOCIATE_AC:
            raise h.BenchmarkError("the association was not accepted")
        associated = time.perf_counter()
        sock.sendall(b"".join(pdus[1:-1]))
        answers = Responses()
        while not answers.final(read_pdu(sock)):
            pass
        answered = time.perf_counter()
        sock.sendall(pdus[-1])
        if read_pdu(sock)[0] != A_RELEASE_RP:
            raise h.BenchmarkError("the association was not released")
        released = time.perf_counter()
    return associated - started, answered - associated, released - answered


# --- the run ---------------------------------------------------------------------------


def echo_tool(aet: str) -> Callable[[int], list[str]]:
    return lambda port: ["echoscu", "-aet", h.CLIENT_AET, "-aec", aet, h.LOOPBACK, str(port)]


def find_tool(aet: str, study_uid: str) -> Callable[[int], list[str]]:
    keys = {"StudyInstanceUID": study_uid, **dict.fromkeys(SERIES_KEYS, "")}
    return lambda port: ["findscu", "-S", "-aet", h.CLIENT_AET, "-aec", aet,
                         "-k", "QueryRetrieveLevel=SERIES", *h.key_arguments(keys),
                         h.LOOPBACK, str(port)]


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "p10": ordered[len(ordered) // 10],
            "p90": ordered[len(ordered) * 9 // 10]}


def measure(services: dict[str, Any], kind: str, pdus: dict[str, list[bytes]],
            associations: int) -> dict[str, dict[str, list[float]]]:
    """``associations`` replays on each system, taking turns; seconds per phase."""
    times: dict[str, dict[str, list[float]]] = {
        name: {phase: [] for phase in (*PHASES, "total")} for name in pdus}
    names = list(pdus)
    for n in range(associations):
        for name in names if n % 2 == 0 else reversed(names):
            phases = replay(services[name].port, pdus[name])
            for phase, seconds in zip(PHASES, phases, strict=True):
                times[name][phase].append(seconds)
            times[name]["total"].append(sum(phases))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_association",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=300,
                        help="associations per system, kind and round (default 300)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--source-ref", metavar="GIT_REF",
                        help="run the archive as of this commit instead of the work tree")
    parser.add_argument("--baseline-ref", metavar="GIT_REF",
                        help="also run the archive as of this commit (archive@REF)")
    args = parser.parse_args(argv)
    systems = h.chosen_systems(parser, args.systems, SYSTEMS)

    work = h.RUNS / "association"
    study_dir = h.BENCH_DATA / "corpus" / STUDY.slug()
    corpus_module.ensure(study_dir, STUDY)
    study_uid = _study_uid(study_dir)
    services: dict[str, Any] = {}
    if "archive" in systems:
        source = h.checkout(args.source_ref) if args.source_ref else None
        services["archive"] = h.ArchiveNode(work / "archive", log_level="WARNING",
                                            source=source)
    if args.baseline_ref:
        services[f"archive@{args.baseline_ref}"] = h.ArchiveNode(
            work / "baseline", log_level="WARNING", source=h.checkout(args.baseline_ref))
    if "orthanc" in systems:
        services["orthanc"] = h.Orthanc(work / "orthanc")
    if "storescp" in systems:
        services["storescp"] = h.StoreSCP(work / "storescp", ignore=True)
    if "pyscp" in systems:
        services["pyscp"] = h.PyStoreSCP(work / "pyscp")

    results: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                               "environment": h.environment_info(),
                               "associations": args.associations, "rounds": args.rounds,
                               "kinds": {}}
    with h.running(*services.values()):
        for name, service in services.items():
            if name.startswith(FINDERS):
                run = h.storescu(service.host, service.port, service.ae_title, [study_dir])
                if not run.ok:
                    raise h.BenchmarkError(f"{name}: the study was not stored")
        kinds = {"echo": {name: echo_tool(s.ae_title) for name, s in services.items()},
                 "find": {name: find_tool(s.ae_title, study_uid)
                          for name, s in services.items() if name.startswith(FINDERS)}}
        for kind, tools in kinds.items():
            if not tools:
                continue
            pdus = {name: record(services[name].port, tool) for name, tool in tools.items()}
            measure(services, kind, pdus, args.warmup)
            rounds = [measure(services, kind, pdus, args.associations)
                      for _ in range(args.rounds)]
            results["kinds"][kind] = _report(kind, rounds)
    path = h.write_results("association", results)
    print(f"\nwritten to {path}")
    return 0


def _study_uid(folder: Path) -> str:
    import pydicom

    first = next(iter(sorted(folder.rglob("*.dcm"))))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def _report(kind: str, rounds: list[dict[str, dict[str, list[float]]]]) -> dict[str, Any]:
    """Print and return the medians of each round and of all rounds together."""
    names = list(rounds[0])
    together = {name: {phase: [s for r in rounds for s in r[name][phase]]
                       for phase in rounds[0][name]} for name in names}
    summary = {name: {phase: {k: v * 1e3 for k, v in percentiles(samples).items()}
                      for phase, samples in phases.items()}
               for name, phases in together.items()}
    print(f"\n{kind}: {len(rounds)} rounds of {len(rounds[0][names[0]]['total'])} "
          "associations per system, taking turns; ms, median (p10-p90)")
    rows = [[name, *(f"{summary[name][p]['median']:.3f} ({summary[name][p]['p10']:.2f}-"
                     f"{summary[name][p]['p90']:.2f})" for p in (*PHASES, "total"))]
            for name in names]
    print(h.table(["system", *PHASES, "total"], rows))
    ratios: dict[str, dict[str, list[float]]] = {}
    if "archive" in names:
        for other in names:
            if other == "archive":
                continue
            ratios[other] = {phase: [statistics.median(r["archive"][phase])
                                     / statistics.median(r[other][phase]) for r in rounds]
                             for phase in (*PHASES, "total")}
            print(f"archive / {other}, each round: " + "; ".join(
                f"{phase} " + " ".join(f"{x:.2f}" for x in values)
                for phase, values in ratios[other].items()))
    return {"ms": summary, "archive_ratio_per_round": ratios}


if __name__ == "__main__":
    sys.exit(main())
