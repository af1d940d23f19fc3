"""BENCHMARKS.md is shared by several benchmarks: rewriting one section must keep all the others."""

from __future__ import annotations

from pathlib import Path

from bench.common import HEADER, replace_section, table

OTHERS = """# fedmq benchmarks

intro

## Replay

replay figures
| a | b |

## Codec

old codec figures

## Differential privacy

dp figures
### a sub-heading inside a section
more dp
"""


def test_a_missing_file_is_created_with_the_header_and_the_section(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    replace_section("Codec", "fast", path)
    text = path.read_text()
    assert text.startswith(HEADER) and text.endswith("## Codec\n\nfast\n")


def test_rewriting_one_section_keeps_every_other_byte(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(OTHERS)
    replace_section("Codec", "new codec figures\n\n", path)
    assert path.read_text() == OTHERS.replace("old codec figures", "new codec figures")


def test_the_last_section_and_its_sub_headings_are_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(OTHERS)
    replace_section("Differential privacy", "eps", path)
    text = path.read_text()
    assert "more dp" not in text and "sub-heading" not in text
    assert text.endswith("## Differential privacy\n\neps\n")
    assert "old codec figures" in text and "replay figures" in text


def test_a_new_section_is_appended_and_a_similar_title_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(OTHERS)
    replace_section("Code", "other", path)
    text = path.read_text()
    assert text.startswith(OTHERS.rstrip("\n")) and text.endswith("\n\n## Code\n\nother\n")
    replace_section("Code", "again", path)
    assert path.read_text().count("## Code\n") == 1 and "old codec figures" in path.read_text()


def test_table_renders_markdown() -> None:
    assert table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
