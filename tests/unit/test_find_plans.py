"""What a query asks of the database: a superset of what it matches, on its narrowest key.

``archive.find.narrowest`` sends the database only the condition on the most specific
unique key a query names (SQLite would otherwise search the study's index and test the
series on the stored text of every instance of the study); the exact filter is decided
on what comes back, so the database's filter must never lose a document the exact one
matches.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from archive.find import narrowest
from archive.query import _pattern, evaluate

FIELDS = ("_id", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID",
          "StudyDate")
values = st.sampled_from(["1", "2", "3", "1.2", ""])
documents = st.fixed_dictionaries({}, optional={f: values for f in FIELDS})
field_names = st.sampled_from(FIELDS)


def conditions() -> st.SearchStrategy[dict[str, Any]]:
    leaf = st.one_of(
        st.builds(lambda f, v: {f: v}, field_names, values),
        st.builds(lambda f, vs: {f: {"$in": vs}}, field_names, st.lists(values, max_size=3)),
        st.builds(lambda f, v: {f: {"$gte": v}}, field_names, values),
        st.builds(lambda f, v: {f: _pattern(v + "*", False)}, field_names, values),
    )
    return st.recursive(leaf, lambda inner: st.one_of(
        st.builds(lambda parts: {"$and": parts}, st.lists(inner, min_size=1, max_size=4)),
        st.builds(lambda parts: {"$or": parts}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda a, b: {**a, **b}, inner, inner),
    ), max_leaves=8)


@given(conditions(), st.lists(documents, max_size=8))
def test_the_database_filter_keeps_every_match(filter_: dict[str, Any],
                                               docs: list[dict[str, Any]]) -> None:
    narrowed = narrowest(filter_)
    for doc in docs:
        if evaluate(filter_, doc):
            assert evaluate(narrowed, doc), (filter_, narrowed, doc)


def test_a_series_is_found_by_its_own_uid_not_its_studys() -> None:
    series_query = {"$and": [{"StudyInstanceUID": "1.2"}, {"SeriesInstanceUID": "1.2.3"},
                             {"PatientID": {"$regex": "^P"}}]}
    assert narrowest(series_query) == {"SeriesInstanceUID": "1.2.3"}
    by_ids = {"$and": [{"_id": {"$in": ["1.2.3.4"]}}, series_query]}
    assert narrowest(by_ids) == {"_id": {"$in": ["1.2.3.4"]}}


def test_without_a_naming_key_the_filter_is_sent_whole() -> None:
    by_date = {"$and": [{"StudyDate": {"$gte": "2024"}}, {"PatientID": "P1"}]}
    assert narrowest(by_date) is by_date
    in_an_or = {"$or": [{"StudyInstanceUID": "1"}, {"StudyInstanceUID": "2"}]}
    assert narrowest(in_an_or) is in_an_or
