"""Field inputs for the input side of ``tricoclr-data prepare``: datasets assembled with symbolic
links (folder scans follow them, guard against loops and name what they skip) and user-written
UCF101-style lists whose paths hold spaces and non-ASCII letters (CRLF, BOM, NFD spellings).

The inputs in tests/data/field/ are copies of the field media (each with the make.sh that built
it with ffmpeg); the links in symlinked-class-folder are stored in git as links.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from video_factory import REPO, run_prepare, subprocess_env

from data_tools import lists
from tricoclr.data import schema
from tricoclr.data.store import open_store

FIELD = Path(__file__).parent / "data" / "field"
LINKED = FIELD / "symlinked-class-folder"
SPACES = FIELD / "list-paths-with-spaces"
QUICK = ("--flow", "none", "--size", "32")


def prepare_cli(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The real command line, ``tricoclr-data prepare``, in a child process."""
    argv = [
        sys.executable,
        "-m",
        "data_tools.cli",
        "prepare",
        str(source),
        "--out",
        str(out),
        *QUICK,
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]
    return subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def labels_by_source(out: Path) -> dict[str, tuple[str, str]]:
    """source -> (status, class name) of every manifest entry."""
    return {e["source"]: (e["status"], e["label"]) for e in open_store(out).manifest()}


def summary(out: Path) -> dict:
    return json.loads((out / schema.SUMMARY_FILE).read_text())


# ---- symbolic links -----------------------------------------------------------------------------


def test_field_links_are_links():
    assert (LINKED / "src" / "Jump").is_symlink() and (LINKED / "src" / "Run" / "linked_clip.mp4").is_symlink()
    assert os.readlink(LINKED / "src" / "Jump") == "../elsewhere/Jump"  # relative: the folder can move


def test_folder_scan_over_links_equals_the_list(tmp_path):
    scanned = run_prepare(LINKED / "src", tmp_path / "scan", *QUICK[2:], flow="none")
    listed = run_prepare(
        LINKED / "src", tmp_path / "list", *QUICK[2:], "--list", str(LINKED / "list_all.txt"), flow="none"
    )
    expected = {
        "Run/run_01.mp4": "Run",
        "Run/linked_clip.mp4": "Run",
        "Jump/jump_01.mp4": "Jump",
        "Jump/jump_02.mp4": "Jump",
    }
    assert {source: entry["label"] for source, entry in scanned.items()} == expected
    assert all(entry["status"] == "ok" for entry in scanned.values())
    assert {s: (e["id"], e["label_index"]) for s, e in scanned.items()} == {
        s: (e["id"], e["label_index"]) for s, e in listed.items()
    }
    for out in (tmp_path / "scan", tmp_path / "list"):
        assert json.loads((out / schema.CLASSES_FILE).read_text())["names"] == ["Jump", "Run"]
        assert summary(out)["labels"] == {"Jump": 2, "Run": 2}
    assert summary(tmp_path / "scan")["ignored_files"]["count"] == 0


