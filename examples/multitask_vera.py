"""VeRA-like across tasks (multitask_vera.yaml): frozen random A and B shared by every layer and task, each task
training only its vectors u and v; the same run as multitask_tl6.py. Needs only the core.

    python examples/multitask_vera.py [--steps 150]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import multitask_tl6  # examples/ is not a package


def main(argv: list[str] | None = None) -> dict:
    return multitask_tl6.main([*(sys.argv[1:] if argv is None else argv), "--spec", str(Path(__file__).with_suffix(".yaml"))])


if __name__ == "__main__":
    main()
