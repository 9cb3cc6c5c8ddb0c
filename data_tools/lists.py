"""Which videos to prepare, with which labels: folder scans, UCF101/HMDB51/Kinetics lists, ids.

Every input becomes an ``InputVideo`` with a stable id. A listed file that does not exist is
still an input (it fails with "file not found" in the manifest), so nothing a list names is
silently dropped.

Labels are class names. Their integer index comes from a ``classInd.txt`` (UCF101 style, "1
ApplyEyeMakeup", 1-based in the file, 0-based in the records) given with ``--class-index`` or
sitting beside the list, so that train and test stores agree; otherwise from the sorted class
names of the whole list (before any ``--num-shards`` split, so every part agrees too).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tricoclr.data import schema

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .avi .mkv .webm .mpg .mpeg .mpe .m2v .ts .mts .m2ts .flv .f4v .wmv .asf "
    ".ogv .ogg .oggtheora .3gp .3g2 .vob .divx .y4m .mxf .dv".split()
)
LIST_FORMATS = ("ucf101", "hmdb51", "kinetics")
HMDB_SUBSET_CODES = {"train": {"1"}, "test": {"2"}, "unused": {"0"}, "all": {"1", "2"}}

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_HMDB_LIST = re.compile(r"^(?P<label>.+)_test_split(?P<split>\d+)\.txt$")
# A label or class number: ASCII digits apart from the text by white space (see split_numbered_line).
_NUMBER_LAST = re.compile(r"^(?P<text>.*\S)\s+(?P<number>[0-9]+)$")
_NUMBER_FIRST = re.compile(r"^(?P<number>[0-9]+)\s+(?P<text>\S.*)$")


@dataclass(frozen=True)
class InputVideo:
    id: str
    path: str  # absolute path (may not exist: then the video fails as "file not found")
    source: str  # path relative to SOURCE, POSIX separators
    label: str | None
    label_index: int | None


@dataclass
class InputList:
    videos: list[InputVideo]
    class_names: list[str] | None
    class_names_from: str | None  # "classInd.txt path" or "sorted labels"
    ignored: list[str] = field(default_factory=list)  # files skipped (not video extensions, hidden, links)
    duplicates: list[str] = field(default_factory=list)  # listed more than once, kept once
    warnings: list[str] = field(default_factory=list)  # sentences naming what a scan skipped and why


def video_id(source: str) -> str:
    """Stable id for a video: ``<sanitised stem>-<10 hex of sha1(relative path)>``.

    Only [A-Za-z0-9_-] (no dots: webdataset splits keys at the first dot), unique per relative
    path, the same on every run, machine and part.
    """
    stem = _UNSAFE.sub("_", PurePosixPath(source).stem).strip("_")[:60] or "video"
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:10]
    return f"{stem}-{digest}"


part_of = schema.part_of  # which of N parts prepares a video (shared with the readers)


def processing_order(video_id: str) -> str:
    """Sort key that mixes classes, so that consecutive videos (one shard) span many classes."""
    return hashlib.sha1(b"order:" + video_id.encode("utf-8")).hexdigest()


# ---- class index ----------------------------------------------------------------------------


def split_numbered_line(line: str, number_first: bool) -> tuple[str, int | None]:
    """(text, number) of one line of a list or class-index file: the one rule both follow.

    The number is a whole run of ASCII digits separated by white space, at the line's end (list
    files: "Playing Guitar/take 01.mp4 2") or start (classInd.txt: "2 Playing Guitar"); the rest
    of the line, inner spaces included, is the text. A line without such a number is all text.
    Surrounding white space (a Windows CR included) is removed first.
    """
    line = line.strip()
    match = (_NUMBER_FIRST if number_first else _NUMBER_LAST).match(line)
    if match is None:
        return line, None
    return match["text"], int(match["number"])


def read_text_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a UTF-8 text file (a BOM is dropped).

    Raises ValueError, naming the file and the place, when the file is not UTF-8 text.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def class_index_numbers(path: str | Path) -> dict[int, str]:
    """Class number -> name from a classInd-style file, by ``split_numbered_line``.

    Accepts "1 ApplyEyeMakeup" lines (numbers as written, any order, consecutive) or one name
    per line (numbered from 1). Names may contain spaces (Kinetics: "1 air drumming").
    Raises ValueError for a file that mixes both kinds of line or skips a number.
    """
    numbered: dict[int, str] = {}
    plain: list[str] = []
    for _, line in read_text_lines(path):
        name, number = split_numbered_line(line, number_first=True)
        if number is None:
            plain.append(name)
        else:
            numbered[number] = name
    if numbered and plain:
        raise ValueError(f"{path}: mixes numbered and unnumbered class lines")
    if plain:
        return {i: name for i, name in enumerate(plain, 1)}
    expected = list(range(min(numbered), min(numbered) + len(numbered)))
    if sorted(numbered) != expected:
        raise ValueError(f"{path}: class numbers are not consecutive")
    return {i: numbered[i] for i in expected}


def read_class_index(path: str | Path) -> list[str]:
    """Class names in index order from a classInd-style file (see ``class_index_numbers``)."""
    return list(class_index_numbers(path).values())


def _class_index_beside(list_paths: list[Path]) -> Path | None:
    for list_path in list_paths:
        folder = list_path if list_path.is_dir() else list_path.parent
        candidate = folder / "classInd.txt"
        if candidate.is_file():
            return candidate
    return None


# ---- folder scan ----------------------------------------------------------------------------


def scan_folder(
    source: Path, extensions: frozenset[str] | None = VIDEO_EXTENSIONS
) -> tuple[list[str], list[str], list[str]]:
    """(video files, ignored paths, warnings), relative POSIX paths sorted, found recursively.

    Symbolic links to files and folders are followed like the real thing (datasets assembled
    with links on shared clusters), but a link back to a folder that contains it is not (a loop).
    Hidden files and folders are ignored (a hidden folder is not entered); so are files whose
    extension is not in ``extensions`` (None accepts every file). Ignored paths are returned
    so the summary can count them; each skip that is not a plain extension or hidden-name rule
    (a link loop, a broken link, an unreadable folder, a special file) also gets a warning
    sentence naming it, and so does each folder of which nothing is kept.
    """
    videos, ignored, warnings = [], [], []
    for rel, problem in walk_files(source):
        if problem is not None:
            ignored.append(rel)
            warnings.append(f"{rel}: {problem}")
        elif any(part.startswith(".") for part in PurePosixPath(rel).parts):
            ignored.append(rel)
        elif extensions is None or PurePosixPath(rel).suffix.lower() in extensions:
            videos.append(rel)
        else:
            ignored.append(rel)
    return videos, ignored, warnings + folders_without_videos(videos, ignored)


def folders_without_videos(videos: list[str], ignored: list[str]) -> list[str]:
    """A warning for each folder whose files were all ignored (e.g. a class of '.avi.part'
    downloads): a whole class must not vanish without a word."""
    with_videos = {PurePosixPath(rel).parent for rel in videos}
    skipped: dict[PurePosixPath, list[str]] = {}
    for rel in ignored:
        parent = PurePosixPath(rel.rstrip("/")).parent
        if parent.parts and parent not in with_videos:
            skipped.setdefault(parent, []).append(rel)
    return [
        f"{folder.as_posix()}/: none of its {len(files)} file(s) is prepared (e.g. {files[0]}): no video "
        "extension (see --extensions), hidden or a bad link"
        for folder, files in sorted(skipped.items())
    ]


def walk_files(source: Path) -> list[tuple[str, str | None]]:
    """(relative POSIX path, why it is skipped or None) for every file under ``source``.

    Follows symbolic links; a linked folder whose real path is one of the folders above it (a
    loop) is reported instead of entered. Hidden folders are reported as one entry ("name/"),
    not entered. Written by hand because os.walk and Path.rglob (before 3.13) either do not
    follow links or follow them without loop protection, and neither reports what it skips.
    Sorted like paths (by their parts).
    """
    found: list[tuple[str, str | None]] = []
    pending = [(source, PurePosixPath(), frozenset({os.path.realpath(source)}))]
    while pending:
        folder, rel, above = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            found.append((f"{rel.as_posix()}/", f"folder cannot be read ({error.strerror}); its files are skipped"))
            continue
        for entry in entries:
            child = rel / entry.name
            if entry.is_dir():  # follows links
                real = os.path.realpath(entry.path)
                if entry.name.startswith("."):
                    found.append((f"{child.as_posix()}/", None))
                elif real in above:
                    found.append(
                        (
                            f"{child.as_posix()}/",
                            f"link loop: it leads to {real}, a folder that contains it; not followed",
                        )
                    )
                else:
                    pending.append((Path(entry.path), child, above | {real}))
            elif entry.is_file():
                found.append((child.as_posix(), None))
            elif entry.is_symlink():
                found.append((child.as_posix(), f"broken link to {os.readlink(entry.path)}: nothing there; skipped"))
            else:
                found.append((child.as_posix(), "not a regular file or folder (a pipe, socket or device); skipped"))
    return sorted(found, key=lambda item: PurePosixPath(item[0]).parts)


def label_from_folder(rel: str) -> str | None:
    """The class of a file in a class-per-folder layout: its parent folder (None at the top)."""
    parent = PurePosixPath(rel).parent
    return parent.name if parent.parts else None


# ---- list files -----------------------------------------------------------------------------


def expand_list_paths(lists: list[str]) -> list[Path]:
    """``--list`` values (files, folders or glob patterns) -> existing paths, in order."""
    paths: list[Path] = []
    for item in lists:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not all(Path(m).exists() for m in matches):
            raise FileNotFoundError(f"--list {item}: no such file or folder")
        paths.extend(Path(m) for m in matches)
    return paths


def read_ucf101_list(path: Path) -> list[tuple[int, str, int | None]]:
    """(line number, relative path, label number or None) per line of a UCF101-style split file.

    "Class/v_x.avi 1", "Class/v_x.avi", "Playing Guitar/take 01.mp4 2": only a trailing number
    is the label, the rest of the line (spaces included) is the path (``split_numbered_line``,
    the rule classInd.txt is read by). Backslashes become "/".
    """
    entries = []
    for number, line in read_text_lines(path):
        rel, label = split_numbered_line(line, number_first=False)
        entries.append((number, rel.replace("\\", "/"), label))
    return entries


def ucf101_label(where: str, rel: str, number: int | None, class_numbers: dict[int, str] | None) -> str:
    """The class of a list line: its label number's class in classInd.txt, else its folder.

    Raises ValueError (``where`` names the file and line) for a number that is not a class, a
    number that contradicts the class folder the file is in, or a line with neither.
    """
    folder = label_from_folder(rel)
    if number is None or class_numbers is None:
        if folder is None:
            raise ValueError(
                f"{where}: {rel!r} has no class folder (expected 'Class/file.avi') and no label "
                "number with a classInd.txt to name it"
            )
        return folder
    if number not in class_numbers:
        raise ValueError(
            f"{where}: label {number} of {rel!r} is not a class number "
            f"({min(class_numbers)}-{max(class_numbers)} in the class index)"
        )
    named = class_numbers[number]
    if folder is not None and folder != named and folder in class_numbers.values():
        raise ValueError(f"{where}: {rel!r} is in class folder {folder!r} but its label {number} is {named!r}")
    return named


def hmdb51_split_files(paths: list[Path], split: int) -> list[Path]:
    """The per-class split files of split ``split`` among files and folders given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in sorted(path.iterdir()) if _hmdb_match(p, split))
        else:
            files.append(path)
    if not files:
        raise FileNotFoundError(f"no HMDB51 split files '*_test_split{split}.txt' in {', '.join(map(str, paths))}")
    return files


