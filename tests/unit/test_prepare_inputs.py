"""rcm_core.data.prepare's input readers (no models): the prompt file's accepted forms and refusals by line,
the media list's pairing with prompts, and the output location check."""

from __future__ import annotations

import re

import pytest

from rcm_core.config import ConfigError
from rcm_core.data.prepare import open_output, read_media_list, read_prompts


def test_read_prompts_accepts_crlf_bom_tabs_and_no_final_newline(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa cat\r\nthe\tdog caf\u00e9\r\nsky".encode())
    assert read_prompts(path) == ["a cat", "the\tdog caf\u00e9", "sky"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"a\n\xe9t\xe9\n", "line 2: not UTF-8 (byte 1)"),
        (b"a\nb\n   \n", "line 3: empty prompt"),
        (b"a\n\nb\n", "line 2: empty prompt"),
        (b"a\x1bb\n", "line 1: control character U+001B"),
        (b"", "no prompts"),
        (b"a\n" + b"x" * 20_001 + b"\n", "line 2: 20001 characters"),
    ],
)
def test_read_prompts_refuses_bad_line_naming_it(tmp_path, raw, expected):
    path = tmp_path / "p.txt"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        read_prompts(path)


def test_read_media_list_pairs_lines_with_prompts(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "clip").mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8)).save(tmp_path / "clip" / f"{i}.jpg")
    (tmp_path / "m.txt").write_text("a.png\nclip\n")
    assert read_media_list(tmp_path / "m.txt", 2) == [tmp_path / "a.png", tmp_path / "clip"]
    with pytest.raises(ConfigError, match="has 2 lines, the prompt file 3"):
        read_media_list(tmp_path / "m.txt", 3)
    (tmp_path / "m2.txt").write_text("a.png\nmissing.png\n")
    with pytest.raises(ConfigError, match="line 2: no such file or folder"):
        read_media_list(tmp_path / "m2.txt", 2)


def test_open_output_refuses_an_unfinished_dataset_and_bare_bucket(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "shard-00000.parquet").write_bytes(b"partial")
    with pytest.raises(ConfigError, match="already holds a dataset"):
        open_output(str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        open_output("s3://bucket")
    fs, root = open_output(str(tmp_path / "new"))
    assert root == str(tmp_path / "new")
