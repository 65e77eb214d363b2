import os
import sys

# The SLURM tests import their harness module by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
