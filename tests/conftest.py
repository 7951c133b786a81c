import sys
from pathlib import Path

# Test helper modules (imp_helpers, ...) live next to the tests.
sys.path.insert(0, str(Path(__file__).parent))
