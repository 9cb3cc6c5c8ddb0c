"""One rank of a loader-only run, for tests under ``accelerate launch``:

    accelerate launch ... tests/loader_ranks_helper.py STORE OUT BATCH EPOCHS DATA_CFG_JSON

Each rank iterates ``EpochLoader`` (rgb only) for EPOCHS epochs with its rank and world size from
Accelerate and writes ``OUT/rank<r>.json``: the video indices of every batch of every epoch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accelerate import PartialState  # noqa: E402

from tricoclr.data.dataset import EpochLoader, StageViews  # noqa: E402


def main(argv: list[str]) -> int:
    store, out, batch_size, epochs, data_cfg = argv[0], Path(argv[1]), int(argv[2]), int(argv[3]), json.loads(argv[4])
    state = PartialState(cpu=True)  # CPU processes with gloo (what ACCELERATE_USE_CPU asks the Accelerator)
    loader = EpochLoader(
        store,
        StageViews(both_views=("rgb",)),
        data_cfg,
        seed=0,
        batch_size=batch_size,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    batches = {}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches[epoch] = [batch["video_index"].tolist() for batch in loader]
    out.mkdir(parents=True, exist_ok=True)
    report = {"world_size": state.num_processes, "batches_per_epoch": loader.batches_per_epoch(), "batches": batches}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
