"""Deploy ``retrain_flow`` to a Prefect work pool, for process workers on one or many machines.

``flow.serve`` (pipelines/serve.py) runs the schedule in one long-lived process. A work pool
splits that: the server holds the deployment and its schedule, and any number of workers
(``prefect worker start --pool NAME``), here or on other machines, pick up its runs::

    prefect work-pool create cpu --type process
    python -m pipelines.deploy --pool cpu --repo /path/to/project
    prefect worker start --pool cpu        # on each machine that has the project checked out
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.flows import retrain_flow

PROJECT = Path(__file__).resolve().parents[1]


def deploy_to_pool(
    pool: str, repo: str, cron: str = "0 2 * * *", name: str = "nightly-pool"
) -> str:
    """Create (or update) the deployment ``retrain/<name>`` in work pool ``pool``; returns its id.

    The code is read from this project folder, so every worker needs the same checkout.
    """
    flow = retrain_flow.from_source(
        source=str(PROJECT), entrypoint="pipelines/flows.py:retrain_flow"
    )
    deployment_id = flow.deploy(  # type: ignore[union-attr]
        name=name,
        work_pool_name=pool,
        cron=cron,
        parameters={"repo": repo},
        build=False,
        push=False,
        print_next_steps=False,
    )
    return str(deployment_id)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pool", default="cpu", help="work pool (create it first)")
    p.add_argument("--repo", default=".", help="the project folder that dvc repro runs in")
    p.add_argument("--cron", default="0 2 * * *")
    p.add_argument("--name", default="nightly-pool")
    args = p.parse_args(argv)
    print(deploy_to_pool(args.pool, str(Path(args.repo).resolve()), args.cron, args.name))


if __name__ == "__main__":
    main()
