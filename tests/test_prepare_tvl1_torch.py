"""``tricoclr-data prepare --flow tvl1-torch``: TV-L1 in PyTorch batched across videos by the main
process. Same stored flow as OpenCV's TV-L1 with the same parameters, independent of the batch,
resumable after kill -9, options checked. Tiny frames and few TV-L1 iterations: CPU only."""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest
import torch
from test_prepare import _run_and_kill
from video_factory import make_video, moving_frames, prepare_argv, run_prepare

from data_tools import prepare
from data_tools.encode_video import PrepareConfig
from data_tools.flow import available_flow_methods, flow_params_meta, is_batched_flow_method
from tricoclr.data import schema
from tricoclr.data.store import open_store
from tricoclr.ops.tvl1 import TVL1Params

try:
    import cv2

    HAVE_OPENCV_TVL1 = hasattr(cv2, "optflow")
except ImportError:  # pragma: no cover - the dev environment has it
    HAVE_OPENCV_TVL1 = False

# Few scales and iterations, for both methods alike: seconds instead of minutes on a CPU.
SHORT = ("--tvl1-scales", "2", "--tvl1-warps", "2", "--tvl1-inner-iterations", "5", "--tvl1-outer-iterations", "2")
SHORT_PARAMS = TVL1Params(nscales=2, warps=2, inner_iterations=5, outer_iterations=2)
QUICK = ("--size", "32", "--no-audio", *SHORT)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Two frame sizes (so batches group by size), an up-sampled video (repeated frames) and a
    single-frame video (no pair at all)."""
    src = tmp_path_factory.mktemp("tvl1_src")
    make_video(src / "Walk" / "square.mp4", seconds=1.0, width=32, height=32, dx=1, seed=1)
    make_video(src / "Walk" / "wide.mp4", frames=moving_frames(24, 32, 48, dx=2, seed=2), fps=30)
    make_video(src / "Run" / "slow.mp4", frames=moving_frames(12, 32, 32, dx=2, dy=1, seed=3), fps=15)
    make_video(src / "Run" / "still.mp4", frames=moving_frames(1, 32, 32, seed=4), fps=30)
    return src


def _without(entry: dict, keys) -> dict:
    return {k: v for k, v in entry.items() if k not in keys}


def _flows(out) -> dict[str, torch.Tensor]:
    return {r.meta["source"]: r.frames("flow", 0, r.meta["frames"]) for r in open_store(out).iter_records()}


@pytest.fixture(scope="module")
def batch3(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("tvl1_torch") / "b3"
    manifest = run_prepare(source, out, *QUICK, "--flow-device", "cpu", "--flow-batch", "3", flow="tvl1-torch")
    return out, manifest


@pytest.mark.skipif(not HAVE_OPENCV_TVL1, reason="opencv-contrib (cv2.optflow) not installed")
def test_same_flow_as_opencv_tvl1(source, batch3, tmp_path):
    out, manifest = batch3
    reference = tmp_path / "opencv"
    opencv_manifest = run_prepare(source, reference, *QUICK, flow="tvl1")
    torch_flows, opencv_flows = _flows(out), _flows(reference)
    assert (
        set(torch_flows) == set(opencv_flows) == {"Walk/square.mp4", "Walk/wide.mp4", "Run/slow.mp4", "Run/still.mp4"}
    )
    for name, flow in torch_flows.items():
        assert flow.shape == opencv_flows[name].shape
        diff = (flow.int() - opencv_flows[name].int()).abs()
        # Same quantisation and JPEG coding: at most a rounding flip here and there.
        assert diff.float().mean() < 0.1 and diff.max() <= 3, (name, diff.float().mean(), diff.max())
    differ = ("flow_method", "bytes", "bytes_by_modality", "part")  # the meta's size depends on the method's name
    for name, entry in manifest.items():
        assert _without(entry, differ) == _without(opencv_manifest[name], differ)  # all else is alike
        assert opencv_manifest[name]["flow_method"] == "tvl1"


def test_stored_flow_and_meta(batch3):
    out, manifest = batch3
    flows = _flows(out)
    for name, entry in manifest.items():
        assert entry["status"] == "ok" and entry["flow_method"] == "tvl1-torch"
        assert entry["flow_params"] == flow_params_meta("tvl1-torch", SHORT_PARAMS)
        assert entry["flow_params"]["nscales"] == 2 and entry["flow_params"]["lambda_"] == 0.15
        assert entry["flow_frames"] == entry["frames"] == flows[name].shape[0]
        assert entry["flow_encoding"] == schema.FLOW_ENCODING and entry["flow_y_offset"] == 32
        assert entry["bytes_by_modality"]["flow"] > 0
        assert entry["bytes"] == sum(entry["bytes_by_modality"].values())
    assert (manifest["Walk/wide.mp4"]["height"], manifest["Walk/wide.mp4"]["width"]) == (32, 48)
    # Motion and policies: 2 px per frame to the right; up-sampled 15 -> 30 fps spreads the
    # (2, 1) px steps over two frames each and never gives zero flow; a still video has zero flow.
    x = schema.dequantise_flow(flows["Walk/wide.mp4"].float())[:, 0, 6:-6, 6:-6].mean(dim=(1, 2))
    assert torch.allclose(x.median(), torch.tensor(2.0), atol=0.3)
    slow = schema.dequantise_flow(flows["Run/slow.mp4"].float())[:, :, 6:-6, 6:-6].mean(dim=(2, 3))
    assert manifest["Run/slow.mp4"]["frames"] == 24 and "repeated_frames" in manifest["Run/slow.mp4"]["flags"]
    assert torch.allclose(slow[:, 0].median(), torch.tensor(1.0), atol=0.2) and (slow[:, 0] > 0.5).all()
    assert torch.allclose(slow[:, 1].median(), torch.tensor(0.5), atol=0.2)
    still = flows["Run/still.mp4"]
    assert manifest["Run/still.mp4"]["frames"] == 1 and schema.dequantise_flow(still.float()).abs().max() < 0.1


def test_flow_does_not_depend_on_batch_or_workers(source, batch3, tmp_path):
    out3, manifest3 = batch3
    # Batches of 64 from a worker process; a pool of one pair pauses decoding at every video.
    out64 = tmp_path / "b64"
    manifest64 = run_prepare(
        source,
        out64,
        *QUICK,
        "--flow-batch",
        "64",
        "--workers",
        "1",
        "--flow-pool-pairs",
        "1",
        fmt="webdataset",
        flow="tvl1-torch",
    )
    flows3, flows64 = _flows(out3), _flows(out64)
    for name in flows3:
        assert torch.equal(flows3[name], flows64[name]), name
    where = ("shard", "part")
    assert {k: _without(v, where) for k, v in manifest3.items()} == {
        k: _without(v, where) for k, v in manifest64.items()
    }


def test_kill_and_rerun_gives_every_video_exactly_once(tmp_path):
    src = tmp_path / "src"
    for i in range(6):
        make_video(src / f"v{i}.mp4", seconds=2.0, width=32, height=32, dx=1 + i % 2, seed=i)
    out = tmp_path / "out"
    argv = prepare_argv(
        src,
        out,
        *QUICK,
        "--flow-batch",
        "8",
        "--workers",
        "1",
        "--shard-max-videos",
        "2",
        fmt="webdataset",
        flow="tvl1-torch",
    )
    manifest = out / schema.MANIFEST_FILE
    assert _run_and_kill(argv, manifest, 1, 0.2) == -signal.SIGKILL
    assert len(manifest.read_bytes().splitlines()) < 6  # the kill left videos in the flow pool
    assert prepare.main(argv) == 0
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6
    store = open_store(out)
    assert sorted(r.id for r in store.iter_records()) == sorted(ids)
    for record in store.iter_records():
        assert record.frames("flow", 0, record.meta["frames"]).shape[0] == record.meta["frames"] == 60
    assert not list(out.rglob("*.tmp"))


def test_registered_with_opencv_defaults_and_free_device_options(source, batch3, capsys):
    assert "tvl1-torch" in available_flow_methods() and is_batched_flow_method("tvl1-torch")
    assert not is_batched_flow_method("farneback")
    parser = prepare.argparse.ArgumentParser()
    prepare.add_arguments(parser)
    config = PrepareConfig.from_args(parser.parse_args(["src", "--out", "o", "--flow", "tvl1-torch"]))
    assert config.tvl1 is None  # CLI defaults: OpenCV's, recorded as such
    recorded = flow_params_meta("tvl1-torch", config.tvl1)
    assert recorded == {
        k: v for k, v in dataclasses.asdict(TVL1Params()).items() if k not in ("check_every", "median_chunk_pixels")
    }
    assert flow_params_meta("tvl1", None) is None  # OpenCV's metas stay as they were
    # The device, batch and pool do not shape the data: a resume may change them.
    out, _ = batch3
    argv = prepare_argv(source, out, *QUICK, "--flow-batch", "5", "--flow-pool-pairs", "7", flow="tvl1-torch")
    assert prepare.main(argv) == 0
    assert prepare.main(prepare_argv(source, out, *QUICK[:3], flow="tvl1-torch")) == 2  # other TV-L1 params
    assert "tvl1_scales" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ("--flow", "farneback", "--flow-batch", "8"),
        ("--flow", "farneback", "--tvl1-scales", "3"),
        ("--flow", "tvl1-torch", "--flow-batch", "0"),
        ("--flow", "tvl1-torch", "--flow-device", "nonsense"),
    ],
)
def test_bad_flow_options_are_refused(tmp_path, extra, capsys):
    argv = [str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress", *extra]
    assert prepare.main(argv) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_is_a_clear_error(tmp_path, capsys):
    argv = [str(tmp_path), "--out", str(tmp_path / "out"), "--flow", "tvl1-torch", "--flow-device", "cuda"]
    assert prepare.main(argv) == 2
    assert "CUDA is not available" in capsys.readouterr().err
