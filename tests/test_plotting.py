"""Experiment plot helpers: re-plotting reads back exactly the recorded table."""

import os

import pytest

from experiments import common, plotting


def test_read_markdown_table_takes_the_last_table_and_stops_at_its_end(tmp_path, monkeypatch):
  monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
  with open(os.path.join(tmp_path, "t.md"), "w") as f:
    f.write(
      "# old run\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n### new run\n\n"
      "| size | img/s |\n|---|---:|\n| 128 | 6.98 |\n| 256 | 2.20 (batch 1) |\nafter\n| x |\n"
    )
  assert common.read_markdown_table("t.md") == [
    {"size": "128", "img/s": "6.98"},
    {"size": "256", "img/s": "2.20 (batch 1)"},
  ]


def test_a_file_without_a_table_is_an_error_naming_it(tmp_path, monkeypatch):
  monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
  with open(os.path.join(tmp_path, "empty.md"), "w") as f:
    f.write("no table here\n| lonely |\n")
  with pytest.raises(ValueError, match="empty.md"):
    common.read_markdown_table("empty.md")


def test_leading_number_reads_published_and_measured_cells():
  assert plotting.leading_number("8.8B (README 8.4B)") == 8.8
  assert plotting.leading_number("7.1M") == 7.1 and plotting.leading_number("0.42G") == 0.42
  assert plotting.leading_number("0.488 (batch 1, compile 76 s)") == 0.488
  assert plotting.leading_number("-") != plotting.leading_number("-")  # NaN: nothing drawn
