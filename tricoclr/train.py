"""Entry point: ``accelerate launch tricoclr/train.py --config CONFIG [dotted.key=value ...]``.

Also runs as ``python tricoclr/train.py`` (one process) and as ``tricoclr train``. Kept thin on
purpose: run as a script, this folder is first on sys.path, so all logic lives in modules that
are imported through the ``tricoclr`` package.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the package importable and stop this folder shadowing other modules.
    here = str(Path(__file__).resolve().parent)
    sys.path = [p for p in sys.path if p != here]
    sys.path.insert(0, str(Path(here).parent))

# Preemption handlers first, before the seconds of importing torch: a SLURM warning that arrives
# during start-up must ask for a checkpoint, not kill the process (SIGUSR1's default action).
from tricoclr import preemption  # noqa: E402

preemption.install()

from tricoclr.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
