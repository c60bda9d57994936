"""Prints the parity table of fxattr.layers against captum (max relative error per fxattr method
and captum class over every case of tests/layers/test_parity.py).

    python -m tests.layers.parity_table
"""

from __future__ import annotations

import sys

import pytest
import torch


def main() -> int:
    torch.set_num_threads(1)
    code = pytest.main(["-q", "-n", "0", "-p", "no:cacheprovider", "tests/layers/test_parity.py"])
    from tests.layers.test_parity import ERRORS
    print("\n| fxattr | captum | max relative error |\n|---|---|---|")
    for (ours, theirs), error in sorted(ERRORS.items(), key=lambda kv: kv[0][1]):
        print(f"| {ours} | {theirs} | {error:.1e} |")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
