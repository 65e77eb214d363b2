import os
import sys

# Distributed tests spawn ranks that import the tests' helper modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
