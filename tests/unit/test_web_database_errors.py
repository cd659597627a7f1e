"""A database failure under an HTTP request: 503 with Retry-After, and a log line
saying what failed when the health monitor does not (it logs lost connections once
per outage) -- the client is told no more than "unavailable"."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import pytest
from pymongo.errors import AutoReconnect, OperationFailure, PyMongoError

from archive.config import Config
from archive.context import Context
from archive.web.app import Service
from archive.web.errors import HttpError


@pytest.fixture
def service() -> Any:
    cfg = Config()
    cfg.database.uri = "mongodb://127.0.0.1:1/"  # never contacted
    context = Context(cfg)
    yield Service(context)
    context.client.close()


def failing(exc: PyMongoError) -> Any:
    def call() -> NoReturn:
        raise exc
    return call


@pytest.mark.parametrize("exc", [PyMongoError("series 1.2.3 kept changing while being "
                                              "rebuilt for 10 s"),
                                 OperationFailure("write conflict", code=112)])
def test_a_database_error_is_503_and_logged_with_its_cause(
        service: Service, exc: PyMongoError, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "archive.web"), \
            pytest.raises(HttpError) as raised:
        service.database(failing(exc), "delete")
    assert raised.value.status == 503 and raised.value.headers == {"Retry-After": "5"}
    assert str(exc) not in raised.value.message  # the client learns nothing more
    lines = [r.getMessage() for r in caplog.records if r.name == "archive.web"]
    assert lines == [f"database error during the delete: {type(exc).__name__}: {exc}"]


def test_a_lost_connection_is_left_to_the_health_monitor_to_log(
        service: Service, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "archive.web"), \
            pytest.raises(HttpError) as raised:
        service.database(failing(AutoReconnect("connection refused")), "delete")
    assert raised.value.status == 503
    assert [r for r in caplog.records if r.name == "archive.web"] == []
