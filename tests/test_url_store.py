"""Prepared WebDataset stores read from URLs (docs/url_stores.md).

The generic route through fsspec (``file://``, ``memory://``), WebDataset ``pipe:`` commands (with
``cat``), and HTTP for real: a ``http.server`` on the loopback address serves prepared stores, and
the same data, loader batches, training run and retrieval metrics come out as from the local path.
Errors for missing files name the URL.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import shutil
import socket
import threading
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import eval_retrieval, tiny_overrides
from safetensors.torch import load_file

from data_tools.cli import main as data_main
from data_tools.writers import PartWriter
from tricoclr.config import DEFAULTS, load_config
from tricoclr.data import schema
from tricoclr.data.dataset import EpochLoader, StageViews
from tricoclr.data.location import open_stream
from tricoclr.data.store import iter_shard_samples, open_store
from tricoclr.trainer import Trainer

RGB_FLOW = StageViews(both_views=("rgb",), view2_only=("flow",))
SMALL_DATA = {"clip_frames": 4, "clip_stride": 2, "size": 32, "spectrogram_steps": 32}


def data_cli(*argv) -> int:
    """``tricoclr-data ARGV...`` in this process; its exit status."""
    return data_main([str(a) for a in argv])


# ---- fixtures ---------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log on the test output
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder, base URL): an HTTP server on 127.0.0.1 (a free port) serving the folder."""
    folder = tmp_path_factory.mktemp("served")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def two_part_store(train_wds, tmp_path_factory) -> Path:
    """The train store rewritten by the real writer as two parts (by id hash) of 2-video shards."""
    root = tmp_path_factory.mktemp("two_parts") / "store"
    source = open_store(train_wds)
    entries = {e["id"]: e for e in source.manifest()}
    writers = [PartWriter(root / schema.part_dir_name(i, 2), "webdataset", shard_max_videos=2) for i in range(2)]
    for sample in iter_shard_samples(source.shard_paths()):
        entry = {k: v for k, v in entries[sample["__key__"]].items() if k not in ("shard", "part")}
        blobs = {schema.part_from_member(k): v for k, v in sample.items() if not k.startswith("__")}
        writers[schema.part_of(sample["__key__"], 2)].add(entry, blobs)
    for index, writer in enumerate(writers):
        writer.close()
        for name in (schema.ARGS_FILE, schema.CLASSES_FILE):
            shutil.copy(train_wds / name, root / schema.part_dir_name(index, 2) / name)
    return root


