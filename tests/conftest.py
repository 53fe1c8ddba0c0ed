import os
import sys
from pathlib import Path

# Ray 2.60 turns on token auth once ~/.ray/auth_token exists; local test clusters run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).parent))
