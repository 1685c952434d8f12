"""scripts/make_image_folder.py: the images it writes, and bad input refused before any is written."""

from __future__ import annotations

import pytest
from conftest import load_script, script_refusal
from PIL import Image

make_image_folder = load_script("make_image_folder")


def test_images_of_the_asked_size_in_their_class_folders(tmp_path, capsys):
    make_image_folder.main([str(tmp_path / "fake"), "--images", "3", "--classes", "2", "--size", "8x6"])
    files = sorted(p.relative_to(tmp_path / "fake").as_posix() for p in (tmp_path / "fake").rglob("*.JPEG"))
    assert files == ["class_0000/img_000000.JPEG", "class_0000/img_000002.JPEG", "class_0001/img_000001.JPEG"]
    with Image.open(tmp_path / "fake" / files[0]) as image:
        assert image.size == (8, 6)
    assert "wrote 3 images in 2 class folders" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--images", "0"], ("--images: 0 is out of range", ">= 1")),
    (["--images", "-1"], ("--images: -1 is out of range",)),
    (["--images", "x"], ("--images: 'x' is not a whole number",)),
    (["--classes", "0"], ("--classes: 0 is out of range",)),
    (["--size", "10"], ("--size: '10' is not WIDTHxHEIGHT",)),
    (["--size", "0x0"], ("--size: '0x0' is not WIDTHxHEIGHT",)),
    (["--size", "100000x100000"], ("sides 1 to 10000",)),
    (["--size", "axb"], ("--size: 'axb'",)),
    (["--seed", "-1"], ("--seed: -1 is out of range",)),
])
def test_bad_numbers_are_one_line_and_write_nothing(tmp_path, capsys, args, words):
    line = script_refusal(make_image_folder.main, [str(tmp_path / "fake"), "--images", "2", *args], capsys)
    assert all(word in line for word in words), line
    assert list(tmp_path.iterdir()) == []


def test_a_root_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    line = script_refusal(make_image_folder.main, [str(tmp_path / "img.png"), "--images", "2"], capsys)
    assert "img.png is a file, not a folder" in line
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]
