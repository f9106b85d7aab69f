"""Built-in capability handlers that do real work.

- ``database.query``: read-only SQL against a SQLite database the agent creates
  (tables ``users``, ``products``, ``orders``, seeded deterministically so every
  agent holds the same data, like replicas).
- ``ml.inference``: a softmax-regression classifier in numpy, trained at start
  on synthetic iris-like data; args are four feature values.
- ``compute``: ``primes N``, ``fib N``, ``sha256 TEXT [ROUNDS]``, ``matmul N``,
  ``sum X...``, ``wait MS``.
- ``echo`` (and ``test.command``, the guide's name): returns its args.

A handler takes ``(args, ctx)`` and returns something JSON-serialisable, or
raises ``HandlerError`` (a failed execution, reported in a signed receipt).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


class HandlerError(Exception):
    """The command ran and failed; the message goes into the receipt."""


class InvalidArguments(HandlerError):
    """The arguments are wrong before anything runs: the caller's mistake,
    not the agent's. The agent answers INVALID_ARGUMENT (field "args")
    instead of a receipt, so the cluster does not count it against the
    agent's trust or reliability."""


@dataclass
class ExecutionContext:
    agent_id: str
    command_id: str
    session_id: str
    capability: str
    # time.monotonic() by which the caller wants an answer, or None.
    deadline: float | None
    data_dir: str

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)


Handler = Callable[[list[str], ExecutionContext], Awaitable[Any]]

MAX_ROWS = 1000


# --- database.query --------------------------------------------------------------

_SCHEMA = [
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL UNIQUE, "
    "active INTEGER NOT NULL, country TEXT NOT NULL, created_at TEXT NOT NULL)",
    "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, price REAL NOT NULL)",
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id), "
    "product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL, created_at TEXT NOT NULL)",
    "CREATE INDEX orders_user ON orders(user_id)",
]
_FIRST = [
    "ada",
    "alan",
    "grace",
    "edsger",
    "barbara",
    "donald",
    "frances",
    "ken",
    "leslie",
    "margaret",
    "niklaus",
    "radia",
]
_LAST = [
    "lovelace",
    "turing",
    "hopper",
    "dijkstra",
    "liskov",
    "knuth",
    "allen",
    "thompson",
    "lamport",
    "hamilton",
    "wirth",
    "perlman",
]
_COUNTRIES = ["DE", "FR", "GB", "IN", "JP", "NL", "SE", "US"]
_CATEGORIES = ["compute", "storage", "network", "support"]

# sqlite3 authorizer action codes a read-only query may use.
_ALLOWED_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}


