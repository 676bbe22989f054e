"""Decode a region of a JPEG that has restart markers, without entropy-decoding the rest of the file.

A baseline JPEG's entropy-coded data is one Huffman bit stream: to reach a pixel, a decoder must decode
everything before it. Restart markers (``RST0``-``RST7``, every ``interval`` MCUs, declared by a ``DRI``
segment) cut that stream into segments that decode on their own: the DC predictions start again at each
one and each starts on a byte boundary. So the segments that cover a region, behind the file's own
headers with the frame's size changed to the region's, form a valid JPEG of just that region.
:func:`region_stream` builds it, renumbering the markers from ``RST0``. Rows are cut where a segment starts
at the start of an MCU row; columns too when the segments tile each MCU row (``interval`` divides the MCUs
per row), otherwise the region spans the full width. The region reaches one MCU beyond the pixels asked
for on each side where the image goes on, so chroma upsampling, which reads the neighbouring pixels, sees
what it sees in the whole image: the pixels asked for are those of a whole decode, at any DCT scaling.

Files written with restart markers: ``jpegtran -restart 1`` (lossless, one per MCU row), Pillow's
``save(..., restart_marker_blocks=N)`` or ``restart_marker_rows=N``, ``mimkit jpeg-restart``
(:mod:`mimkit.data.jpeg_restart`: a folder re-encoded with markers that tile the rows), and encoders that
write them for robustness. Progressive, lossless, arithmetic-coded and multi-scan files, and files without
markers, give ``None`` from :func:`read_layout` and are decoded from the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_SOF_SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded
_SOF_OTHER = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length
EOI = b"\xff\xd9"  # end of a JPEG's image; entropy-coded data never holds it (0xFF is stuffed as 0xFF00)
_RST0 = b"\xff\xd0"


@dataclass(frozen=True)
class RestartLayout:
    """What cutting a JPEG into regions needs, in stored (not EXIF-oriented) pixels.

    Attributes:
        width, height: the frame's size.
        mcu_width, mcu_height: pixels per MCU (8 times the largest sampling factors; 8x8 for one
            component, whose scan is not interleaved).
        mcus_per_row, mcu_rows: the MCU grid.
        interval: MCUs per restart segment.
        size_at: byte offset of the frame header's 2-byte height (the width follows it).
        scan_start: byte offset of the entropy-coded data.
        markers: byte offset of every restart marker, in order (marker ``j`` starts segment ``j + 1``).
        scan_end: byte offset where the entropy-coded data ends (the end-of-image marker).
    """

    width: int
    height: int
    mcu_width: int
    mcu_height: int
    mcus_per_row: int
    mcu_rows: int
    interval: int
    size_at: int
    scan_start: int
    markers: np.ndarray
    scan_end: int

    @property
    def rows_per_step(self) -> int:
        """MCU rows between two places where a segment starts at the start of an MCU row."""
        return math.lcm(self.interval, self.mcus_per_row) // self.mcus_per_row

    @property
    def cuts_columns(self) -> bool:
        """Whether several segments tile each MCU row, so that columns can be cut too."""
        return self.interval < self.mcus_per_row and self.mcus_per_row % self.interval == 0

    def segment_start(self, segment: int) -> int:
        return self.scan_start if segment == 0 else int(self.markers[segment - 1]) + 2

    def segment_end(self, segment: int) -> int:
        return self.scan_end if segment >= len(self.markers) else int(self.markers[segment])


def _u16(data: bytes, at: int) -> int:
    return (data[at] << 8) | data[at + 1]


def read_layout(data: bytes) -> RestartLayout | None:
    """The restart layout of a sequential, single-scan JPEG with restart markers; ``None`` for any other
    file (not a JPEG, progressive, no ``DRI``, markers missing or out of place), which is then decoded
    the ordinary way."""
    if data[:2] != b"\xff\xd8":
        return None
    at, interval, frame = 2, 0, None
    end = len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        length = _u16(data, at + 2)
        body = at + 4
        if marker in _SOF_OTHER:
            return None
        if marker in _SOF_SEQUENTIAL:
            components = data[body + 5] if body + 6 <= end else 0
            if components == 0 or body + 6 + 3 * components > end:
                return None
            sampling = [data[body + 6 + 3 * c + 1] for c in range(components)]  # (H << 4) | V of each component
            height, width = _u16(data, body + 1), _u16(data, body + 3)
            frame = (at + 5, width, height, components, max(s >> 4 for s in sampling), max(s & 15 for s in sampling))
        elif marker == 0xDD and length >= 4:  # DRI
            interval = _u16(data, body)
        elif marker == 0xDA:  # SOS: the entropy-coded data follows its header
            if frame is None or interval == 0 or body >= end or data[body] != frame[3]:
                return None  # no frame yet, no restart markers, or a scan without every component
            return _segments(data, frame, interval, at + 2 + length)
        at += 2 + length
    return None


def _segments(
    data: bytes, frame: tuple[int, int, int, int, int, int], interval: int, scan_start: int
) -> RestartLayout | None:
    """The layout, once the scan's start is known; ``None`` unless every restart marker is found."""
    size_at, width, height, components, h_max, v_max = frame
    if width == 0 or height == 0:  # a height given later by a DNL marker
        return None
    mcu_w, mcu_h = (8, 8) if components == 1 else (8 * h_max, 8 * v_max)
    per_row, rows = math.ceil(width / mcu_w), math.ceil(height / mcu_h)
    scan_end = data.rfind(EOI, scan_start)
    if scan_end < 0:
        return None
    markers = _markers(np.frombuffer(data, dtype=np.uint8, count=scan_end - scan_start, offset=scan_start))
    if len(markers) != math.ceil(per_row * rows / interval) - 1:
        return None  # markers lost or other markers inside the scan: not a file to cut
    return RestartLayout(
        width, height, mcu_w, mcu_h, per_row, rows, interval, size_at, scan_start, markers + scan_start, scan_end
    )


