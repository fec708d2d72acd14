"""``quantize`` as a script file, for launchers that take one (torchrun)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402

cli.main()
