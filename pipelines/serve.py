"""Serve ``retrain_flow`` on a cron schedule (nightly by default) against the Prefect API in
``PREFECT_API_URL``; see README. ``python -m pipelines.serve --cron "0 2 * * *" --repo .``"""

from __future__ import annotations

import argparse

from pipelines.flows import retrain_flow


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cron", default="0 2 * * *", help="schedule (default: 02:00 every night)")
    p.add_argument("--repo", default=".", help="the project folder that dvc repro runs in")
    p.add_argument("--name", default="nightly", help="deployment name")
    args = p.parse_args(argv)
    retrain_flow.serve(name=args.name, cron=args.cron, parameters={"repo": args.repo})


if __name__ == "__main__":
    main()
