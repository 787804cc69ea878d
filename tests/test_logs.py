"""genray/logs.py without Ray: which training lines reach the terminal."""
from __future__ import annotations

from genray.logs import DETAIL_PREFIX, OWN_PREFIX, EpochLines


def test_epoch_lines_show_first_and_last_and_keep_the_rest_for_the_log():
    lines = EpochLines(epochs=20, start_epoch=4, seconds=3600)  # a resumed run; no line is ever "due" by time
    out = [lines.line(epoch, "loss=0.1") for epoch in range(5, 21)]
    shown = [line for line in out if line.startswith(OWN_PREFIX)]
    assert shown[0].startswith("[genray] epoch 5/20 loss=0.1, eta ") and shown[1].startswith("[genray] epoch 20/20")
    assert len(shown) == 2 and all(line.startswith(DETAIL_PREFIX) for line in out[1:-1])
    assert out[-1].endswith("eta 0s")
    every = EpochLines(epochs=3, start_epoch=0, seconds=0)  # slow epochs: each one is shown
    assert all(every.line(epoch, "x").startswith(OWN_PREFIX) for epoch in (1, 2, 3))


def test_the_default_log_folder_cannot_shadow_the_package(monkeypatch, tmp_path):
    """A folder named `genray` in a working directory (it was <tmp>/genray/logs/) is imported as a namespace
    package by Ray workers started from there: `cd /tmp && genray demo` failed with `cannot import name ... from
    'genray.logs' (unknown location)`. The default folder has another name."""
    import genray.logs as logs

    monkeypatch.delenv("GENRAY_LOG_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(logs.tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(logs, "_log_path", None)
    path = logs.log_path()
    assert path.parent.parent == tmp_path and "genray" not in [p.name for p in path.parents]
