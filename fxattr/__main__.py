"""``python -m fxattr explain ...`` and ``python -m fxattr view DIR`` (see :mod:`fxattr.runner.cli`)."""

import sys

from fxattr.runner.cli import main

if __name__ == "__main__":
    sys.exit(main())
