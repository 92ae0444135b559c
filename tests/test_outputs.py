"""outputs.build_once: a shared folder built once, whole or absent; the first finished writer wins."""

import json

import pytest

from hylo_lab.outputs import build_once


def writer(text: str, calls: list):
    def build(tmp):
        calls.append(tmp)
        (tmp / "data.txt").write_text(text)
        assert not (tmp / "done.json").exists()  # the marker comes after the build
        return {"text": text}

    return build


def test_a_folder_is_built_once_and_its_marker_is_written_last(tmp_path):
    final, calls = tmp_path / "cache" / "entry", []
    assert build_once(final, writer("a", calls)) is True
    assert build_once(final, writer("b", calls)) is False
    assert len(calls) == 1 and (final / "data.txt").read_text() == "a"
    assert json.loads((final / "done.json").read_text()) == {"text": "a"}
    assert [p.name for p in final.parent.iterdir()] == ["entry"]


def test_an_unfinished_folder_is_replaced(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "data.txt").write_text("half")
    assert build_once(final, writer("whole", [])) is True
    assert (final / "data.txt").read_text() == "whole" and (final / "done.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_writer_finished_first_is_kept_and_ours_dropped(tmp_path):
    final = tmp_path / "entry"

    def slow(tmp):
        build_once(final, writer("first", []))  # another process finishes while we build
        (tmp / "data.txt").write_text("second")
        return {}

    assert build_once(final, slow) is False
    assert (final / "data.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_custom_marker_and_finished_check(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "entry.json").write_text("{not json")  # a marker that does not parse is not finished

    def readable(folder):
        try:
            return "text" in json.loads((folder / "entry.json").read_text())
        except (OSError, ValueError):
            return False

    assert build_once(final, writer("x", []), marker="entry.json", finished=readable) is True
    assert readable(final) and not (final / "done.json").exists()


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    final = tmp_path / "entry"

    def broken(tmp):
        (tmp / "data.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_once(final, broken)
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    from hylo_lab.outputs import atomic_file

    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600
