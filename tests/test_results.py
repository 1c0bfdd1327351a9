"""Run records and the tables built from them: exact numbers, ordering, safety under concurrency."""

from __future__ import annotations

import csv
import errno
import io
import json
import multiprocessing
import os
from pathlib import Path

import pytest

import adamerge  # noqa: F401  (package import first, as everywhere in adamerge)
from adamerge.results import records as records_module
from adamerge.results.records import (
    RecordFormatError,
    ResultsDirError,
    append_record,
    check_writable,
    keep_latest,
    make_record,
    read_records,
    write_text_atomic,
)
from adamerge.results.tables import TableError, build_table, main, write_tables

TASKS = ["SUN397", "Cars", "MNIST"]


def record(label="Task Arithmetic (λ=0.3)", seed=0, accuracy=None, time=None, tasks=None, **fields):
    accuracy = accuracy or {"SUN397": 0.6, "Cars": 0.5, "MNIST": 0.9}
    return make_record(
        experiment=fields.pop("experiment", "demo"),
        method=fields.pop("method", "task_arithmetic"),
        label=label,
        model=fields.pop("model", "ViT-B-32"),
        seed=seed,
        accuracy=accuracy,
        tasks=tasks,
        time=time,
        **fields,
    )


# --- records --------------------------------------------------------------------------------


