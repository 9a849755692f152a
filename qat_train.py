"""Train a model: the float baseline (``--mode float``). See ``pidnet/train.py``."""
import sys

from pidnet.train import main

if __name__ == "__main__":
    sys.exit(main())
