"""Documents for several collections inserted in one database round trip.

A stored instance is three inserts (its GridFS chunk, its files document, its instance
document), each a round trip the sender waits on.  MongoDB 8.0's ``bulkWrite``
command takes inserts into several collections at once; the embedded FerretDB has it
too (``ferretdb/patches/13-bulkwrite-inserts.patch``).  Against a server without it
(MongoDB 6 and 7, an unpatched FerretDB, mongomock; a user not allowed to run it) the
documents are inserted one by one, with the same outcome: in order, each one written
before the next, the first failure stopping the rest (``bulkWrite`` is no transaction
on MongoDB either: a failure leaves the ones before it written).

:meth:`BulkInserter.send` sends a ``bulkWrite`` at once and reads its answer later
(:meth:`Sent.finish`), then sends what follows on the same connection: the database
writes while the caller works -- a C-STORE's file is written while its dataset is
turned into DICOM JSON.  pymongo has no public call
for that; this module holds one of the client's pooled connections through pymongo's
own connection API (``Pool.checkout``, ``Connection.send_message`` /
``receive_message``, ``message._op_msg``, as pymongo 4.20 has them; other versions
are untested).  Where those are missing or differ (logged once), fail before anything
is sent, or the server has no ``bulkWrite``,
:meth:`Sent.finish` sends the inserts with those it is given, in one round trip as
:meth:`BulkInserter.insert` does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from pymongo import message
from pymongo.collection import Collection
from pymongo.errors import DocumentTooLarge, DuplicateKeyError, OperationFailure, WriteError
from pymongo.server_selectors import writable_server_selector

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
        #: whether pymongo's connection API is as :class:`_Answer` uses it (until not)
        self.sends_ahead = True

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

    def send(self, inserts: Sequence[Insert]) -> Sent:
        """The inserts sent now, their outcome read by :meth:`Sent.finish`, where the
        server is known to take ``bulkWrite``; else kept for ``finish`` to send."""
        if self.supported and self.sends_ahead and self._may_bulk(inserts, least=1):
            try:
                return Sent(self, inserts, _Answer.send(_bulk_command(inserts),
                                                       inserts[0][0].database.client))
            except _NOT_SENT as exc:  # pymongo's connection API differs: not again
                log.warning("inserts not sent ahead of their outcome: %s: %s",
                            type(exc).__name__, exc)
                self.sends_ahead = False
            except Exception:  # noqa: BLE001, S110 - the connection: finish() sends them
                pass
        return Sent(self, inserts, None)

    def _may_bulk(self, inserts: Sequence[Insert], least: int = 2) -> bool:
        """``least`` inserts or more, into pymongo collections of one client (not
        mongomock's, nor tests' stand-ins), and the server not known to lack the
        command."""
        return (len(inserts) >= least and self.supported is not False
                and all(isinstance(c, Collection) for c, _ in inserts)
                and len({id(c.database.client) for c, _ in inserts}) == 1)


class Sent:
    """Inserts sent by :meth:`BulkInserter.send` (``answer``), or to send (None)."""

    def __init__(self, inserter: BulkInserter, inserts: Sequence[Insert],
                 answer: _Answer | None) -> None:
        self.inserter, self.inserts, self.answer = inserter, inserts, answer

    def finish(self, then: Sequence[Insert] = ()) -> None:
        """The inserts, then ``then``, written: InsertFailed at the first failure, its
        index counting the inserts first.  Once; :meth:`abandon` after it does nothing.

        ``then`` goes on the connection the inserts went on, as soon as their answer is
        read: pymongo's command path (sessions, server selection, a pooled connection)
        cost a C-STORE ~0.2 ms of the node's CPU more."""
        if not then:
            self._written()
            return
        following = self.chain(then)
        try:
            following.finish()
        except InsertFailed as exc:
            if exc.index is None:
                raise
            offset = len(self.inserts) - (len(following.inserts) - len(then))
            raise InsertFailed(offset + exc.index, exc.cause) from exc.cause

    def chain(self, then: Sequence[Insert]) -> Sent:
        """The inserts written (raises as :meth:`finish`), then ``then`` sent on the same
        connection, their outcome read by the Sent returned: the database writes them
        while the caller works, and never before the inserts are written.

        Where nothing went ahead, nothing is written yet: the Sent returned holds the
        inserts and ``then``, sent together by its :meth:`finish` (its indexes count
        the inserts first)."""
        sent, self.answer = self.answer, None
        if sent is None:
            return Sent(self.inserter, [*self.inserts, *then], None)
        follow = self.inserter._may_bulk(then, least=1)
        answer = self._read(sent, keep=follow)
        if answer is None:  # written one at a time, the server having no bulkWrite
            return Sent(self.inserter, then, None)
        try:
            _raise_first_error(answer, len(self.inserts))
        except InsertFailed:
            if follow:
                sent.release()
            raise
        if not follow:
            return Sent(self.inserter, then, None)
        try:
            return Sent(self.inserter, then, sent.follow(_bulk_command(then)))
        except (DocumentTooLarge, *_NOT_SENT):  # not sent; the connection is back
            return Sent(self.inserter, then, None)
        except Exception as exc:  # noqa: BLE001 - state unknown, as in insert()
            raise InsertFailed(None, exc) from exc

    def _written(self) -> None:
        """The inserts written, or InsertFailed at the first failure."""
        sent, self.answer = self.answer, None
        if sent is None:
            self.inserter.insert(self.inserts)
            return
        answer = self._read(sent)
        if answer is not None:
            _raise_first_error(answer, len(self.inserts))

    def _read(self, sent: _Answer, keep: bool = False) -> dict[str, Any] | None:
        """The answer to the inserts sent; None where the server turned out to have no
        ``bulkWrite``: then they are written one at a time here."""
        try:
            return sent.read(keep=keep)
        except OperationFailure as exc:
            if exc.code not in NOT_HERE:  # refused whole: nothing written
                raise InsertFailed(None, exc) from exc
            self.inserter.supported = False  # another server since (a restore?)
            self.inserter.insert(self.inserts)
            return None
        except Exception as exc:  # noqa: BLE001 - state unknown, as in insert()
            raise InsertFailed(None, exc) from exc

    def abandon(self) -> None:
        """The caller failed before :meth:`finish`: what was sent is waited for, nothing
        more written (the inserts sent may or may not be, as after a connection error)."""
        sent, self.answer = self.answer, None
        if sent is not None:
            with contextlib.suppress(Exception):
                sent.read()


