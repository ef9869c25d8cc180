"""The simulator's pictures name their job: id and first words of the prompt, drawn on top."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from batch.sim.images import LABEL_CHARS, PngMaker, image_dims, label_lines

RGB = bytes((30, 140, 90))


@pytest.mark.parametrize(("job_id", "prompt", "lines"), [
    ("cat", "A cat", ["cat", "A cat"]),
    ("", "A cat", ["A cat"]),
    ("x", "A lighthouse on a cliff in a storm, oil painting",
     ["x", "A lighthouse on a cliff in a …"]),
    ("x", "Supercalifragilisticexpialidocious-and-then-some",
     ["x", "Supercalifragilisticexpialido…"]),
    ("y" * 200, "", ["y" * LABEL_CHARS]),
])
def test_label_lines_cut_to_fit(job_id: str, prompt: str, lines: list[str]) -> None:
    assert label_lines(job_id, prompt) == lines
    assert all(len(line) <= LABEL_CHARS + 2 for line in lines)


@pytest.mark.parametrize(("ratio", "size"), [("1:1", "1K"), ("21:9", "1K"), ("9:16", "2K")])
def test_a_labelled_picture_is_real_of_the_right_size_with_a_band_on_top(
    ratio: str, size: str
) -> None:
    width, height = image_dims(ratio, size)
    data = PngMaker(0).png(width, height, RGB, b"k\0v", ("orange-cat", "A cute orange cat"))
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == (width, height)
    band = image.crop((0, 0, width, height // 12)).convert("L")
    low, high = band.getextrema()
    assert high > 200 and low < 60  # white text on a dark band
    below = image.crop((0, height // 2, width, height // 2 + 1))
    assert max(below.convert("L").getextrema()) < 200  # the gradient, no text


def test_a_small_picture_gets_no_band_and_costs_nothing_more() -> None:
    maker = PngMaker(0)
    assert maker.png(64, 64, RGB, b"k\0v", ("a", "b")) == maker.png(64, 64, RGB, b"k\0v")
