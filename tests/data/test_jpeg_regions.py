"""Regions cut from JPEGs with restart markers: the same pixels as a whole decode, from real photos."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.data import crops
from mimkit.data.crops import decode_crop, draft_scale, draw_crop_box, sample_rng
from mimkit.data.folder import BadImageError
from mimkit.data.jpeg_regions import read_layout, region_bounds, region_stream
from mimkit.data.jpeg_restart import with_restart_markers

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
REDUCED_CUT_TOLERANCE = 2  # grey levels, docs/pretraining.md


def encode(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def decoded(data: bytes, scale: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.draft(image.mode, (max(image.width // scale, 1), max(image.height // scale, 1)))
        return np.asarray(image)


@pytest.mark.parametrize(
    ("mode", "options", "cuts_columns"),
    [
        ("RGB", {"subsampling": 2, "restart_marker_rows": 1}, False),  # 4:2:0, 16x16 MCUs, a segment per row
        ("RGB", {"subsampling": 2, "restart_marker_blocks": 5}, True),  # 5 segments of 5 MCUs tile each row
        ("RGB", {"subsampling": 0, "restart_marker_blocks": 10}, True),  # 4:4:4, 8x8 MCUs, 5 segments a row
        ("RGB", {"subsampling": 2, "restart_marker_blocks": 7}, False),  # segments that straddle rows
        ("L", {"restart_marker_rows": 3}, False),  # one component: 8-row MCUs, every third row a segment start
    ],
)
def test_regions_equal_those_of_a_whole_decode(
    mode: str, options: dict[str, object], cuts_columns: bool, photo
) -> None:
    image = photo("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg").resize((400, 300)).convert(mode)
    data = encode(image, **options)
    layout = read_layout(data)
    assert layout is not None and (layout.width, layout.height) == (400, 300) and layout.cuts_columns == cuts_columns
    whole = {scale: decoded(data, scale) for scale in (1, 2, 4, 8)}
    # 96, 160, 288: MCU edges, where the region must reach one MCU further for chroma upsampling
    for region in [(0, 0, 400, 10), (100, 50, 180, 200), (333, 133, 334, 134), (96, 96, 160, 288), (17, 17, 399, 299)]:
        bounds = region_bounds(layout, *region)
        left, top, right, bottom = bounds
        assert left <= region[0] and top <= region[1] and right >= region[2] and bottom >= region[3]
        assert (left, right) == (0, 400) or cuts_columns
        cut = region_stream(data, layout, bounds)
        for scale in (1, 2, 4, 8):
            pixels = decoded(cut, scale)  # the region at 1/scale
            assert pixels.shape[:2] == (-(-(bottom - top) // scale), -(-(right - left) // scale))
            same = whole[scale][top // scale :, left // scale :][: pixels.shape[0], : pixels.shape[1]]
            asked = (  # the pixels asked for; the margin around them may differ
                slice(region[1] // scale - top // scale, -(-region[3] // scale) - top // scale),
                slice(region[0] // scale - left // scale, -(-region[2] // scale) - left // scale),
            )
            np.testing.assert_array_equal(pixels[asked], same[asked], err_msg=f"{region} at 1/{scale}")
    small = region_stream(data, layout, region_bounds(layout, 100, 50, 180, 200))
    assert len(small) < len(data) * (0.5 if cuts_columns else 0.8)


def test_files_without_restart_markers_are_not_cut(photo) -> None:
    image = photo("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg")
    assert read_layout(encode(image)) is None  # no DRI segment
    assert read_layout(encode(image, progressive=True, restart_marker_rows=1)) is None
    png = io.BytesIO()
    image.save(png, "PNG")
    assert read_layout(png.getvalue()) is None
    marked = encode(image, restart_marker_rows=1)
    assert read_layout(marked) is not None
    first = marked.index(b"\xff\xd0")  # a lost marker: the segments can no longer be counted
    assert read_layout(marked[:first] + marked[first + 2 :]) is None


def test_crops_from_regions_equal_crops_decoded_from_the_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo, exif_copies
) -> None:
    """For every EXIF orientation, in RGB and luminance, at full and reduced scale, a crop decoded from the region
    around it is bit-identical to the same crop decoded from the file's first row down."""
    aerial = photo("deepforest", "data", "2019_YELL_2_528000_4978000_image_crop2.png").crop((0, 0, 2288, 2464))
    aerial.save(tmp_path / "aerial.jpg", quality=90, restart_marker_blocks=11)  # 143 MCUs a row: 13 segments
    cases = [
        (path, 260, index) for path in exif_copies(tmp_path, quality=90, restart_marker_blocks=4) for index in range(5)
    ]
    cases += [(tmp_path / "aerial.jpg", 224, index) for index in range(10)]
    cuts = []
    real_region_stream = crops.region_stream

    def counting_region_stream(data: bytes, layout, bounds):  # type: ignore[no-untyped-def]
        cuts.append((bounds, layout.width, layout.height))
        return real_region_stream(data, layout, bounds)

    monkeypatch.setattr(crops, "region_stream", counting_region_stream)
    results = []
    for path, size, index in cases:
        draw = lambda w, h, i=index: draw_crop_box(w, h, SCALE, RATIO, sample_rng(5, 0, i))  # noqa: E731
        for chans in (3, 1):
            results.append((path, size, draw, chans, *decode_crop(path, path.name, chans, size, draw)))
    assert len(cuts) > len(results) // 2  # most crops were decoded from a region
    decoded_area = sum((right - left) * (bottom - top) for (left, top, right, bottom), _, _ in cuts)
    assert decoded_area < 0.8 * sum(w * h for _, w, h in cuts)
    assert {draft_scale(r[5].box, 224) for r in results if r[0].name == "aerial.jpg"} >= {4, 8}
    monkeypatch.setattr(crops, "read_layout", lambda data: None)  # every file decoded from the top
    reduced = []
    for path, size, draw, chans, pixels, record in results:
        top_down, same = decode_crop(path, path.name, chans, size, draw)
        assert same == record
        if draft_scale(record.box, size) == 1:  # the crop cut from the same pixels, then resized by torch
            np.testing.assert_array_equal(pixels, top_down, err_msg=f"{path.name} {record.box} {chans}")
        else:  # Pillow's filter on a box shifted by whole pixels: its positions round differently in the last bit
            reduced.append(np.abs(pixels.astype(int) - top_down).max())
    print(f"reduced crops: largest difference {max(reduced)} grey levels over {len(reduced)} crops")
    assert len(reduced) >= 8 and max(reduced) <= REDUCED_CUT_TOLERANCE