#: What pymongo's connection API raises where it is not as this module expects.
_NOT_SENT = (AttributeError, TypeError, ValueError)


class _Answer:
    """A command sent on a connection held from the client's pool until its answer
    is read (once)."""

    def __init__(self, checkout: Any, connection: Any, request_id: int, client: Any) -> None:
        self.checkout, self.connection = checkout, connection
        self.request_id, self.client = request_id, client

    @classmethod
    def send(cls, command: dict[str, Any], client: Any) -> _Answer:
        server = client._get_topology().select_server(writable_server_selector, "bulkWrite")
        checkout = server.pool.checkout()
        connection = checkout.__enter__()
        try:
            request_id, data, _, largest = message._op_msg(0, command, "admin", None,
                                                           client.codec_options)
            connection.send_message(data, largest)
        except BaseException as exc:
            checkout.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return cls(checkout, connection, request_id, client)

    def read(self, keep: bool = False) -> dict[str, Any]:
        """The answer; the connection goes back to the pool, unless ``keep`` and the
        command succeeded (then :meth:`follow` or :meth:`release`)."""
        try:
            reply = self.connection.receive_message(self.request_id)
            answer: dict[str, Any] = reply.unpack_response(
                codec_options=self.client.codec_options)[0]
        except BaseException as exc:  # pymongo closed the connection
            self.checkout.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if not answer.get("ok"):
            self.release()
            raise OperationFailure(answer.get("errmsg", ""), answer.get("code"), answer)
        if not keep:
            self.release()
        return answer

    def follow(self, command: dict[str, Any]) -> _Answer:
        """The next command sent on this connection (its answer read before)."""
        try:
            request_id, data, _, largest = message._op_msg(0, command, "admin", None,
                                                           self.client.codec_options)
            self.connection.send_message(data, largest)
        except BaseException as exc:
            self.checkout.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return _Answer(self.checkout, self.connection, request_id, self.client)

    def release(self) -> None:
        self.checkout.__exit__(None, None, None)


def _bulk_command(inserts: Sequence[Insert]) -> dict[str, Any]:
    names: dict[str, int] = {}
    ops = []
    for collection, document in inserts:
        ns = names.setdefault(collection.full_name, len(names))
        ops.append({"insert": ns, "document": document})
    return {"bulkWrite": 1, "ops": ops, "nsInfo": [{"ns": name} for name in names],
            "ordered": True, "errorsOnly": True}


def _bulk_write(inserts: Sequence[Insert]) -> dict[str, Any]:
    return inserts[0][0].database.client.admin.command(_bulk_command(inserts))


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
