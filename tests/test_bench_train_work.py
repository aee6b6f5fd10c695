"""`benchmarks.bench_train` replaces only a --work folder of its own: it deleted whatever folder it was given."""

from __future__ import annotations

import sys

import pytest

from benchmarks import bench_train


def test_a_work_folder_of_the_users_is_never_deleted(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", object())  # the optional extra, present or not, is not the subject
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    monkeypatch.setattr(sys, "argv", ["bench_train", "--work", str(precious), "--out", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="holds files bench-train did not write"):
        bench_train.main()
    assert (precious / "notes.txt").read_text() == "keep me"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / bench_train.WORK_MARK).write_text("")
    (ours / "old-run.log").write_text("an earlier bench-train's")
    monkeypatch.setattr(sys, "argv", ["bench_train", "--work", str(ours), "--out", str(tmp_path / "b.json")])
    monkeypatch.setattr(bench_train, "_pairs", lambda: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        bench_train.main()
    assert not (ours / "old-run.log").exists() and (ours / bench_train.WORK_MARK).is_file()  # replaced