@pytest.fixture(scope="module")
def test_wds(synth_dataset, tmp_path_factory) -> Path:
    """The labelled test split as a WebDataset store (no flow: retrieval here is RGB)."""
    out = tmp_path_factory.mktemp("prep_url") / "test_wds"
    assert (
        data_cli(
            "prepare",
            synth_dataset / "videos",
            "--out",
            out,
            "--format",
            "webdataset",
            "--list",
            synth_dataset / "splits" / "testlist01.txt",
            "--flow",
            "none",
            "--size",
            64,
            "--workers",
            0,
            "--no-progress",
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def http_stores(served, train_wds, test_wds, two_part_store) -> dict[str, str]:
    """URLs of copies of the stores on the HTTP server, by name."""
    folder, base = served
    for name, store in (("train_wds", train_wds), ("test_wds", test_wds), ("two_parts", two_part_store)):
        shutil.copytree(store, folder / name)
    return {name: f"{base}/{name}" for name in ("train_wds", "test_wds", "two_parts")}


@pytest.fixture
def memory_copy(train_wds):
    """The train store copied into fsspec's in-memory filesystem; removed afterwards."""
    memory = fsspec.filesystem("memory")
    memory.put(str(train_wds), "/url_test/train_wds", recursive=True)
    yield "memory://url_test/train_wds"
    memory.rm("/url_test", recursive=True)


def _samples(store) -> list[dict]:
    """Every raw sample of a store, without WebDataset's source fields (which name the URL)."""
    return [
        {k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}
        for s in iter_shard_samples(store.shard_paths())
    ]


def _shard_names(store) -> list[str]:
    return [path.rsplit("/", 3)[-3] + "/" + path.rsplit("/", 1)[-1] for path in store.shard_paths()]


def _assert_same_store(local_path: Path, address: str) -> None:
    local, remote = open_store(local_path), open_store(address)
    assert remote.format == local.format == "webdataset"
    assert [p.name for p in remote.parts] == [p.name for p in local.parts]
    assert remote.manifest() == local.manifest()
    assert remote.class_names() == local.class_names()
    assert _shard_names(remote) == _shard_names(local)
    assert all(not path.startswith(str(local_path)) for path in remote.shard_paths() if "file:" not in address)
    assert _samples(remote) == _samples(local)


# ---- reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["file", "memory", "pipe", "http"])
def test_a_url_store_reads_what_the_local_path_reads(route, train_wds, memory_copy, http_stores):
    address = {
        "file": f"file://{train_wds}",
        "memory": memory_copy,
        "pipe": f"pipe:cat {train_wds}/{{name}}",
        "http": http_stores["train_wds"],
    }[route]
    _assert_same_store(train_wds, address)


def test_http_shards_are_streamed_with_no_limit_on_the_whole_transfer(train_wds, http_stores):
    """A slow reader may take longer over one shard than aiohttp's default 5-minute request limit."""
    local = open_store(train_wds).shard_paths()[0]
    shard = open_store(http_stores["train_wds"]).shard_paths()[0]
    with open_stream(shard) as stream, open(local, "rb") as expected:
        timeout = stream.fs.client_kwargs["timeout"]
        assert timeout.total is None and timeout.sock_connect == 30 and timeout.sock_read == 300
        assert stream.read(1000) == expected.read(1000)  # read as it arrives: a stream, not a download


def test_parts_are_found_by_listing_or_by_brace_range(two_part_store, http_stores):
    http_root = http_stores["two_parts"]
    for address in (
        f"file://{two_part_store}",  # fsspec lists the folder
        http_root,  # http.server's index page lists it
        http_root + "/part-{00000..00001}-of-00002",  # WebDataset's brace range
        f"pipe:cat {two_part_store}/part-{{00000..00001}}-of-00002/{{name}}",
    ):
        _assert_same_store(two_part_store, address)


def test_loader_batches_from_urls_equal_the_local_ones_on_every_rank(two_part_store, http_stores):
    """Two ranks x two workers (forked after fsspec is in use): the same split, the same batches."""
    cfg = dict(DEFAULTS["data"], workers=2, prefetch_factor=2, shuffle_buffer=4, **SMALL_DATA)
    addresses = (
        str(two_part_store),
        http_stores["two_parts"],
        f"pipe:cat {two_part_store}/part-{{00000..00001}}-of-00002/{{name}}",
    )
    for rank in range(2):
        batches = []
        for address in addresses:
            loader = EpochLoader(address, RGB_FLOW, cfg, seed=0, batch_size=2, rank=rank, world_size=2)
            loader.set_epoch(1)
            batches.append(list(loader))
            del loader
        local = batches[0]
        assert len(local) > 0
        for remote in batches[1:]:
            assert len(remote) == len(local)
            for a, b in zip(local, remote):
                assert a["video_id"] == b["video_id"]
                assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_inspect_reads_a_url(train_wds, http_stores, tmp_path):
    assert data_cli("inspect", train_wds, "--json", tmp_path / "local.json") == 0
    assert data_cli("inspect", http_stores["train_wds"], "--json", tmp_path / "http.json") == 0
    assert json.loads((tmp_path / "http.json").read_text()) == json.loads((tmp_path / "local.json").read_text())


# ---- training and retrieval from the URL ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(train_wds, http_stores, tmp_path_factory) -> dict[str, Path]:
    """The tiny schedule (every stage, one step each) from the local path and from the HTTP URL."""
    outs = {}
    for name, path in (("local", train_wds), ("http", http_stores["train_wds"])):
        outs[name] = tmp_path_factory.mktemp("runs") / name
        Trainer(load_config("configs/tiny.yaml", tiny_overrides(path, outs[name], max_steps_per_stage=1))).run()
    return outs


def _tensor_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.safetensors"))}


def test_the_tiny_schedule_trains_identically_from_http(tiny_runs):
    local, remote = _tensor_files(tiny_runs["local"]), _tensor_files(tiny_runs["http"])
    assert local.keys() == remote.keys()
    assert any(name.startswith("checkpoints/") for name in local) and any("encoders/" in n for n in local)
    for name in local:  # tensor equality: safetensors bytes differ in metadata order between runs
        a, b = load_file(local[name]), load_file(remote[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_retrieval_from_http_equals_retrieval_from_the_local_path(
    tiny_runs, train_wds, test_wds, http_stores, tmp_path
):
    encoder = tiny_runs["http"] / "encoders" / "rgb.safetensors"
    results = {}
    for name, train, test in (
        ("local", train_wds, test_wds),
        ("http", http_stores["train_wds"], http_stores["test_wds"]),
    ):
        out = tmp_path / f"{name}.json"
        assert eval_retrieval(encoder, train, test, out) == 0
        results[name] = json.loads(out.read_text())
    assert results["http"] == results["local"]
    assert results["http"]["num_test"] > 0


# ---- errors -----------------------------------------------------------------------------------


def test_a_missing_manifest_or_shard_is_an_error_naming_the_url(
    served, train_wds, test_wds, http_stores, tmp_path, caplog, capsys
):
    folder, base = served
    with pytest.raises(FileNotFoundError, match=f"{base}/absent/manifest.jsonl: not found .*404"):
        open_store(f"{base}/absent")
    with socket.socket() as probe:  # a port nothing listens on: the message says the connection failed
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(FileNotFoundError, match=f"{closed}/store/manifest.jsonl: .*[Cc]onnect"):
        open_store(f"{closed}/store")
    assert data_cli("inspect", f"{base}/absent") == 2
    assert f"{base}/absent/manifest.jsonl" in capsys.readouterr().err

    shutil.copytree(test_wds, folder / "no_shard")
    first_shard = min((folder / "no_shard" / schema.SHARDS_DIR).glob("*.tar"))
    first_shard.unlink()
    shard_url = f"{base}/no_shard/{schema.SHARDS_DIR}/{first_shard.name}"
    store = open_store(f"{base}/no_shard")  # the manifest still names the shard
    with pytest.raises(FileNotFoundError, match=f"{shard_url}: not found"):
        list(store.iter_records())
    with pytest.raises(SystemExit, match=shard_url):
        eval_retrieval("random", http_stores["train_wds"], f"{base}/no_shard", tmp_path / "x.json")

    # Training keeps the project's policy for unreadable shards (counted, warned, ranks in step),
    # and the warning names the URL.
    cfg = dict(DEFAULTS["data"], workers=0, shuffle_buffer=4, **SMALL_DATA)
    shutil.copytree(train_wds, folder / "train_no_shard")
    (folder / "train_no_shard" / schema.SHARDS_DIR / first_shard.name).unlink()
    loader = EpochLoader(f"{base}/train_no_shard", RGB_FLOW, cfg, seed=0, batch_size=2)
    with (
        caplog.at_level(logging.WARNING, logger="tricoclr.data.stream_loader"),
        pytest.raises(RuntimeError, match="no readable sample"),
    ):
        list(loader)
    assert any(f"{base}/train_no_shard/shards/{first_shard.name}" in r.getMessage() for r in caplog.records)


def test_lmdb_over_a_url_and_a_pipe_without_name_are_refused(train_lmdb, train_wds):
    with pytest.raises(ValueError, match="cannot be read over a URL"):
        open_store(f"file://{train_lmdb}")
    with pytest.raises(ValueError, match=r"needs \{name\}"):
        open_store(f"pipe:cat {train_wds}/shards/shard-000000.tar")
    with pytest.raises(FileNotFoundError, match=f"pipe:cat {train_wds}/absent/prepare_args.json: the command exited"):
        open_store(f"pipe:cat {train_wds}/absent/{{name}}")
