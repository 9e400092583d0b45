"""Suite-wide settings: where the golden captures from real peers live.

shared/ sits beside the checkout (a developer's /work/shared, CI's copy beside its clone). A missing capture
is a failure, not a skip: the golden tests are the interop evidence.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("UDPFLANNEL_TESTDATA", str(REPO.parent / "shared" / "testdata"))
