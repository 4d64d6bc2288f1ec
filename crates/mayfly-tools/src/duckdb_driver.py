# mayfly's duckdb tool. It runs as a step of the python pool (DuckDB's prebuilt Python
# package; the bundled C++ build takes hours on 2 cores), so it is contained exactly as
# python steps are. Globals from the worker: `sql`, `params`, `db_path`, `as_objects`,
# `tables`. Sets `result` to {"__mayfly_duckdb__": "ok"|"error"|"unavailable", ...}.
import base64 as _b64, datetime as _dt, decimal as _dec, math as _math, os as _os, tempfile as _tf, uuid as _uuid

_I64 = 2 ** 63


def _json(v):
    # DuckDB's Python values → JSON the way mayfly's postgres tool maps them: exact
    # decimals and out-of-range integers as text, timestamps as RFC 3339, blobs as base64.
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v if -_I64 <= v < _I64 else str(v)
    if isinstance(v, float):
        return v if _math.isfinite(v) else None
    if isinstance(v, _dec.Decimal):
        return str(v)
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return _b64.b64encode(bytes(v)).decode()
    if isinstance(v, _uuid.UUID):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    return str(v)


def _statement(con, st, params):
    cur = con.execute(st.query, params) if params is not None else con.execute(st.query)
    names = [d[0] for d in cur.description] if cur.description else []
    rows = cur.fetchall()
    if str(st.type) != "StatementType.SELECT" and names == ["Count"]:
        # DDL and DML without RETURNING: DuckDB answers with one `Count` column.
        n = rows[0][0] if rows and rows[0] else 0
        return {"status": "success", "affected_rows": n, "row_count": n}
    if as_objects:
        out = [{k: _json(x) for k, x in zip(names, r)} for r in rows]
    else:
        out = [[_json(x) for x in r] for r in rows]
    return {"status": "success", "columns": names, "rows": out, "row_count": len(out)}


def _load_tables(con):
    # Input tables arrive as JSON records; DuckDB infers their types (nested values become
    # STRUCT/LIST). Temporary: they live for this call only, even over a database file.
    for name, rows in (tables or {}).items():
        fd, path = _tf.mkstemp(suffix=".json")
        try:
            with _os.fdopen(fd, "w") as f:
                json.dump(rows, f)
            quoted = '"' + name.replace('"', '""') + '"'
            con.execute(
                "CREATE OR REPLACE TEMP TABLE " + quoted + " AS SELECT * FROM read_json(?, format = 'array')",
                [path],
            )
        finally:
            _os.unlink(path)


def _main():
    try:
        import duckdb
    except ImportError as e:
        return {"__mayfly_duckdb__": "unavailable", "message": str(e), "python": sys.executable}
    try:
        con = duckdb.connect(db_path or ":memory:")
        try:
            _load_tables(con)
            statements = con.extract_statements(sql)
            if not statements:
                return {"__mayfly_duckdb__": "error", "type": "InvalidInput", "message": "the query has no statement"}
            if params is not None and len(statements) > 1:
                return {
                    "__mayfly_duckdb__": "error",
                    "type": "InvalidInput",
                    "message": "`params` bind a single statement; the query has %d (run them as separate tasks, or without params)" % len(statements),
                }
            shapes = [_statement(con, st, params) for st in statements]
        finally:
            con.close()
    except duckdb.Error as e:
        return {"__mayfly_duckdb__": "error", "type": type(e).__name__, "message": str(e)}
    return {"__mayfly_duckdb__": "ok", "statements": shapes, "version": duckdb.__version__}


result = _main()
