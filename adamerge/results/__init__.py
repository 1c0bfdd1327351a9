"""Run records (one JSON line per run under ``results/raw/``) and the paper-style tables built from them."""

from adamerge.results.records import (
    REQUIRED_FIELDS,
    RecordFormatError,
    ResultsDirError,
    append_record,
    check_writable,
    keep_latest,
    make_record,
    read_record_file,
    read_records,
    validate_record,
    write_record_file,
    write_text_atomic,
)
from adamerge.results.tables import Cell, Row, Table, TableError, build_table, write_tables

__all__ = [
    "REQUIRED_FIELDS",
    "Cell",
    "RecordFormatError",
    "ResultsDirError",
    "Row",
    "Table",
    "TableError",
    "append_record",
    "build_table",
    "check_writable",
    "keep_latest",
    "make_record",
    "read_record_file",
    "read_records",
    "validate_record",
    "write_record_file",
    "write_tables",
    "write_text_atomic",
]
