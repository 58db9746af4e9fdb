"""Several processes opening a new spool at once all succeed (worker start-up)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from relay.spool import SpoolError, SpoolStore


def open_spool(path: str, results: multiprocessing.Queue[str]) -> None:
    try:
        SpoolStore(path).close()
    except SpoolError as exc:
        results.put(str(exc))
    else:
        results.put("ok")


def test_concurrent_first_open(tmp_path: Path) -> None:
    # relay serve's workers and delivery process open the spool together at
    # start; switching a new database to WAL used to fail one of them at
    # random with "database is locked".
    context = multiprocessing.get_context("fork")
    for round_number in range(25):
        directory = tmp_path / f"spool-{round_number}"
        results: multiprocessing.Queue[str] = context.Queue()
        processes = [context.Process(target=open_spool, args=(str(directory), results)) for _ in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)

        outcomes = [results.get(timeout=10) for _ in processes]

        assert outcomes == ["ok"] * 4
