import os
import sys

try:
    from onnxq.cli import main
except KeyboardInterrupt:  # Ctrl-C while the program itself is still being imported
    print("onnxq: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

code = main()
if code == 130:
    # Interrupted, outputs already rolled back. A KeyboardInterrupt that crossed a C extension's
    # own Python call while it was imported (pybind11's exec) leaves CPython's "unhandled
    # KeyboardInterrupt" flag set even though main() caught it, and the normal shutdown would
    # then kill the process with SIGINT instead of exiting 130: leave without that shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
raise SystemExit(code)
