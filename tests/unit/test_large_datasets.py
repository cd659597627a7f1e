"""Storing a Part-10 file from its path, as large datasets are (archive.storage, part10,
dicomjson, gridstore): the same refusals, DICOM JSON, documents and GridFS file as from
its bytes, with its bulk values never read into memory.

Values are left in the file from ``storage.DEFER_SIZE`` bytes on; these tests lower it to
the smallest the JSON conversion allows, so that pydicom's small test files have values
left in their file too (Pixel Data, long texts, sequences, LUTs...).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make_dataset, to_part10

from archive import part10

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- the walk over a file -----------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 5, part10.WINDOW - 3, 1024 * 1024 - 7,
                                    1024 * 1024 - 4, 1024 * 1024, 2 * 1024 * 1024 + 1])
def test_the_file_walker_finds_a_delimiter_across_its_reads(tmp_path: Path,
                                                            offset: int) -> None:
    marker = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    data = bytes(offset) + marker + bytes(100)
    path = tmp_path / "x"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        walker = part10._FileWalker(fd, base=0)
        assert walker.find(marker, 0, len(data)) == offset
        assert walker.find(marker, 0, offset + len(marker) - 1) == -1
        assert walker.find(marker, min(offset + 1, len(data)), len(data)) == -1
    finally:
        os.close(fd)


def test_meta_syntax_and_end_read_from_a_path_as_from_bytes(tmp_path: Path) -> None:
    for data in (to_part10(make_dataset()), b"", b"\x00" * 132, b"\x00" * 128 + b"DICM"):
        path = tmp_path / "x.dcm"
        path.write_bytes(data)
        assert part10.meta_syntax(path) == part10.meta_syntax(data)
        assert part10.meta_end(path) == part10.meta_end(data)
    assert part10.meta_syntax(path) is None