def test_cut_off_file_with_restart_markers_is_rejected(tmp_path: Path, exif_copies) -> None:
    data = exif_copies(tmp_path, quality=90, restart_marker_rows=1)[0].read_bytes()
    bottom_box = lambda w, h: crops.CropBox(0, h - h // 4, w // 2, h // 4)  # noqa: E731
    assert decode_crop(data, "whole", 3, 64, bottom_box)[1].box == bottom_box(512, 600)
    with pytest.raises(BadImageError, match=r"cut"):
        decode_crop(data[: len(data) * 9 // 10], "cut", 3, 64, bottom_box)


def test_re_encoded_photos_keep_their_pixels_and_cut_into_columns(tmp_path: Path, photo) -> None:
    portrait = photo("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg")  # 512x600
    exif = Image.Exif()
    exif[0x0112] = 6
    for options in ({"subsampling": 2}, {"subsampling": 0}, {"subsampling": 1}, {"progressive": True}):
        original = encode(portrait, exif=exif, **options)
        marked, psnr = with_restart_markers(original)
        layout = read_layout(marked)
        assert layout is not None and layout.cuts_columns and layout.interval * layout.mcu_width <= 128
        with Image.open(io.BytesIO(marked)) as again, Image.open(io.BytesIO(original)) as before:
            assert again.getexif()[0x0112] == 6 and again.size == before.size
            assert again.quantization == before.quantization  # the file's own tables
            difference = np.asarray(again, dtype=float) - np.asarray(before, dtype=float)
        assert psnr == pytest.approx(10 * np.log10(255**2 / np.mean(difference**2)))
        assert psnr > 40, (options, psnr)
    grey = encode(portrait.convert("L"))
    assert read_layout(with_restart_markers(grey)[0]).cuts_columns  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not a JPEG"):
        png = io.BytesIO()
        portrait.save(png, "PNG")
        with_restart_markers(png.getvalue())


def test_jpeg_restart_copies_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], photo) -> None:
    from mimkit.cli import main

    portrait = photo("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg")
    src = tmp_path / "photos"
    (src / "cats").mkdir(parents=True)
    (src / "dogs").mkdir()
    portrait.save(src / "cats" / "a.jpg", quality=90)
    portrait.rotate(90, expand=True).save(src / "dogs" / "b.JPEG", quality=80)
    portrait.save(src / "dogs" / "c.png")
    (src / "dogs" / "broken.jpg").write_bytes((src / "cats" / "a.jpg").read_bytes()[:300])
    dst = tmp_path / "marked"
    assert main(["jpeg-restart", str(src), str(dst), "--no-progress"]) == 1  # one file could not be read
    out = capsys.readouterr().out
    assert "2 JPEGs re-encoded" in out and "1 other file copied" in out and "broken.jpg" in out
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*")) == [
        "cats",
        "cats/a.jpg",
        "dogs",
        "dogs/b.JPEG",
        "dogs/c.png",
    ]
    assert (dst / "dogs" / "c.png").read_bytes() == (src / "dogs" / "c.png").read_bytes()
    assert all(read_layout(p.read_bytes()) is not None for p in [dst / "cats" / "a.jpg", dst / "dogs" / "b.JPEG"])
    (dst / "cats" / "a.jpg").unlink()  # as if stopped before it: only the missing file is written again
    (src / "dogs" / "broken.jpg").unlink()
    assert main(["jpeg-restart", str(src), str(dst), "--no-progress"]) == 0
    assert "1 JPEG re-encoded" in capsys.readouterr().out
    assert main(["jpeg-restart", str(src), str(src / "inside"), "--no-progress"]) == 2
    assert "must not be" in capsys.readouterr().err
