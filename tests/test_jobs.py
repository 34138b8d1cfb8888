"""tools/jobs.py and tools/job_table.py without Ray: the live table's states and ETA, the error line a failed fit
reports, and that fit's modules never import Ray (the Ray runs themselves: test_ablate.py, test_fit_many.py)."""
from __future__ import annotations

import subprocess
import sys

from dreambooth_pl.tools.job_table import JobTable, eta_seconds, job_state
from dreambooth_pl.tools.jobs import last_error


def test_states_count_attempts_of_this_session_only():
    assert job_state(None, "s") == "queued"
    assert job_state({"status": "running", "attempt": 1, "session": "s"}, "s") == "running"
    assert job_state({"status": "running", "attempt": 2, "session": "s"}, "s") == "retried"
    assert job_state({"status": "retrying", "attempt": 1, "session": "s"}, "s") == "retried"
    assert job_state({"status": "running", "attempt": 1, "session": "old"}, "s") == "queued"  # killed last time
    assert job_state({"status": "failed", "session": "old"}, "s") == "failed"


def test_eta_is_the_mean_time_of_finished_jobs_times_those_left_over_the_slots():
    states = {"a": "done", "b": "done", "c": "running", "d": "queued", "e": "failed"}
    assert eta_seconds(states, [10.0, 30.0], 2) == 2 * 20.0 / 2
    assert eta_seconds({"a": "running"}, [], 1) is None and eta_seconds({"a": "done"}, [5.0], 1) == 0.0


def test_table_shows_each_job_with_its_state_and_error():
    table = JobTable("ablate tiny", ["a", "bb"], workers=2)
    lines = table.render({"a": {"status": "done", "seconds": 12.0, "session": "s"},
                          "bb": {"status": "failed", "error": "exit code 1: error: bad (log: L)", "session": "s"}},
                         "s")
    assert lines[0].startswith("ablate tiny: 1 done, 1 failed;")
    assert lines[1].split() == ["a", "done", "12", "s"]
    assert lines[2].split()[:2] == ["bb", "failed"] and lines[2].endswith("(log: L)")


def test_last_error_is_the_error_line_not_the_hint_after_it(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("Seed set to 0\nerror: model.lora.rank must be > 0\n(set DREAMBOOTH_PL_TRACEBACK=1 for the "
                   "traceback)\n")
    assert last_error(log) == "error: model.lora.rank must be > 0"
    log.write_text("Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n")
    assert last_error(log) == "RuntimeError: CUDA out of memory"
    log.write_text("just this\n")
    assert last_error(log) == "just this"


def test_fit_and_the_job_verbs_import_no_ray_until_they_run():
    code = ("import sys, dreambooth_pl.cli, dreambooth_pl.tools.ablate, dreambooth_pl.tools.fit_many; "
            "print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_the_ray_drivers_and_their_workers_import_no_torch():
    """A grid's fixed cost on Ray is the driver's start and its worker's first import; torch and diffusers there
    cost about 3 s each (issue 25: Ray's overhead against fits run by hand). The fits import them in their own
    processes."""
    code = ("import contextlib, io, sys\nfrom dreambooth_pl.__main__ import main\nimport dreambooth_pl.tools.jobs\n"
            "for verb in ('ablate', 'fit-many'):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main([verb, '--help'])\n"
            "print('heavy:', sorted(m for m in ('torch', 'diffusers', 'transformers', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "heavy: []" in out, out[-2000:]
