"""Real photos from package data, shared by the crop and JPEG-region tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from mimkit.dense.data.sample_data import package_data_dir

PhotoLoader = Callable[[str, str, str], Image.Image]

# the transposition that stores an upright image so that EXIF orientation N shows it upright again
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}  # fmt: skip


@pytest.fixture
def photo() -> PhotoLoader:
    """``photo(package, subdir, name)``: an installed package's sample photo as RGB; a missing one fails."""

    def load(package: str, subdir: str, name: str) -> Image.Image:
        try:
            return Image.open(package_data_dir(package, subdir) / name).convert("RGB")
        except FileNotFoundError as err:
            pytest.fail(f"sample photo not installed (`make setup` installs it): {err}")

    return load


@pytest.fixture
def exif_copies(photo: PhotoLoader) -> Callable[..., list[Path]]:
    """``exif_copies(folder, **save)``: matplotlib's grace_hopper.jpg (512x600) stored as ``o1.jpg`` ...
    ``o8.jpg`` in every EXIF orientation, each showing the portrait upright, saved as JPEG with ``save``."""

    def write(folder: Path, **save: object) -> list[Path]:
        portrait = photo("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg")
        paths = []
        for orientation in range(1, 9):
            exif = Image.Exif()
            exif[0x0112] = orientation
            stored = portrait.transpose(STORED_AS[orientation]) if orientation in STORED_AS else portrait
            path = folder / f"o{orientation}.jpg"
            stored.save(path, exif=exif, **save)
            paths.append(path)
        return paths

    return write
