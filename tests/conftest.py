import os
import sys

# tests/reference.py (the oracle) and tests/_helpers.py import as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
