"""Per-layer quantization sensitivity and the smallest set of layers kept in float.
See ``pidnet/sensitivity_analysis.py``."""
import sys

from pidnet.sensitivity_analysis import main

if __name__ == "__main__":
    sys.exit(main())
