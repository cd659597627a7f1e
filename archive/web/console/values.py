"""Values of C-FIND answers as the console's pages show them."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue


def text(ds: Dataset, keyword: str) -> str:
    """An attribute of an answer as one line of text ("" when absent or empty)."""
    element = ds.data_element(keyword)
    if element is None or element.is_empty:
        return ""
    value = element.value
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)
