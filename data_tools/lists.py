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
import re
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
    ignored: list[str] = field(default_factory=list)  # files skipped (not video extensions, hidden)
    duplicates: list[str] = field(default_factory=list)  # listed more than once, kept once


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


def read_class_index(path: str | Path) -> list[str]:
    """Class names in index order from a classInd-style file.

    Accepts "1 ApplyEyeMakeup" lines (1-based numbers, any order) or one name per line. Names
    may contain spaces (Kinetics: "1 air drumming").
    """
    numbered: dict[int, str] = {}
    plain: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        head, _, rest = line.partition(" ")
        if head.isdigit() and rest.strip():
            numbered[int(head)] = rest.strip()
        else:
            plain.append(line)
    if numbered and plain:
        raise ValueError(f"{path}: mixes numbered and unnumbered class lines")
    if plain:
        return plain
    expected = list(range(min(numbered), min(numbered) + len(numbered)))
    if sorted(numbered) != expected:
        raise ValueError(f"{path}: class numbers are not consecutive")
    return [numbered[i] for i in expected]


def _class_index_beside(list_paths: list[Path]) -> Path | None:
    for list_path in list_paths:
        folder = list_path if list_path.is_dir() else list_path.parent
        candidate = folder / "classInd.txt"
        if candidate.is_file():
            return candidate
    return None


# ---- folder scan ----------------------------------------------------------------------------


def scan_folder(source: Path, extensions: frozenset[str] | None = VIDEO_EXTENSIONS) -> tuple[list[str], list[str]]:
    """(video files, ignored files), relative POSIX paths sorted, found recursively.

    Hidden files and folders are ignored; so are files whose extension is not in
    ``extensions`` (None accepts every file). Ignored files are returned so the summary can
    report them.
    """
    videos, ignored = [], []
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(source).as_posix()
        if any(part.startswith(".") for part in PurePosixPath(rel).parts):
            ignored.append(rel)
        elif extensions is None or path.suffix.lower() in extensions:
            videos.append(rel)
        else:
            ignored.append(rel)
    return videos, ignored


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


def read_ucf101_list(path: Path) -> list[tuple[str, str]]:
    """(relative path, class) pairs of a UCF101 split file ("Class/v_x.avi 1" or "Class/v_x.avi")."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        rel = line.split()[0].replace("\\", "/")
        label = label_from_folder(rel)
        if label is None:
            raise ValueError(f"{path}:{number}: {rel!r} has no class folder (expected 'Class/file.avi')")
        entries.append((rel, label))
    return entries


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
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in codes:
            names.append(fields[0])
    return match["label"], names


def read_kinetics_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a Kinetics annotation CSV (label, youtube_id, time_start, time_end, split)."""
    with path.open(newline="", encoding="utf-8") as handle:
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
    if lists:
        list_paths = expand_list_paths(lists)
        list_format = list_format or guess_list_format(list_paths)
        entries, all_labels = _entries_from_lists(source, list_paths, list_format, subset, split)
    else:
        list_paths = []
        files, ignored = scan_folder(source, extensions)
        entries = [(rel, label_from_folder(rel)) for rel in files]
        all_labels = {label for _, label in entries if label is not None}

    class_file = Path(class_index) if class_index else _class_index_beside(list_paths)
    if class_file is not None:
        class_names, names_from = read_class_index(class_file), str(class_file)
    else:
        class_names, names_from = (sorted(all_labels), "sorted labels") if all_labels else (None, None)
    index = {name: i for i, name in enumerate(class_names or [])}

    videos, seen, duplicates = [], set(), []
    for rel, label in entries:
        if rel in seen:
            duplicates.append(rel)
            continue
        seen.add(rel)
        if label is not None and label not in index:
            raise ValueError(f"class {label!r} of {rel} is not in {names_from}")
        videos.append(InputVideo(video_id(rel), str(source / rel), rel, label, index.get(label)))
    return InputList(videos, class_names, names_from, ignored, duplicates)


def guess_list_format(list_paths: list[Path]) -> str:
    """kinetics for .csv, hmdb51 for '*_test_split<k>.txt' names or folders, else ucf101."""
    first = list_paths[0]
    if first.suffix.lower() == ".csv":
        return "kinetics"
    if first.is_dir() or _HMDB_LIST.match(first.name):
        return "hmdb51"
    return "ucf101"


def _entries_from_lists(
    source: Path, list_paths: list[Path], list_format: str, subset: str, split: int
) -> tuple[list[tuple[str, str | None]], set[str]]:
    """(relative path, label) per listed video, and every class name the lists know."""
    if list_format == "ucf101":
        entries = [entry for path in list_paths for entry in read_ucf101_list(path)]
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
