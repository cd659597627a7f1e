"""Frames rendered as consumer images (JPEG, PNG): WADO-RS ``/rendered`` and
``/thumbnail`` (PS3.18 8.3.5, 10.4.1.1.3).

A frame is decoded by pydicom (with whatever decoders are installed), then made
presentable as PS3.4 N.2 describes a display pipeline: the Modality LUT (Rescale Slope /
Intercept, or the LUT), the VOI (the requested ``window``, else the instance's first
Window Center / Width, else its VOI LUT, else the frame's own range), MONOCHROME1
inverted, colour converted to RGB; then scaled to fit the requested viewport.  Enhanced
multi-frame objects keep these attributes per frame in functional groups: the frame's
own group wins over the shared one, which wins over the top level.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array

from archive.bulkdata import Frames

JPEG = "image/jpeg"
PNG = "image/png"
MEDIA_TYPES = (JPEG, PNG)
#: Longest side of a thumbnail (PS3.18 leaves it to the server).
THUMBNAIL_SIZE = 128
#: Largest viewport a request may ask for (a bigger one is an attack on memory).
MAX_VIEWPORT = 8192


class CannotRender(Exception):
    """The frame cannot be decoded here (no decoder for its syntax, corrupt data)."""


@dataclass(frozen=True)
class Options:
    """What the request asks: ``window`` (center, width, function), ``viewport``
    (width, height to fit in), JPEG ``quality`` (1-100)."""

    media: str = JPEG
    window: tuple[float, float, str] | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90


def parse_options(params: dict[str, str], media: str, thumbnail: bool) -> Options:
    """The rendering parameters of PS3.18 8.3.5.1 that this service honours; ValueError
    (a 400) for a malformed one."""
    window = None
    if "window" in params:
        parts = params["window"].split(",")
        if len(parts) != 3 or parts[2].upper() not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            raise ValueError("window is center,width,function (LINEAR, LINEAR_EXACT or "
                             "SIGMOID)")
        center, width = _number(parts[0], "window center"), _number(parts[1], "window width")
        if width <= 0:
            raise ValueError("window width must be positive")
        window = (center, width, parts[2].upper())
    viewport = (THUMBNAIL_SIZE, THUMBNAIL_SIZE) if thumbnail else None
    if "viewport" in params:
        parts = params["viewport"].split(",")
        if len(parts) not in (2, 6) or not all(p.isdigit() for p in parts[:2]):
            raise ValueError("viewport is vw,vh (positive integers)")
        viewport = (int(parts[0]), int(parts[1]))
        if not all(0 < v <= MAX_VIEWPORT for v in viewport):
            raise ValueError(f"viewport sides are 1 to {MAX_VIEWPORT} pixels")
    quality = 90
    if "quality" in params:
        if not params["quality"].isdigit() or not 1 <= int(params["quality"]) <= 100:
            raise ValueError("quality is an integer from 1 to 100")
        quality = int(params["quality"])
    return Options(media, window, viewport, quality)


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}: {text[:20]!r} is not a number") from None
    if not np.isfinite(value):
        raise ValueError(f"{name}: not a finite number")
    return value


def render(frames: Frames, number: int, options: Options) -> bytes:
    """Frame ``number`` (1-based, checked) of an instance as an image file."""
    header = frames.header
    ds = frames.single(number)
    try:
        pixels = pixel_array(ds)
        if str(header.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
    except Exception as exc:  # noqa: BLE001 - any decoder failure: one clear reason
        syntax = frames.transfer_syntax
        raise CannotRender(f"cannot decode {syntax.name} here: {exc}"[:300]) from None
    if pixels.ndim == 2:
        image = Image.fromarray(_grey(header, number, pixels, options.window), "L")
    else:
        image = Image.fromarray(_rgb(pixels), "RGB")
    if options.viewport is not None:
        image = _fit(image, options.viewport)
    out = io.BytesIO()
    if options.media == PNG:
        image.save(out, "PNG")
    else:
        image.save(out, "JPEG", quality=options.quality)
    return out.getvalue()


def frame_attributes(header: Dataset, number: int) -> Dataset:
    """The Modality LUT and VOI attributes of frame ``number``: the top level's,
    overridden by the shared functional groups', overridden by the frame's own."""
    found = Dataset()
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
                    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
                    "PhotometricInterpretation", "BitsStored", "PixelRepresentation"):
        if keyword in header:
            found[keyword] = header[keyword]
    groups = []
    if header.get("SharedFunctionalGroupsSequence"):
        groups.append(header.SharedFunctionalGroupsSequence[0])
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame and 0 < number <= len(per_frame):
        groups.append(per_frame[number - 1])
    for group in groups:
        for name in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            for item in group.get(name) or []:
                for elem in item:
                    found[elem.tag] = elem
    return found


def _grey(header: Dataset, number: int, pixels: Any,
          window: tuple[float, float, str] | None) -> Any:
    """8-bit grey levels of one frame, after the Modality LUT and the VOI."""
    attributes = frame_attributes(header, number)
    values = np.asarray(apply_modality_lut(pixels, attributes), dtype=np.float64)
    if window is None and "WindowCenter" in attributes and "WindowWidth" in attributes:
        center, width = (_first(attributes.WindowCenter), _first(attributes.WindowWidth))
        function = str(attributes.get("VOILUTFunction") or "LINEAR").upper()
        if width > 0:
            window = (center, width, function)
    if window is not None:
        out = _window(values, *window)
    else:
        if "VOILUTSequence" in attributes:
            values = np.asarray(apply_voi(values, attributes), dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        out = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if str(attributes.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _first(value: Any) -> float:
    try:
        return float(value[0] if not isinstance(value, str | bytes) and hasattr(
            value, "__getitem__") else value)
    except (TypeError, ValueError, IndexError):
        return 0.0


def _window(values: Any, center: float, width: float, function: str) -> Any:
    """PS3.3 C.11.2.1.2-3: the VOI functions, as 0..1."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _rgb(pixels: Any) -> Any:
    if pixels.dtype == np.uint8:
        return pixels
    high = float(pixels.max()) or 1.0
    return np.clip(np.rint(pixels.astype(np.float64) / high * 255.0), 0, 255
                   ).astype(np.uint8)


def _fit(image: Image.Image, viewport: tuple[int, int]) -> Image.Image:
    """Scaled down (keeping the aspect ratio) to fit the viewport; never enlarged: a
    client scales up better than a server that would hold 8192 x 8192 pixels per
    request (a cheap way to exhaust its memory)."""
    scale = min(viewport[0] / image.width, viewport[1] / image.height, 1.0)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image