def _hmdb_match(path: Path, split: int) -> bool:
    match = _HMDB_LIST.match(path.name)
    return bool(match) and int(match["split"]) == split


def read_hmdb51_list(path: Path, subset: str) -> tuple[str, list[str]]:
    """(class, video file names) of one HMDB51 split file, keeping lines whose code is in ``subset``."""
    match = _HMDB_LIST.match(path.name)
    if not match:
        raise ValueError(f"{path}: not an HMDB51 split file name ('<class>_test_split<k>.txt')")
    codes = HMDB_SUBSET_CODES[subset]
    names = []
    for _, line in read_text_lines(path):
        name, code = split_numbered_line(line, number_first=False)
        if code is not None and str(code) in codes:
            names.append(name)
    return match["label"], names


def read_kinetics_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a Kinetics annotation CSV (label, youtube_id, time_start, time_end, split)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a BOM is not part of 'label'
        rows = list(csv.DictReader(handle))
    if rows and "youtube_id" not in rows[0]:
        raise ValueError(f"{path}: not a Kinetics CSV (no 'youtube_id' column)")
    return rows


def kinetics_key(row: dict[str, str]) -> str:
    """File stem the usual downloaders give a clip: '<youtube_id>_<start:06d>_<end:06d>'."""
    return f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"