def create_sample_database(path: str) -> None:
    """Creates the agent's database once (deterministic content)."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    rng = random.Random(2028)
    conn = sqlite3.connect(tmp)
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        users = []
        for i in range(1, 201):
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            users.append(
                (
                    i,
                    f"{first} {last}",
                    f"{first}.{last}.{i}@example.com",
                    int(rng.random() < 0.7),
                    rng.choice(_COUNTRIES),
                    f"2027-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                )
            )
        conn.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", users)
        products = [
            (
                i,
                f"{rng.choice(_CATEGORIES)}-plan-{i}",
                rng.choice(_CATEGORIES),
                round(rng.uniform(5, 500), 2),
            )
            for i in range(1, 51)
        ]
        conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", products)
        orders = [
            (
                i,
                rng.randint(1, 200),
                rng.randint(1, 50),
                rng.randint(1, 5),
                f"2028-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            )
            for i in range(1, 1001)
        ]
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", orders)
        conn.commit()
    finally:
        conn.close()
    os.replace(tmp, path)


def _authorize(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def run_query(path: str, sql: str, deadline: float | None) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.set_authorizer(_authorize)
        if deadline is not None:
            conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            cursor = conn.execute(sql)
            rows = cursor.fetchmany(MAX_ROWS + 1)
        except sqlite3.DatabaseError as exc:
            raise HandlerError(f"query failed: {exc}") from None
        except sqlite3.Warning as exc:
            raise InvalidArguments(f"query rejected: {exc}") from None
        columns = [d[0] for d in cursor.description or ()]
        return {
            "columns": columns,
            "rows": [list(r) for r in rows[:MAX_ROWS]],
            "row_count": min(len(rows), MAX_ROWS),
            "truncated": len(rows) > MAX_ROWS,
        }
    finally:
        conn.close()


def database_query(db_path: str) -> Handler:
    create_sample_database(db_path)

    async def handle(args: list[str], ctx: ExecutionContext) -> Any:
        sql = " ".join(args).strip()
        if not sql:
            raise InvalidArguments("database.query needs an SQL statement")
        return await asyncio.to_thread(run_query, db_path, sql, ctx.deadline)

    return handle


# --- ml.inference ----------------------------------------------------------------

IRIS_CLASSES = ["setosa", "versicolor", "virginica"]
_IRIS_MEANS = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
_IRIS_STD = np.array([[0.35, 0.38, 0.17, 0.1], [0.52, 0.31, 0.47, 0.2], [0.64, 0.32, 0.55, 0.27]])


class SoftmaxModel:
    """Multinomial logistic regression trained by gradient descent."""

    def __init__(
        self, seed: int = 2028, samples_per_class: int = 200, steps: int = 300, lr: float = 0.5
    ) -> None:
        rng = np.random.default_rng(seed)
        x = np.concatenate(
            [
                rng.normal(_IRIS_MEANS[c], _IRIS_STD[c], size=(samples_per_class, 4))
                for c in range(3)
            ]
        )
        y = np.repeat(np.arange(3), samples_per_class)
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0)
        xs = (x - self.mean) / self.std
        onehot = np.eye(3)[y]
        self.w = np.zeros((4, 3))
        self.b = np.zeros(3)
        for _ in range(steps):
            p = self._softmax(xs @ self.w + self.b)
            grad = (p - onehot) / len(xs)
            self.w -= lr * xs.T @ grad
            self.b -= lr * grad.sum(axis=0)
        self.train_accuracy = float((self.predict_proba(x).argmax(axis=1) == y).mean())

    @staticmethod
    def _softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self._softmax(((x - self.mean) / self.std) @ self.w + self.b)


def ml_inference() -> Handler:
    model = SoftmaxModel()

    async def handle(args: list[str], ctx: ExecutionContext) -> Any:
        if len(args) != 4:
            raise InvalidArguments(
                "ml.inference needs 4 feature values: sepal_length sepal_width petal_length petal_width"
            )
        try:
            features = np.array([[float(a) for a in args]])
        except ValueError:
            raise InvalidArguments("ml.inference features must be numbers") from None
        if not np.isfinite(features).all():
            raise InvalidArguments("ml.inference features must be finite")
        probs = model.predict_proba(features)[0]
        best = int(probs.argmax())
        return {
            "class": IRIS_CLASSES[best],
            "probabilities": {
                c: round(float(p), 6) for c, p in zip(IRIS_CLASSES, probs, strict=True)
            },
        }

    return handle


# --- compute ---------------------------------------------------------------------

LIMITS = {
    "primes": 50_000_000,
    "fib": 20_000,
    "sha256_rounds": 2_000_000,
    "matmul": 1500,
    "wait_ms": 600_000,
}


def count_primes(n: int) -> int:
    if n < 2:
        return 0
    sieve = np.ones(n + 1, dtype=bool)
    sieve[:2] = False
    for p in range(2, math.isqrt(n) + 1):
        if sieve[p]:
            sieve[p * p :: p] = False
    return int(sieve.sum())


def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _int_arg(args: list[str], i: int, name: str, lo: int, hi: int) -> int:
    try:
        value = int(args[i])
    except (IndexError, ValueError):
        raise InvalidArguments(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise InvalidArguments(f"{name} must be within {lo}..{hi}")
    return value


def compute() -> Handler:
    async def handle(args: list[str], ctx: ExecutionContext) -> Any:
        if not args:
            raise InvalidArguments(
                "compute needs an operation: primes N | fib N | sha256 TEXT [ROUNDS] | matmul N | sum X... | wait MS"
            )
        op, rest = args[0], args[1:]
        if op == "primes":
            n = _int_arg(rest, 0, "N", 0, LIMITS["primes"])
            return {"op": op, "n": n, "primes": await asyncio.to_thread(count_primes, n)}
        if op == "fib":
            n = _int_arg(rest, 0, "N", 0, LIMITS["fib"])
            return {"op": op, "n": n, "value": str(await asyncio.to_thread(fibonacci, n))}
        if op == "sha256":
            if not rest:
                raise InvalidArguments("sha256 needs TEXT")
            rounds = _int_arg(rest, 1, "ROUNDS", 1, LIMITS["sha256_rounds"]) if len(rest) > 1 else 1

            def digest() -> str:
                data = rest[0].encode()
                for _ in range(rounds):
                    data = hashlib.sha256(data).digest()
                return data.hex()

            return {"op": op, "rounds": rounds, "digest": await asyncio.to_thread(digest)}
        if op == "matmul":
            n = _int_arg(rest, 0, "N", 1, LIMITS["matmul"])

            def trace() -> float:
                rng = np.random.default_rng(n)
                a = rng.random((n, n))
                return float(np.trace(a @ a.T))

            return {"op": op, "n": n, "trace": await asyncio.to_thread(trace)}
        if op == "sum":
            try:
                values = [float(v) for v in rest]
            except ValueError:
                raise InvalidArguments("sum takes numbers") from None
            total = math.fsum(values)
            if not math.isfinite(total):
                raise HandlerError("sum is not finite")
            return {"op": op, "sum": total}
        if op == "wait":
            ms = _int_arg(rest, 0, "MS", 0, LIMITS["wait_ms"])
            await asyncio.sleep(ms / 1000)
            return {"op": op, "waited_ms": ms}
        raise InvalidArguments(f"unknown compute operation {op!r}")

    return handle


async def echo(args: list[str], ctx: ExecutionContext) -> Any:
    return {"args": args}


def builtin_handlers(data_dir: str) -> dict[str, Callable[[], Handler]]:
    """Factories for the built-in capabilities, created only when held."""
    return {
        "database.query": lambda: database_query(os.path.join(data_dir, "data.db")),
        "ml.inference": ml_inference,
        "compute": compute,
        "echo": lambda: echo,
        "test.command": lambda: echo,
    }
