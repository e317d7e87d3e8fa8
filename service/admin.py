"""Administration CLI: `python -m service.admin create-token --tenant NAME` prints a new API token once."""

from __future__ import annotations

import argparse
import sys

from service import crud
from service.db import make_engine, make_sessionmaker, run_migrations
from service.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="service.admin")
    sub = parser.add_subparsers(dest="cmd", required=True)
    tok = sub.add_parser("create-token", help="create a bearer token for a tenant (only its hash is stored)")
    tok.add_argument("--tenant", required=True)
    args = parser.parse_args(argv)
    url = get_settings().DATABASE_URL
    run_migrations(url)
    with make_sessionmaker(make_engine(url))() as session:
        try:
            token = crud.create_token(session, args.tenant)
        except ValueError as exc:
            sys.stderr.write(f"service.admin: error: {exc}\n")
            return 2
        sys.stdout.write(token + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
