"""Export a quantized checkpoint to ONNX (float and INT8 Q/DQ), check it in onnxruntime and
time it. See ``pidnet/export_onnx.py``."""
import sys

from pidnet.export_onnx import main

if __name__ == "__main__":
    sys.exit(main())