def test_link_loops_and_broken_links_are_named_and_counted_not_followed(tmp_path):
    src = tmp_path / "src"
    (src / "Run").mkdir(parents=True)
    shutil.copy(LINKED / "src" / "Run" / "run_01.mp4", src / "Run" / "run_01.mp4")
    os.symlink("..", src / "Run" / "loop")  # Run/loop -> src, which contains Run: a loop
    os.symlink("../Run", src / "Run" / "again")  # Run/again -> Run itself: a loop too
    os.symlink("../missing_disk/Swim", src / "Swim")  # a class folder on a disk that is not mounted
    (src / ".cache").mkdir()
    (src / ".cache" / "clip.mp4").write_bytes(b"")
    found, ignored, warnings = lists.scan_folder(src)
    assert found == ["Run/run_01.mp4"]
    assert ignored == [".cache/", "Run/again/", "Run/loop/", "Swim"]
    assert [w.split(":")[0] for w in warnings] == ["Run/again/", "Run/loop/", "Swim"]
    assert "link loop" in warnings[0] and "link loop" in warnings[1]
    assert warnings[2] == "Swim: broken link to ../missing_disk/Swim: nothing there; skipped"

    result = prepare_cli(src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for name in ("Run/loop/", "Run/again/", "Swim"):
        assert f"warning: {name}" in result.stderr  # a whole class never vanishes without a word
    assert labels_by_source(tmp_path / "out") == {"Run/run_01.mp4": ("ok", "Run")}
    stats = summary(tmp_path / "out")
    assert stats["ignored_files"]["count"] == 4 and len(stats["scan_warnings"]) == 3


def test_a_class_folder_of_which_nothing_is_kept_is_named(tmp_path):
    src = tmp_path / "src"
    (src / "Run").mkdir(parents=True)
    (src / "Swim").mkdir()
    shutil.copy(LINKED / "src" / "Run" / "run_01.mp4", src / "Run" / "run_01.mp4")
    for name in ("a.mp4.part", "b.mp4.part"):  # downloads that never finished
        (src / "Swim" / name).write_bytes(b"")
    found, ignored, warnings = lists.scan_folder(src)
    assert found == ["Run/run_01.mp4"] and ignored == ["Swim/a.mp4.part", "Swim/b.mp4.part"]
    assert warnings == [
        "Swim/: none of its 2 file(s) is prepared (e.g. Swim/a.mp4.part): no video extension "
        "(see --extensions), hidden or a bad link"
    ]


# ---- lists with spaces, CRLF, BOM, non-ASCII names ----------------------------------------------


@pytest.mark.parametrize(
    "list_name, expected",
    [
        ("trainlist01.txt", {"Jump/plain.mp4": "Jump", "Jump/my clip (2).mp4": "Jump", "Tanzen/Übung_ä.mp4": "Tanzen"}),
        ("trainlist02.txt", {"Playing Guitar/take 01.mp4": "Playing Guitar"}),
    ],
)
def test_field_lists_with_spaces_prepare_every_file_with_its_class(tmp_path, list_name, expected):
    assert b"\r\n" in (SPACES / "lists" / list_name).read_bytes()  # written on Windows
    result = prepare_cli(SPACES / "src", tmp_path / "out", "--list", str(SPACES / "lists" / list_name))
    assert result.returncode == 0, result.stderr
    assert labels_by_source(tmp_path / "out") == {source: ("ok", label) for source, label in expected.items()}
    classes = json.loads((tmp_path / "out" / schema.CLASSES_FILE).read_text())["names"]
    assert classes == ["Jump", "Playing Guitar", "Tanzen"]  # from the classInd.txt beside the list
    indices = {e["source"]: e["label_index"] for e in open_store(tmp_path / "out").manifest()}
    assert indices == {source: classes.index(label) for source, label in expected.items()}


@pytest.mark.parametrize(
    "line, number_first, expected",
    [
        ("Jump/my clip (2).mp4 1\r\n", False, ("Jump/my clip (2).mp4", 1)),
        ("Playing Guitar/take 01.mp4\t2", False, ("Playing Guitar/take 01.mp4", 2)),
        ("  Tanzen/Übung_ä.mp4 3  ", False, ("Tanzen/Übung_ä.mp4", 3)),
        ("Jump/clip 2.mp4", False, ("Jump/clip 2.mp4", None)),  # "2.mp4" is no number: all path
        ("Jump/plain.mp4", False, ("Jump/plain.mp4", None)),
        ("Jump/clip ٣", False, ("Jump/clip ٣", None)),  # only ASCII digits are a label
        ("2 Playing Guitar\r\n", True, ("Playing Guitar", 2)),
        ("10\tair drumming", True, ("air drumming", 10)),
        ("Jump", True, ("Jump", None)),
        ("24 7 Fitness", True, ("7 Fitness", 24)),
    ],
)
def test_one_rule_splits_list_and_class_index_lines(line, number_first, expected):
    assert lists.split_numbered_line(line, number_first) == expected


def test_class_index_and_list_read_bom_crlf_and_spaces_alike(tmp_path):
    index = tmp_path / "classInd.txt"
    index.write_bytes("\ufeff1 Jump\r\n2 Playing Guitar\r\n\r\n3 Tanzen\r\n".encode("utf-8"))
    assert lists.read_class_index(index) == ["Jump", "Playing Guitar", "Tanzen"]
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffPlaying Guitar/take 01.mp4 2\r\nJump\\plain.mp4\r\n".encode("utf-8"))
    assert lists.read_ucf101_list(listing) == [(1, "Playing Guitar/take 01.mp4", 2), (2, "Jump/plain.mp4", None)]


def test_a_list_spelled_in_nfd_finds_the_nfc_file(tmp_path):
    """A list written on macOS (decomposed "U" + diaeresis) names the file stored as one code point."""
    listing = tmp_path / "trainlist.txt"
    nfd = unicodedata.normalize("NFD", "Tanzen/Übung_ä.mp4 3\n")
    assert nfd != unicodedata.normalize("NFC", nfd)
    listing.write_text(nfd, encoding="utf-8")
    inputs = lists.collect_inputs(SPACES / "src", [str(listing)], class_index=str(SPACES / "lists" / "classInd.txt"))
    (video,) = inputs.videos
    assert video.source == "Tanzen/Übung_ä.mp4" and Path(video.path).is_file()
    assert (video.label, video.label_index) == ("Tanzen", 2)


def test_a_label_number_names_the_class_and_contradictions_are_errors(tmp_path):
    index = str(SPACES / "lists" / "classInd.txt")
    loose = tmp_path / "loose.txt"
    loose.write_text("Jump/plain.mp4 1\nTanzen/Übung_ä.mp4 2\n", encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=r"loose.txt:2: 'Tanzen/Übung_ä.mp4' is in class folder 'Tanzen' but its "
        r"label 2 is 'Playing Guitar'",
    ):
        lists.collect_inputs(SPACES / "src", [str(loose)], class_index=index)
    loose.write_text("Jump/plain.mp4 7\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"label 7 of 'Jump/plain.mp4' is not a class number \(1-3"):
        lists.collect_inputs(SPACES / "src", [str(loose)], class_index=index)


def test_a_list_that_is_not_utf8_is_a_clear_error(tmp_path):
    listing = tmp_path / "trainlist.txt"
    listing.write_bytes("Jump/plain.mp4 1\r\nTanzen/Übung_ä.mp4 3\r\n".encode("cp1252"))
    result = prepare_cli(SPACES / "src", tmp_path / "out", "--list", str(listing))
    assert result.returncode == 2
    assert "trainlist.txt: line 2 is not UTF-8 text (byte 0xdc)" in result.stderr
