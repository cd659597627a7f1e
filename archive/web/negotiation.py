"""``Accept`` headers: which representation a client takes, or 406.

What is offered: DICOM JSON (``application/dicom+json``, also taken as
``application/json``); ``multipart/related; type="application/dicom"`` holding the
stored Part-10 files; frames and bulk data as ``multipart/related`` of
``application/octet-stream`` (native) or of the compressed image's media type (PS3.18
Table 8.7.3-5).  ``q=0`` excludes a range; other quality values are not ranked (each
resource has one representation to offer).
"""

from __future__ import annotations

from pydicom import uid

from archive.web.errors import HttpError
from archive.web.multipart import MediaType

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
#: A transfer-syntax parameter meaning "as stored" (also what no parameter means here).
ANY_SYNTAX = "*"

#: PS3.18 Table 8.7.3-5: the media type of the frames of each compressed syntax.
COMPRESSED_MEDIA = {
    uid.JPEGBaseline8Bit: "image/jpeg", uid.JPEGExtended12Bit: "image/jpeg",
    uid.JPEGLossless: "image/jpeg", uid.JPEGLosslessSV1: "image/jpeg",
    uid.JPEGLSLossless: "image/jls", uid.JPEGLSNearLossless: "image/jls",
    uid.JPEG2000Lossless: "image/jp2", uid.JPEG2000: "image/jp2",
    uid.JPEG2000MCLossless: "image/jpx", uid.JPEG2000MC: "image/jpx",
    uid.HTJ2KLossless: "image/jphc", uid.HTJ2KLosslessRPCL: "image/jphc",
    uid.HTJ2K: "image/jphc", uid.RLELossless: "image/dicom-rle",
    uid.MPEG2MPML: "video/mpeg", uid.MPEG2MPHL: "video/mpeg",
    uid.MPEG4HP41: "video/mp4", uid.MPEG4HP41BD: "video/mp4", uid.MPEG4HP422D: "video/mp4",
    uid.MPEG4HP423D: "video/mp4", uid.MPEG4HP42STEREO: "video/mp4",
    uid.HEVCMP51: "video/h265", uid.HEVCM10P51: "video/h265",
}
#: The transfer syntax a media type means when the request names none (Table 8.7.3-5).
DEFAULT_SYNTAX = {
    OCTET_STREAM: uid.ExplicitVRLittleEndian, "image/jpeg": uid.JPEGBaseline8Bit,
    "image/jls": uid.JPEGLSLossless, "image/jp2": uid.JPEG2000Lossless,
    "image/jpx": uid.JPEG2000MCLossless, "image/jphc": uid.HTJ2KLossless,
    "image/dicom-rle": uid.RLELossless, "video/mpeg": uid.MPEG2MPML,
    "video/mp4": uid.MPEG4HP41, "video/h265": uid.HEVCMP51,
}


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
    type="application/dicom"`` (``"*"``: any, i.e. as stored; no parameter: Explicit
    VR Little Endian, PS3.18 Table 8.7.3-2); NotAcceptable if none."""
    syntaxes: set[str] = set()
    for media in ranges(header):
        if media.type in ("*/*", "multipart/*"):
            syntaxes.add(ANY_SYNTAX)
        elif media.type == "multipart/related":
            kind = media.params.get("type", DICOM).lower()
            if kind in (DICOM, "application/*", "*/*"):
                syntaxes.add(media.params.get("transfer-syntax", "").strip()
                             or uid.ExplicitVRLittleEndian)
    if not syntaxes:
        raise NotAcceptable(f'instances are served as multipart/related; type="{DICOM}" '
                            "only (frames, bulk data and rendered images are not "
                            "served yet)")
    return syntaxes


def media_of(syntax: str) -> str:
    """The media type frames in ``syntax`` travel as (native: octet-stream)."""
    return COMPRESSED_MEDIA.get(uid.UID(syntax), OCTET_STREAM)


def frame_representation(header: str | None, syntax: str, decodable: bool = False
                         ) -> tuple[str, str]:
    """The media type and transfer syntax to send frames or bulk data held in
    ``syntax`` as (a native one stands for uncompressed little endian): as held when
    the client takes it; else, when ``decodable``, decoded to Explicit VR Little Endian
    if the client takes that; else NotAcceptable."""
    media = media_of(syntax)
    uncompressed = uid.ExplicitVRLittleEndian
    decoded = False
    for item in ranges(header):
        if item.type in ("*/*", "multipart/*"):
            return media, syntax
        if item.type != "multipart/related":
            continue
        kind = item.params.get("type", media).lower()
        if kind in ("*/*", "application/*" if media == OCTET_STREAM else "image/*"):
            return media, syntax
        wanted = item.params.get("transfer-syntax", "").strip()
        if wanted == ANY_SYNTAX and kind in (media, OCTET_STREAM):
            return media, syntax
        if kind == media.lower() and (wanted or DEFAULT_SYNTAX.get(media)) == syntax:
            return media, syntax
        if kind == OCTET_STREAM and (wanted or uncompressed) == uncompressed:
            decoded = True  # a later range may still take it as stored
    if decoded and decodable:
        return OCTET_STREAM, uncompressed
    stored = "uncompressed" if media == OCTET_STREAM else f"{media} ({syntax})"
    also = ", and it cannot be decoded here" if decoded and media != OCTET_STREAM else ""
    raise NotAcceptable(f"stored {stored}, which the request does not accept{also} (ask "
                        f'for multipart/related; type="{media}" or transfer-syntax=*)')


def rendered_media(header: str | None, media_types: tuple[str, ...]) -> str:
    """The image type to render to: the first of ``media_types`` (JPEG first) the
    client takes, alone or in ``multipart/related``; NotAcceptable if none."""
    for item in ranges(header):
        kind = item.type
        if kind == "multipart/related":
            kind = item.params.get("type", "*/*").lower()
        if kind in ("*/*", "image/*", "multipart/*"):
            return media_types[0]
        if kind in media_types:
            return kind
    raise NotAcceptable(f"rendered images are served as {' or '.join(media_types)}")