# ---- putting it together ----------------------------------------------------------------------


def collect_inputs(
    source: str | Path,
    lists: list[str] | None = None,
    list_format: str | None = None,
    class_index: str | None = None,
    subset: str = "all",
    split: int = 1,
    extensions: frozenset[str] | None = VIDEO_EXTENSIONS,
) -> InputList:
    """All inputs of a preparation run, labelled and indexed (see the module docstring)."""
    source = Path(source).resolve()
    if not source.is_dir():
        raise NotADirectoryError(f"SOURCE {source} is not a folder")
    ignored: list[str] = []
    warnings: list[str] = []
    list_paths = expand_list_paths(lists) if lists else []
    class_file = Path(class_index) if class_index else _class_index_beside(list_paths)
    class_numbers = class_index_numbers(class_file) if class_file is not None else None
    if lists:
        list_format = list_format or guess_list_format(list_paths)
        entries, all_labels = _entries_from_lists(source, list_paths, list_format, subset, split, class_numbers)
    else:
        files, ignored, warnings = scan_folder(source, extensions)
        entries = [(rel, label_from_folder(rel)) for rel in files]
        all_labels = {label for _, label in entries if label is not None}

    if class_numbers is not None:
        class_names, names_from = list(class_numbers.values()), str(class_file)
    else:
        class_names, names_from = (sorted(all_labels), "sorted labels") if all_labels else (None, None)
    index = {name: i for i, name in enumerate(class_names or [])}

    videos, seen, duplicates = [], set(), []
    for listed, label in entries:
        rel = existing_spelling(source, listed)
        if rel in seen:
            duplicates.append(rel)
            continue
        seen.add(rel)
        if label is not None and label not in index:
            raise ValueError(f"class {label!r} of {rel} is not in {names_from}")
        videos.append(InputVideo(video_id(rel), str(source / rel), rel, label, index.get(label)))
    return InputList(videos, class_names, names_from, ignored, duplicates, warnings)


