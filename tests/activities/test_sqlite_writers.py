"""SQLite writers within one process queue on a lock (activities.db.OneWriterAtATime), on a
real database file: every write lands, and a transaction that ends any way frees the lock."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

from activities.db import OneWriterAtATime, make_engine


def engine_with_table(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'writers.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT)"))
    return engine


def test_concurrent_writers_all_land(tmp_path: Path) -> None:
    engine = engine_with_table(tmp_path)

    def write(thread: int) -> None:
        for number in range(25):
            with engine.begin() as connection:
                connection.execute(text("SELECT count(*) FROM note")).scalar_one()
                connection.execute(
                    text("INSERT INTO note (body) VALUES (:body)"), {"body": f"{thread}-{number}"}
                )

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(8)))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM note")).scalar_one() == 200


def test_a_rolled_back_or_abandoned_write_frees_the_lock(tmp_path: Path) -> None:
    engine = engine_with_table(tmp_path)
    writers = OneWriterAtATime(timeout=2)  # a lock left held would fail the next write
    writers.install(engine)
    with engine.connect() as connection:  # rolled back
        connection.execute(text("INSERT INTO note (body) VALUES ('rolled back')"))
        connection.rollback()
    connection = engine.connect()  # abandoned: returned to the pool without an end
    connection.execute(text("INSERT INTO note (body) VALUES ('abandoned')"))
    connection.close()

    def write_elsewhere() -> None:
        with engine.begin() as other:
            other.execute(text("INSERT INTO note (body) VALUES ('kept')"))

    thread = threading.Thread(target=write_elsewhere)
    thread.start()
    thread.join()
    with engine.connect() as reader:
        rows = reader.execute(text("SELECT body FROM note")).scalars().all()
    assert rows == ["kept"]
