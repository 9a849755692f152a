"""Post-training quantization with max, percentile, mse and entropy calibration.
See ``pidnet/calibrate.py``."""
import sys

from pidnet.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
