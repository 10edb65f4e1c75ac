"""Rows that cannot be trained on, found before they are: a row whose document is missing, null or
of the wrong type, and a JSON-lines line that is not a JSON object. Each is named by file and line
(row, for parquet); `data.skip_bad_rows=True` skips them instead, counting and reporting them.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from dms_jax.train.data import DataError

log = logging.getLogger(__name__)


def bad_rows_message(located: list[tuple[str, str]], total: int, skipped: bool = False) -> str:
    """located: (where, why) of the first few bad rows; total: how many there are."""
    shown = "; ".join(f"{where}: {why}" for where, why in located[:5]) + (" ..." if total > 5 else "")
    if skipped:
        return f"skipped {total} bad row(s) (data.skip_bad_rows=True): {shown}"
    return (f"{total} bad row(s) in the data: {shown}. Fix them, or set data.skip_bad_rows=True "
            "to skip such rows (they are counted and reported)")


def _row_problem(value, column: str, needs_text: bool) -> str | None:
    """Why a row's document value cannot be trained on (None: it can)."""
    if value is None:
        return f"no {column!r} (missing or null)"
    if needs_text and not isinstance(value, str):
        return f"{column!r} is a {type(value).__name__} ({str(value)[:40]!r}), not a string"
    return None


def _json_line_problem(line: str, data_cfg: Mapping[str, Any]) -> str | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg}, column {err.colno})"
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    column, needs_text = _used_column(list(row), data_cfg)
    if column is None:  # the row lacks the column the others carry
        column = _used_column([], data_cfg)[0] or "text"
    return _row_problem(row.get(column), column, needs_text)


def bad_json_lines(files: list[str], data_cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """[(file, line N), why] of the lines of JSON-lines files that are not JSON objects carrying
    their document (read when `datasets` could not load the files)."""
    bad = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                problem = _json_line_problem(line, data_cfg) if line.strip() else None
                if problem is not None:
                    bad.append((f"{path}, line {number}", problem))
    return bad


def json_rows_without(files: list[str], bad: list[tuple[str, str]], data_cfg: Mapping[str, Any]):
    """The JSON-lines rows of `files` without the bad lines (data.skip_bad_rows=True)."""
    import datasets
    import pyarrow as pa

    skip = {where for where, _ in bad}
    rows = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            rows.extend(json.loads(line) for number, line in enumerate(f, 1)
                        if line.strip() and f"{path}, line {number}" not in skip)
    log.warning("%s", bad_rows_message(bad, len(bad), skipped=True))
    try:
        return datasets.Dataset(pa.Table.from_pylist(rows))
    except Exception as err:  # the remaining rows disagree on another column's type
        raise DataError(f"could not read {files[:3]} after skipping {len(bad)} bad line(s): "
                        f"{type(err).__name__}: {err}") from err


def _row_location(files: list[str], fmt: str, index: int) -> str:
    """Where row `index` of the loaded dataset comes from: file and line (JSON lines, text),
    file and row (parquet), else the row number."""
    remaining = int(index)
    for path in files:
        if fmt in ("json", "text"):
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if fmt == "text" or line.strip():
                        if remaining == 0:
                            return f"{path}, line {number}"
                        remaining -= 1
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
            if remaining < rows:
                return f"{path}, row {remaining + 1}"
            remaining -= rows
        else:
            break
    return f"row {index + 1} of {files[0] if len(files) == 1 else files[:3]}"


def _used_column(columns: list[str], data_cfg: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(the column documents are read from, whether it must hold strings), as `_document_ids`
    reads them; None when it is absent (that function reports it)."""
    if "input_ids" in columns:
        return "input_ids", False
    name = (data_cfg.get("messages_field") or "messages") if data_cfg.get("chat_template") else \
        (data_cfg.get("text_field") or "text")
    return (name if name in columns else None), not data_cfg.get("chat_template")


def check_rows(ds, data_cfg: Mapping[str, Any], files: list[str], fmt: str):
    """Every row must carry its document: a row whose text is missing / null, or not a string,
    is an error naming the file and the line, or, with data.skip_bad_rows=True, dropped with a
    count and a warning (never trained as an empty document)."""
    import datasets

    column, needs_text = _used_column(list(ds.column_names), data_cfg)
    if column is None:
        return ds
    feature = ds.features[column]
    is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if ds.data.column(column).null_count == 0 and (is_text or not needs_text):
        return ds  # the common case: one look at the arrow column, no pass over the rows

    def problem(value):
        return _row_problem(value, column, needs_text)

    bad_index = [i for i, value in enumerate(ds[column]) if problem(value) is not None]
    if not bad_index:
        return ds
    located = [(_row_location(files, fmt, i), problem(ds[i][column])) for i in bad_index[:5]]
    if not data_cfg.get("skip_bad_rows"):
        raise DataError(bad_rows_message(located, len(bad_index)))
    log.warning("%s", bad_rows_message(located, len(bad_index), skipped=True))
    bad_set = set(bad_index)
    kept = [i for i in range(len(ds)) if i not in bad_set]
    if not kept:
        raise DataError(f"every row of {files[:3]} is bad ({bad_rows_message(located, len(bad_index))}): "
                        "nothing to train on")
    return ds.select(kept)
