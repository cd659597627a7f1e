"""Documents for several collections inserted in one database round trip.

A stored instance is three inserts (its GridFS chunk, its files document, its instance
document), each a round trip the sender waits on.  MongoDB 8.0's ``bulkWrite``
command takes inserts into several collections at once; the embedded FerretDB has it
too (``ferretdb/patches/13-bulkwrite-inserts.patch``).  Against a server without it
(MongoDB 6 and 7, an unpatched FerretDB, mongomock; a user not allowed to run it) the
documents are inserted one by one, with the same outcome: in order, each one written
before the next, the first failure stopping the rest (``bulkWrite`` is no transaction
on MongoDB either: a failure leaves the ones before it written).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import DocumentTooLarge, DuplicateKeyError, OperationFailure, WriteError

log = logging.getLogger(__name__)

#: Refusals of the whole command, before anything is written, that mean "not here":
#: CommandNotFound (MongoDB 6 and 7, an unpatched FerretDB) and Unauthorized (a
#: MongoDB 8 user whose role grants inserts into the archive's database but not this
#: admin command, as custom roles may).
NOT_HERE = {59: "has no bulkWrite command", 13: "does not let this user run bulkWrite"}
DUPLICATE_KEY = 11000

#: An insert: the collection, the document.
Insert = tuple[Collection, dict[str, Any]]


class InsertFailed(Exception):
    """Insert number ``index`` failed with ``cause`` (what ``insert_one`` would have
    raised: DuplicateKeyError, WriteError, a connection error...).  Those before it are
    written; it and those after it are not, except that after a connection error
    (``index`` None) any of them may be."""

    def __init__(self, index: int | None, cause: Exception) -> None:
        super().__init__(str(cause))
        self.index, self.cause = index, cause


class BulkInserter:
    """Inserts in order, in one ``bulkWrite`` where the server has it.

    Whether it has is learnt from the first answer (a server without the command, or
    a user without the right to run it, is refused before anything is written) and
    kept: one refusal per inserter, then one insert at a time.
    """

    def __init__(self) -> None:
        #: None: not known yet
        self.supported: bool | None = None

    def insert(self, inserts: Sequence[Insert]) -> None:
        """Insert every document in order; raises InsertFailed at the first failure."""
        if self._may_bulk(inserts):
            try:
                answer = _bulk_write(inserts)
            except DocumentTooLarge:
                pass  # refused before it was sent: one at a time below
            except OperationFailure as exc:
                if exc.code not in NOT_HERE:
                    raise InsertFailed(None, exc) from exc
                log.info("the database %s: inserts one at a time", NOT_HERE[exc.code])
                self.supported = False
            except Exception as exc:  # noqa: BLE001 - connection errors: state unknown
                raise InsertFailed(None, exc) from exc
            else:
                self.supported = True
                _raise_first_error(answer, len(inserts))
                return
        for index, (collection, document) in enumerate(inserts):
            try:
                collection.insert_one(document)
            except Exception as exc:  # noqa: BLE001 - the caller decides from the cause
                raise InsertFailed(index, exc) from exc

    def _may_bulk(self, inserts: Sequence[Insert]) -> bool:
        """Several inserts, into pymongo collections of one client (not mongomock's,
        nor tests' stand-ins), and the server not known to lack the command."""
        return (len(inserts) > 1 and self.supported is not False
                and all(isinstance(c, Collection) for c, _ in inserts)
                and len({id(c.database.client) for c, _ in inserts}) == 1)


def _bulk_write(inserts: Sequence[Insert]) -> dict[str, Any]:
    names: dict[str, int] = {}
    ops = []
    for collection, document in inserts:
        ns = names.setdefault(collection.full_name, len(names))
        ops.append({"insert": ns, "document": document})
    client = inserts[0][0].database.client
    return client.admin.command({
        "bulkWrite": 1, "ops": ops, "nsInfo": [{"ns": name} for name in names],
        "ordered": True, "errorsOnly": True})


def _raise_first_error(answer: dict[str, Any], count: int) -> None:
    """Raise what ``insert_one`` would have for the first failed operation."""
    if not answer.get("nErrors"):
        if answer.get("nInserted") != count:  # not an answer this module understands
            raise InsertFailed(None, OperationFailure(f"bulkWrite inserted "
                                                      f"{answer.get('nInserted')} of {count}"))
        return
    cursor = answer.get("cursor") or {}
    failed = [r for r in cursor.get("firstBatch", []) if not r.get("ok")]
    if not failed or cursor.get("id"):  # the errors did not all come in the first batch
        raise InsertFailed(None, OperationFailure(f"bulkWrite: {answer.get('nErrors')} "
                                                  f"errors not listed"))
    first = min(failed, key=lambda r: r["idx"])
    details = {k: v for k, v in first.items() if k not in ("ok", "idx")}
    kind = DuplicateKeyError if first.get("code") == DUPLICATE_KEY else WriteError
    raise InsertFailed(int(first["idx"]), kind(first.get("errmsg", ""), first.get("code"),
                                               details))
