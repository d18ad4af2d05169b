"""Rows of dicts ↔ Parquet bytes, for trials.parquet and pareto.parquet.

Columns holding a dict or list in any row are stored as JSON strings (listed in the schema metadata
so reading decodes them): trial params differ in shape between trials and between runs, which struct
columns cannot hold, and JSON stays readable by any tool.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_JSON_COLUMNS_KEY = b"heretic_dist.json_columns"
_EMPTY = "__empty__"  # the one column of a table with no rows and no columns


def rows_to_parquet(rows: list[dict[str, Any]], where: str) -> bytes:
    """Columns are the union of keys (first-seen order); a missing key is null. `where` names the
    file in the error a row that Arrow cannot store raises."""
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(str(key), [])
    json_cols = sorted(k for k in columns if any(isinstance(r.get(k), (dict, list, tuple)) for r in rows))
    for key in columns:
        if key in json_cols:
            columns[key] = [None if r.get(key) is None else json.dumps(r.get(key), sort_keys=True) for r in rows]
        else:
            columns[key] = [r.get(key) for r in rows]
    try:
        table = pa.table(columns) if columns else pa.table({_EMPTY: pa.array([], pa.null())})
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ValueError(f"cannot store rows as Parquet in {where}: {exc}") from None
    if not columns:
        json_cols = [_EMPTY]  # marker: zero columns, zero rows
    table = table.replace_schema_metadata({_JSON_COLUMNS_KEY: json.dumps(json_cols).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


_ROWS_DECODED = False


def rows_decoded() -> bool:
    """Whether this process turned Parquet into Python rows (the CLI then exits without teardown)."""
    return _ROWS_DECODED


def parquet_to_rows(data: bytes) -> list[dict[str, Any]]:
    # One thread: with Arrow's decode thread pool started, a process that has imported optuna aborts
    # at exit about half the time ("terminate called without an active exception", exit 134; pyarrow
    # 26, optuna 5); these files are small, threads gain nothing here. It still happens, less often
    # (2026-12-02: 1-7 of 16 processes, after any to_pylist(), even without optuna): processes of the
    # CLI therefore end without interpreter teardown once rows were decoded (heretic_dist/__main__.py).
    global _ROWS_DECODED
    _ROWS_DECODED = True
    table = pq.read_table(pa.BufferReader(data), use_threads=False)
    meta = table.schema.metadata or {}
    json_cols = set(json.loads(meta.get(_JSON_COLUMNS_KEY, b"[]")))
    if _EMPTY in json_cols:
        return []
    rows = table.to_pylist()
    for row in rows:
        for key in json_cols & row.keys():
            if row[key] is not None:
                row[key] = json.loads(row[key])
    return rows
