"""Test-suite settings: compilation of the generic fast path is off (inductor takes seconds per cell and shape on
the 2-core CI machine); tests/test_compiled.py switches it on for its few compiled tests."""

import os

os.environ.setdefault("RNNMATH_COMPILE", "0")
