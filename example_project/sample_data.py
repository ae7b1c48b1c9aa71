"""The example's source system: a small 'shop' SQLite database, generated on demand.

Deterministic (seeded) and idempotent: a fresh clone needs no preparatory step,
and generating twice changes nothing. `advance_source` simulates the source
moving on (new and updated orders) so incremental replication has work to do.
"""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

N_CUSTOMERS = 60
N_ORDERS = 300
STATUSES = ("placed", "shipped", "delivered", "returned")
COUNTRIES = ("DE", "FR", "NL", "SE", "US")
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def ensure_source(path: Path) -> Path:
    """Create the source database at `path` unless it already exists."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(42)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(tmp) as conn:
        conn.execute(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "country TEXT NOT NULL, updated_at TEXT NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, "
            "amount REAL NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL, "
            "updated_at TEXT NOT NULL)"
        )
        conn.executemany(
            "INSERT INTO customers VALUES (?, ?, ?, ?)",
            [
                (i, f"Customer {i:03d}", rng.choice(COUNTRIES), _iso(EPOCH))
                for i in range(1, N_CUSTOMERS + 1)
            ],
        )
        rows = []
        for i in range(1, N_ORDERS + 1):
            created = EPOCH + timedelta(minutes=37 * i)
            rows.append(
                (
                    i,
                    rng.randint(1, N_CUSTOMERS),
                    round(rng.uniform(5, 250), 2),
                    rng.choice(STATUSES),
                    _iso(created),
                    _iso(created),
                )
            )
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)", rows)
    tmp.rename(path)
    return path


def advance_source(path: Path, new_orders: int = 20, updates: int = 10, seed: int = 7) -> None:
    """Append new orders and update a few existing ones (a later sync of the source)."""
    rng = random.Random(seed)
    with sqlite3.connect(path) as conn:
        (max_id,) = conn.execute("SELECT max(id) FROM orders").fetchone()
        (latest,) = conn.execute("SELECT max(updated_at) FROM orders").fetchone()
        now = datetime.strptime(latest, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        for n in range(1, new_orders + 1):
            stamp = _iso(now + timedelta(minutes=n))
            conn.execute(
                "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
                (
                    max_id + n,
                    rng.randint(1, N_CUSTOMERS),
                    round(rng.uniform(5, 250), 2),
                    "placed",
                    stamp,
                    stamp,
                ),
            )
        for n, order_id in enumerate(rng.sample(range(1, max_id + 1), updates), start=1):
            conn.execute(
                "UPDATE orders SET status = 'delivered', updated_at = ? WHERE id = ?",
                (_iso(now + timedelta(minutes=new_orders + n)), order_id),
            )
