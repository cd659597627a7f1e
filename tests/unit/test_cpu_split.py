"""``archive.ferretdb.split_cpus``: the node and its embedded FerretDB on CPUs apart."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from archive.ferretdb import split_cpus


@given(st.sets(st.integers(min_value=0, max_value=255), max_size=64))
def test_the_cpus_are_shared_out_in_two_halves_the_node_the_lower(cpus: set[int]) -> None:
    split = split_cpus(cpus)
    if len(cpus) < 2:
        assert split is None  # nothing to separate: both run anywhere
        return
    assert split is not None
    node, ferretdb = split
    assert node and ferretdb and node | ferretdb == cpus and not node & ferretdb
    assert max(node) < min(ferretdb)
    assert len(ferretdb) - len(node) in (0, 1)  # FerretDB the larger half
