"""The CI tools the unit tests exercise live in ci/ (not in the library): ci/campaign.py is
imported as `campaign`."""

import sys
from pathlib import Path

CI = str(Path(__file__).resolve().parents[2] / "ci")
if CI not in sys.path:
    sys.path.insert(0, CI)