def existing_spelling(source: Path, rel: str) -> str:
    """``rel``, or its other Unicode normal form (NFC/NFD) when only that one exists under SOURCE.

    A list written on macOS spells "Ü" as "U" + combining diaeresis (NFD), most Linux file
    names use one code point (NFC): the same name to a person, different bytes to the file system.
    """
    if rel.isascii() or (source / rel).exists():  # ASCII is the same in every normal form: no stat
        return rel
    for form in ("NFC", "NFD"):
        other = unicodedata.normalize(form, rel)
        if other != rel and (source / other).exists():
            return other
    return rel


def guess_list_format(list_paths: list[Path]) -> str:
    """kinetics for .csv, hmdb51 for '*_test_split<k>.txt' names or folders, else ucf101."""
    first = list_paths[0]
    if first.suffix.lower() == ".csv":
        return "kinetics"
    if first.is_dir() or _HMDB_LIST.match(first.name):
        return "hmdb51"
    return "ucf101"


def _entries_from_lists(
    source: Path,
    list_paths: list[Path],
    list_format: str,
    subset: str,
    split: int,
    class_numbers: dict[int, str] | None = None,
) -> tuple[list[tuple[str, str | None]], set[str]]:
    """(relative path, label) per listed video, and every class name the lists know."""
    if list_format == "ucf101":
        entries = [
            (rel, ucf101_label(f"{path}:{line}", rel, number, class_numbers))
            for path in list_paths
            for line, rel, number in read_ucf101_list(path)
        ]
        return entries, {label for _, label in entries}
    if list_format == "hmdb51":
        return _hmdb51_entries(source, hmdb51_split_files(list_paths, split), subset)
    if list_format == "kinetics":
        return _kinetics_entries(source, list_paths)
    raise ValueError(f"unknown list format {list_format!r}; expected one of {', '.join(LIST_FORMATS)}")


def _hmdb51_entries(source: Path, split_files: list[Path], subset: str):
    entries, labels = [], set()
    by_name = None  # built only if a file is not in its class folder
    for path in split_files:
        label, names = read_hmdb51_list(path, subset)
        labels.add(label)
        for name in names:
            rel = f"{label}/{name}"
            if not (source / rel).is_file():
                by_name = by_name or {PurePosixPath(r).name: r for r in scan_folder(source, None)[0]}
                rel = by_name.get(name, rel)
            entries.append((rel, label))
    return entries, labels


def _kinetics_entries(source: Path, csv_paths: list[Path]):
    """Match CSV rows to files by '<youtube_id>_<start>_<end>' stem, anywhere under SOURCE."""
    files = scan_folder(source, None)[0]
    by_stem: dict[str, str] = {}
    for rel in files:
        by_stem.setdefault(PurePosixPath(rel).stem, rel)
    entries, labels = [], set()
    for path in csv_paths:
        for row in read_kinetics_csv(path):
            label = row.get("label") or None
            if label is not None:
                labels.add(label)
            key = kinetics_key(row)
            rel = by_stem.get(key) or by_stem.get(row["youtube_id"])
            if rel is None:  # a clip that was never downloaded: recorded as failed, not dropped
                rel = f"{label}/{key}" if label else key
            entries.append((rel, label))
    return entries, labels
