"""``ml-release``: run the embedded stack and the demo release.

ml-release stack start|stop|status
ml-release demo            # start the stack if needed, then release the sample model
"""

from __future__ import annotations

import argparse
import json
import sys

from ml_release.stack import StackSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ml-release", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    stack = sub.add_parser("stack", help="start, stop or inspect the local stack")
    stack.add_argument("action", choices=["start", "stop", "status"])
    sub.add_parser("demo", help="run the demo release end to end on the local stack")
    args = parser.parse_args(argv)

    from ml_release import stack as stack_mod

    settings = StackSettings.from_env()
    try:
        if args.command == "stack" and args.action == "start":
            stack_mod.start(settings)
        elif args.command == "stack" and args.action == "stop":
            stack_mod.stop(settings)
        elif args.command == "stack":
            state = stack_mod.status(settings)
            print(json.dumps(state, indent=2, default=str))
            return 0 if all(state[k]["running"] for k in ("s3", "torchserve", "router", "airflow")) else 3
        else:
            from ml_release.demo import run_demo

            stack_mod.start(settings)
            return run_demo(settings)
    except Exception as exc:  # the CLI's contract: one clear line, not a traceback
        print(f"ml-release: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