def _markers(scan: np.ndarray) -> np.ndarray:
    """Offsets of the restart markers in entropy-coded bytes (where 0xFF is followed by 0x00 or a marker)."""
    ff = np.flatnonzero(scan[:-1] == 0xFF)
    following = scan[ff + 1]
    return ff[(following >= 0xD0) & (following <= 0xD7)]


def region_bounds(layout: RestartLayout, left: int, top: int, right: int, bottom: int) -> tuple[int, int, int, int]:
    """The pixels ``(left, top, right, bottom)`` of the region :func:`region_stream` cuts for the stored
    pixels ``[left, right) x [top, bottom)``: one MCU more on each side where the image goes on, widened to
    where segments start (the full width when the segments do not tile the rows)."""
    step = layout.rows_per_step
    first_row = max(top // layout.mcu_height - 1, 0) // step * step
    stop_row = min(math.ceil(bottom / layout.mcu_height) + 1, layout.mcu_rows)
    stop_row = min(math.ceil(stop_row / step) * step, layout.mcu_rows)
    first_col, stop_col = 0, layout.mcus_per_row
    if layout.cuts_columns:
        k = layout.interval
        first_col = max(left // layout.mcu_width - 1, 0) // k * k
        stop_col = min(math.ceil(min(math.ceil(right / layout.mcu_width) + 1, layout.mcus_per_row) / k) * k, stop_col)
    return (
        first_col * layout.mcu_width,
        first_row * layout.mcu_height,
        min(stop_col * layout.mcu_width, layout.width),
        min(stop_row * layout.mcu_height, layout.height),
    )


def region_stream(data: bytes, layout: RestartLayout, bounds: tuple[int, int, int, int]) -> bytes:
    """A JPEG of the stored region ``bounds`` (as given by :func:`region_bounds`): the file's headers with the
    frame's size set to the region's, the region's segments, row by row, with their markers renumbered from
    ``RST0``, and an end-of-image marker."""
    left, top, right, bottom = bounds
    first_row, stop_row = top // layout.mcu_height, math.ceil(bottom / layout.mcu_height)
    if layout.cuts_columns and (left, right) != (0, layout.width):
        per_row = layout.mcus_per_row // layout.interval  # segments per MCU row
        first_col = left // layout.mcu_width // layout.interval
        stop_col = math.ceil(math.ceil(right / layout.mcu_width) / layout.interval)
        runs = [(row * per_row + first_col, row * per_row + stop_col) for row in range(first_row, stop_row)]
    else:  # whole rows: one run of segments
        first = first_row * layout.mcus_per_row // layout.interval
        runs = [(first, math.ceil(stop_row * layout.mcus_per_row / layout.interval))]
    pieces = [data[layout.segment_start(first) : layout.segment_end(stop - 1)] for first, stop in runs]
    scan = np.frombuffer(_RST0.join(pieces), dtype=np.uint8).copy()
    markers = _markers(scan)
    scan[markers + 1] = 0xD0 + np.arange(len(markers)) % 8  # RST0, RST1, ... in order
    head = bytearray(data[: layout.scan_start])
    head[layout.size_at : layout.size_at + 4] = (bottom - top).to_bytes(2, "big") + (right - left).to_bytes(2, "big")
    return bytes(head) + scan.tobytes() + EOI
