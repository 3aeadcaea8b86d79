"""`python -m bench.workers N command...`: run N copies of a worker command as one process tree.

The bench measures an engine as one process tree (CPU and RSS summed over it, stopped with one
signal to its process group), so the engine that runs several worker processes starts them
through this launcher, which waits for them all and exits with the first non-zero code.
"""

from __future__ import annotations

import subprocess
import sys


def main() -> int:
    count, command = int(sys.argv[1]), sys.argv[2:]
    children = [subprocess.Popen(command) for _ in range(count)]
    codes = [child.wait() for child in children]
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