def test_record_round_trips_through_jsonl(tmp_path):
    original = record(extra={"lambda": 0.3, "coefficients": Path("coeffs.safetensors")}, config={"lr": 1e-3})
    path = tmp_path / "raw" / "demo.jsonl"
    append_record(path, original)
    (loaded,) = read_records([path])
    assert loaded == {**original, "extra": {"lambda": 0.3, "coefficients": "coeffs.safetensors"}}
    assert loaded["label"] == "Task Arithmetic (λ=0.3)"
    assert loaded["tasks"] == TASKS
    assert loaded["avg"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert len(loaded["run_id"]) == 32


def test_invalid_record_is_refused_before_writing(tmp_path):
    path = tmp_path / "demo.jsonl"
    bad = record()
    bad["accuracy"]["Cars"] = 85.0  # percent instead of a fraction
    with pytest.raises(RecordFormatError, match="'Cars'.*fraction"):
        append_record(path, bad)
    assert not path.exists()


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "demo.jsonl"
    append_record(path, record(seed=0))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"run_id": "truncated')
        handle.write("\n")
    with pytest.raises(RecordFormatError) as error:
        read_records([tmp_path])
    assert f"{path}:2" in str(error.value)


def test_record_missing_a_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "demo.jsonl"
    incomplete = record()
    del incomplete["seed"]
    path.write_text("\n" + json.dumps(incomplete) + "\n", encoding="utf-8")
    with pytest.raises(RecordFormatError, match=r"demo\.jsonl:2: .*'seed'"):
        read_records(path)


def test_read_records_walks_directories_in_sorted_order(tmp_path):
    append_record(tmp_path / "b.jsonl", record(label="B"))
    append_record(tmp_path / "sub" / "a.jsonl", record(label="A"))
    (tmp_path / "notes.txt").write_text("not a record\n")
    assert [r["label"] for r in read_records(tmp_path)] == ["B", "A"]  # "b.jsonl" < "sub/a.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_records([tmp_path / "missing.jsonl"])


def _append_many(path: str, worker: int, start, count: int) -> None:
    start.wait()  # all workers begin together, to maximise contention
    for index in range(count):
        append_record(path, record(seed=worker * 1000 + index, extra={"padding": "x" * 20_000}))


def test_parallel_appends_never_interleave_or_lose_lines(tmp_path):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    path = tmp_path / "raw" / "parallel.jsonl"
    start = context.Barrier(4)
    workers = [context.Process(target=_append_many, args=(str(path), w, start, 50)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200
    seeds = sorted(json.loads(line)["seed"] for line in lines)  # every line is whole, valid JSON
    assert seeds == sorted(w * 1000 + i for w in range(4) for i in range(50))


def test_unwritable_results_dir_raises_results_dir_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file, so nothing can be created beneath it")
    results_dir = blocker / "raw"
    with pytest.raises(ResultsDirError, match="paths.results_dir") as error:
        check_writable(results_dir)
    assert str(results_dir) in str(error.value)
    with pytest.raises(ResultsDirError, match=str(results_dir)):
        append_record(results_dir / "demo.jsonl", record())


def test_full_disk_is_caught_by_check_writable(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(records_module.os, "fsync", no_space)
    with pytest.raises(ResultsDirError, match="No space left"):
        check_writable(tmp_path / "raw")
    monkeypatch.undo()
    assert check_writable(tmp_path / "raw") == (tmp_path / "raw").resolve()
    assert list((tmp_path / "raw").iterdir()) == []  # the probe file is gone


def test_write_text_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "table.md"
    write_text_atomic(target, "old\n")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.md"]


def test_newest_record_wins_per_label_and_seed():
    old = record(seed=0, time="2024-01-01T00:00:00+00:00", accuracy={"SUN397": 0.1, "Cars": 0.1, "MNIST": 0.1})
    other_seed = record(seed=1, time="2024-01-01T00:00:00+00:00")
    new = record(seed=0, time="2024-01-01T01:30:00+01:00", accuracy={"SUN397": 0.2, "Cars": 0.2, "MNIST": 0.2})
    older_later_in_file = record(seed=0, time="2023-12-31T23:59:00+00:00")
    kept = keep_latest([old, other_seed, new, older_later_in_file])
    assert [(r["seed"], r["run_id"]) for r in kept] == [(0, new["run_id"]), (1, other_seed["run_id"])]


# --- tables ---------------------------------------------------------------------------------


def test_two_seeds_show_mean_and_sample_std_in_percent():
    runs = [
        record(seed=0, accuracy={"SUN397": 0.9, "Cars": 0.5, "MNIST": 1.0}),
        record(seed=1, accuracy={"SUN397": 0.8, "Cars": 0.5, "MNIST": 1.0}),
    ]
    (row,) = build_table(runs).rows
    assert row.cells["SUN397"].text() == "85.0 ± 7.1"  # sample std: sqrt(((90-85)²+(80-85)²)/1)
    assert row.cells["Cars"].text() == "50.0 ± 0.0"
    assert row.n_seeds == 2
    # Avg: per-seed means are 80.0 and 76.67 -> mean 78.33, sample std 2.357
    assert row.avg.text() == "78.3 ± 2.4"
    assert row.avg.mean == pytest.approx(235 / 3)


def test_single_seed_shows_no_std():
    (row,) = build_table([record(accuracy={"SUN397": 0.6543, "Cars": 0.5, "MNIST": 0.9})]).rows
    assert [row.cells[t].text() for t in TASKS] == ["65.4", "50.0", "90.0"]
    assert row.avg.text() == "68.5"
    assert row.cells["SUN397"].std is None


def test_task_and_row_order():
    runs = [record(label="TIES"), record(label="Task Arithmetic"), record(label="AdaMerging")]
    table = build_table(runs, task_order=["MNIST", "SUN397"], row_order=["AdaMerging", "Not run", "TIES"])
    assert table.tasks == ["MNIST", "SUN397"]
    assert [r.label for r in table.rows] == ["AdaMerging", "TIES", "Task Arithmetic"]
    assert table.rows[0].avg.text() == "75.0"  # Avg follows the columns shown: (90 + 60) / 2
    assert [r.label for r in build_table(runs).rows] == ["TIES", "Task Arithmetic", "AdaMerging"]


def test_records_of_one_label_must_share_their_task_set():
    two_tasks = record(seed=1, accuracy={"SUN397": 0.5, "Cars": 0.5})
    with pytest.raises(TableError, match="disagree on the task set"):
        build_table([record(seed=0), two_tasks])


def test_other_task_sets_or_models_are_refused():
    with pytest.raises(TableError, match="no accuracy for column"):
        build_table([record(label="A"), record(label="B", accuracy={"SUN397": 0.5, "Cars": 0.5})])
    with pytest.raises(TableError, match="mix models"):
        build_table([record(seed=0), record(seed=1, model="ViT-L-14")])


def test_reference_rows_follow_their_label():
    runs = [record(label="Task Arithmetic"), record(label="TIES")]
    reference = {"Task Arithmetic": {"SUN397": 55.2, "Cars": 54.9, "MNIST": 97.0}, "TIES": {"SUN397": 65.0}}
    table = build_table(runs, reference=reference)
    assert [r.label for r in table.rows] == ["Task Arithmetic", "Task Arithmetic (paper)", "TIES", "TIES (paper)"]
    paper = table.rows[1]
    assert [paper.cells[t].text() for t in TASKS] == ["55.2", "54.9", "97.0"]
    assert paper.avg.text() == "69.0"  # (55.2 + 54.9 + 97.0) / 3 = 69.03
    assert table.rows[3].cells["Cars"].text() == "–" and table.rows[3].avg.text() == "–"


def test_reference_rows_from_several_publications_keep_their_order_and_names():
    runs = [record(label="Task Arithmetic")]
    reference = {"Task Arithmetic": {"WEMoE Tab. 4": {"SUN397": 63.4, "Cars": 62.3, "MNIST": 77.3},
                                     "FusionBench": {"SUN397": 64.3, "Avg": 60.0}}}
    table = build_table(runs, reference=reference)
    assert [r.label for r in table.rows] == ["Task Arithmetic", "Task Arithmetic (WEMoE Tab. 4)",
                                             "Task Arithmetic (FusionBench)"]
    assert [table.rows[1].cells[t].text() for t in TASKS] == ["63.4", "62.3", "77.3"]
    assert table.rows[1].is_reference and table.rows[2].is_reference
    assert table.rows[2].cells["SUN397"].text() == "64.3" and table.rows[2].avg.text() == "60.0"
    with pytest.raises(TableError, match="mixes numbers with per-source entries"):
        build_table(runs, reference={"Task Arithmetic": {"SUN397": 63.4, "FusionBench": {"SUN397": 64.3}}})


def test_markdown_and_csv_rendering():
    runs = [record(seed=0, accuracy={"SUN397": 0.9, "Cars": 0.5, "MNIST": 1.0}),
            record(seed=1, accuracy={"SUN397": 0.8, "Cars": 0.5, "MNIST": 1.0})]
    table = build_table(runs, reference={"Task Arithmetic (λ=0.3)": {"SUN397": 55.2, "Cars": 54.9, "MNIST": 97.0}})
    lines = table.to_markdown().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["Method", *TASKS, "Avg"]
    separator = [c.strip() for c in lines[1].strip("|").split("|")]
    assert separator[0].startswith(":-") and all(c.endswith("-:") and set(c) == {"-", ":"} for c in separator[1:])
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "Task Arithmetic (λ=0.3)", "85.0 ± 7.1", "50.0 ± 0.0", "100.0 ± 0.0", "78.3 ± 2.4"]
    assert len({len(line) for line in lines}) == 1  # padded: columns line up in plain text

    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert list(rows[0]) == ["method", "SUN397", "SUN397_std", "Cars", "Cars_std", "MNIST", "MNIST_std",
                             "avg", "avg_std", "n_seeds"]
    assert float(rows[0]["SUN397"]) == pytest.approx(85.0)
    assert float(rows[0]["SUN397_std"]) == pytest.approx(7.071068)
    assert float(rows[0]["avg"]) == pytest.approx(235 / 3, abs=1e-6) and rows[0]["n_seeds"] == "2"
    assert rows[1]["method"] == "Task Arithmetic (λ=0.3) (paper)"
    assert rows[1]["SUN397_std"] == "" and rows[1]["n_seeds"] == ""


def test_write_tables_writes_md_and_csv(tmp_path):
    table = build_table([record()])
    md, csv_path = write_tables(table, tmp_path / "tables" / "demo")
    assert (md.name, csv_path.name) == ("demo.md", "demo.csv")
    assert md.read_text(encoding="utf-8") == table.to_markdown()
    assert csv_path.read_text(encoding="utf-8") == table.to_csv()


# --- command line ---------------------------------------------------------------------------


def test_cli_writes_tables_with_newest_record_per_seed(tmp_path, capsys):
    raw = tmp_path / "raw" / "demo.jsonl"
    append_record(raw, record(label="TA", seed=0, time="2024-01-01T00:00:00+00:00",
                              accuracy={"SUN397": 0.1, "Cars": 0.1, "MNIST": 0.1}))
    append_record(raw, record(label="TA", seed=0, time="2024-01-02T00:00:00+00:00"))  # the re-run
    append_record(raw, record(label="TIES", seed=0, experiment="other"))

    assert main([str(raw), "--out", str(tmp_path / "demo"), "--experiment", "demo"]) == 0
    printed = capsys.readouterr().out
    markdown = (tmp_path / "demo.md").read_text(encoding="utf-8")
    assert printed == markdown  # plain Markdown when stdout is not a terminal
    assert "| TA " in markdown and "TIES" not in markdown
    (row,) = csv.DictReader(io.StringIO((tmp_path / "demo.csv").read_text(encoding="utf-8")))
    assert (row["method"], float(row["SUN397"]), row["n_seeds"]) == ("TA", 60.0, "1")

    assert main([str(raw), "--out", str(tmp_path / "all"), "--experiment", "demo", "--all-records"]) == 0
    (row,) = csv.DictReader(io.StringIO((tmp_path / "all.csv").read_text(encoding="utf-8")))
    assert (float(row["SUN397"]), row["n_seeds"]) == (pytest.approx(35.0), "2")


def test_cli_reports_errors_instead_of_a_traceback(tmp_path, capsys):
    raw = tmp_path / "demo.jsonl"
    append_record(raw, record())
    assert main([str(raw), "--experiment", "nope"]) == 1
    error = capsys.readouterr().err
    assert "no records for experiment 'nope'" in error and "demo" in error
    raw.write_text("not json\n")
    assert main([str(raw)]) == 1
    assert f"{raw}:1" in capsys.readouterr().err


def test_unseen_tasks_get_their_own_columns_after_the_average():
    from adamerge.results.records import make_record
    from adamerge.results.tables import build_table

    recs = [make_record(experiment="g", method="ta", label="TA", model="m", seed=s, accuracy={"a": 0.5, "b": 0.7},
                        extra={"unseen_accuracy": {"u": 0.2 + 0.1 * s}}) for s in (0, 1)]
    table = build_table(recs, reference={"TA": {"a": 50.0, "u (unseen)": 30.0, "Avg (unseen)": 30.0}})
    assert table.header == ["Method", "a", "b", "Avg", "u (unseen)", "Avg (unseen)"]
    measured, paper = table.cell_texts()
    assert measured[-2:] == ["25.0 ± 7.1", "25.0 ± 7.1"] and paper[-2:] == ["30.0", "30.0"]
    assert "unseen:u" in table.to_csv().splitlines()[0]


def test_a_run_with_several_rows_gives_the_sweep_table_all_of_them(tmp_path):
    """The LLM pipeline's run folder lists its five rows in records.json; a sweep's table reads every one of them,
    and a damaged list is named, never skipped."""
    from adamerge.results.hydra_callback import RECORD_FILE, RECORDS_FILE, sweep_records
    from adamerge.results.records import RecordFormatError, write_record_file

    sweep = tmp_path / "multirun" / "llm_demo" / "stamp"
    rows = [record(label="Base", time="2026-01-01T00:00:00+00:00"), record(label="SFT", time="2026-01-01T00:00:01+00:00")]
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / RECORDS_FILE).write_text(json.dumps(rows))
    write_record_file(sweep / "0" / RECORD_FILE, rows[-1])
    (sweep / "1").mkdir()
    write_record_file(sweep / "1" / RECORD_FILE, record(label="Other", time="2026-01-01T00:00:02+00:00"))
    assert [r["label"] for r in sweep_records(sweep)] == ["Base", "SFT", "Other"]
    (sweep / "0" / RECORDS_FILE).write_text(json.dumps([{"label": "broken"}]))
    with pytest.raises(RecordFormatError, match="records.json"):
        sweep_records(sweep)
