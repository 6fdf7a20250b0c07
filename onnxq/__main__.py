import sys

try:
    from onnxq.cli import main
except KeyboardInterrupt:  # Ctrl-C while the program itself is still being imported
    print("onnxq: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
