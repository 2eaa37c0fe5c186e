"""A short seeded fuzz run of the image readers and the model loader (tests/fuzz_inputs.py;
the long campaign is bench/fuzz_campaign.py): every mutated file ends in a result or one
line naming it, within a time and memory bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = 150
PEAK_RSS_MB = 1500  # torch and the readers take ~400 MB; a decoding bomb takes gigabytes
TIME_LIMIT_S = 300  # a hang is killed and fails the test


def test_mutated_images_and_model_files_end_in_a_result_or_one_line() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    command = [sys.executable, str(HERE / "fuzz_inputs.py"), "--seed", "0", "--cases", str(CASES)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        timer = threading.Timer(TIME_LIMIT_S, process.kill)
        timer.start()
        _, status = os.waitpid(process.pid, 0)
        timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    assert process.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    report = json.loads(stdout)
    assert report["bad"] == [], report["bad"]
    counts = report["counts"]
    assert sum(counts.values()) == CASES
    for target in ("image", "model"):
        assert counts.get(f"{target} refused", 0) > 0  # the mutations do break files
    assert counts.get("image result", 0) > 0
    assert report["slowest_case_s"] < 10, report["slowest_case"]
    assert report["peak_rss_mb"] < PEAK_RSS_MB
