import os
import sys

# Test support modules (agentproc, backends, ...) live beside the tests.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
