"""python -m natgrad_cuda info: print build_info()."""
import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m natgrad_cuda")
    parser.add_argument("command", choices=["info"], help="info: what this installation was built with")
    args = parser.parse_args(argv)
    if args.command == "info":
        import natgrad_cuda

        print(json.dumps(natgrad_cuda.build_info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
