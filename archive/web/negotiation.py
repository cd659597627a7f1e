"""``Accept`` headers: which representation a client takes, or 406.

Only what this slice serves is offered: DICOM JSON (``application/dicom+json``, also
taken as ``application/json``) and ``multipart/related; type="application/dicom"``
holding the stored Part-10 files.  ``q=0`` excludes a range; other quality values are
not ranked (each resource has one representation to offer).
"""

from __future__ import annotations

from archive.web.errors import HttpError
from archive.web.multipart import MediaType

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
#: A transfer-syntax parameter meaning "as stored" (also what no parameter means here).
ANY_SYNTAX = "*"


class NotAcceptable(HttpError):
    """No representation the client accepts (406), with the message it reads."""

    def __init__(self, message: str) -> None:
        super().__init__(406, message)


def ranges(header: str | None) -> list[MediaType]:
    """The media ranges of an Accept header, ``q=0`` ones left out."""
    if not header or not header.strip():
        return [MediaType("*/*")]
    found = []
    for item in _split(header):
        if not item.strip():
            continue
        media = MediaType.parse(item)
        try:
            if float(media.params.get("q", "1")) <= 0:
                continue
        except ValueError:
            pass
        found.append(media)
    return found


def _split(header: str) -> list[str]:
    """Split at commas outside quoted strings."""
    items, current, quoted = [], [], False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


def json_accepted(header: str | None) -> None:
    """Raise NotAcceptable unless DICOM JSON is."""
    for media in ranges(header):
        if media.type in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return
    raise NotAcceptable(f"this resource is served as {DICOM_JSON} only")


def dicom_syntaxes(header: str | None) -> set[str]:
    """The transfer syntaxes a client takes in ``multipart/related;
    type="application/dicom"`` (``{"*"}``: any, i.e. as stored); NotAcceptable if none."""
    syntaxes: set[str] = set()
    for media in ranges(header):
        if media.type in ("*/*", "multipart/*"):
            syntaxes.add(ANY_SYNTAX)
        elif media.type == "multipart/related":
            kind = media.params.get("type", DICOM).lower()
            if kind in (DICOM, "application/*", "*/*"):
                syntaxes.add(media.params.get("transfer-syntax", ANY_SYNTAX).strip()
                             or ANY_SYNTAX)
    if not syntaxes:
        raise NotAcceptable(f'instances are served as multipart/related; type="{DICOM}" '
                            "only (frames, bulk data and rendered images are not "
                            "served yet)")
    return syntaxes
