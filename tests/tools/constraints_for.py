"""Print the lines of a constraints file for the packages NOT installed in this interpreter's environment.

Used for the vLLM venv: vLLM's own versions stay as vLLM's installation chose them; everything this project adds
on top (test tools, the sidecar's extras) gets the exact versions of constraints.txt.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(path: str) -> None:
    installed = {_norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0]
        if _norm(name) not in installed:
            print(line)


if __name__ == "__main__":
    main(sys.argv[1])
