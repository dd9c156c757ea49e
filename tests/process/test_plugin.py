"""mpidp.testing, the pytest plugin for users' MPI tests, driven through real mpiexec jobs.

Each test copies a file from plugin_cases/ into a fresh folder as test_case.py and runs
pytest on it there (its own pytest.ini, so this project's setup.cfg does not apply), under
mpiexec or plain, with a timeout that kills the process group; it asserts the report, the
exit code and the seconds. Children load only this plugin (PYTEST_DISABLE_PLUGIN_AUTOLOAD),
which saves about a second per rank.
"""
import json
import shutil
from pathlib import Path

import pytest

from _mpirun import python, run

pytestmark = pytest.mark.spawns

CASES = Path(__file__).with_name("plugin_cases")
ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
       "COLUMNS": "200"}  # summary lines are cut to the terminal width


def pytest_job(tmp_path, case, *args, np=None, ini="", timeout=60):
    """Run pytest on plugin_cases/<case>.py (under ``mpiexec -n np`` if np); (rc, out, seconds)."""
    (tmp_path / "pytest.ini").write_text(f"[pytest]\n{ini}\n")
    shutil.copy(CASES / f"{case}.py", tmp_path / "test_case.py")
    return run(python("-m", "pytest", "-p", "mpidp.testing", "-rfEsxX", *args), np=np,
               timeout=timeout, env=ENV, cwd=tmp_path)


def events(tmp_path, folder=".mpidp-pytest"):
    path = tmp_path / folder / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def rank_log(tmp_path, rank, folder=".mpidp-pytest"):
    return (tmp_path / folder / f"rank-{rank}.log").read_text()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """One np=3 run of plugin_cases/outcomes.py, shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("outcomes")
    rc, out, seconds = pytest_job(tmp_path, "outcomes", "--mpidp", "--junitxml=junit.xml", np=3)
    return tmp_path, rc, out, seconds


def test_a_failure_on_one_rank_fails_on_every_rank(outcomes):
    tmp_path, rc, out, seconds = outcomes
    assert rc == 1, out
    assert seconds < 20, f"took {seconds:.1f} s"
    # rank 0's report names the failing rank and shows its traceback once
    assert "failed on rank 1 of 3" in out
    assert out.count("E       AssertionError: planted failure on rank 1, value=10") == 1, out
    assert "FAILED test_case.py::test_fails_on_rank_1 - [rank 1] AssertionError" in out
    assert "1 failed, 4 passed, 2 skipped, 1 xfailed" in out
    # one report: the others write theirs to logs that rank 0 names
    assert out.count("test session starts") == 1
    assert ".mpidp-pytest/rank-{1..2}.log" in out
    for r in (1, 2):
        log = rank_log(tmp_path, r)
        assert "1 failed, 4 passed, 2 skipped, 1 xfailed" in log, log
    assert "failed on rank 1 of 3; rank 0's report has the tracebacks" in rank_log(tmp_path, 2)
    assert "planted failure on rank 1" in rank_log(tmp_path, 1)
    # only rank 0 writes the JUnit file, with the failing rank's message
    assert 'message="[rank 1] AssertionError: planted failure on rank 1' in (tmp_path / "junit.xml").read_text()
    # the run went on after the failure
    assert {e["nodeid"]: e["outcome"] for e in events(tmp_path) if e["event"] == "result"}[
        "test_case.py::test_runs_after_the_failure"] == "passed"


def test_skips_by_size_and_partial_skips(outcomes):
    tmp_path, rc, out, _ = outcomes
    assert "SKIPPED [1] test_case.py:14: needs at least 4 MPI ranks, running with 3" in out
    assert "SKIPPED [1] test_case.py:30: nothing to check anywhere" in out
    results = {e["nodeid"].split("::")[1]: e["outcome"] for e in events(tmp_path) if e["event"] == "result"}
    assert results["test_needs_2_ranks"] == "passed"
    assert results["test_skips_on_rank_1_only"] == "passed"  # skipped on one rank only: it ran elsewhere
    assert results["test_expected_failure_on_rank_2"] == "xfailed"


def test_import_error_on_one_rank_ends_the_job(tmp_path):
    rc, out, seconds = pytest_job(tmp_path, "import_error", "--mpidp", np=3)
    assert rc == 2, out
    assert seconds < 15, f"took {seconds:.1f} s"
    assert "collection error on rank 1: test_case.py" in out
    assert "RuntimeError: planted import failure on rank 1" in out
    assert "Interrupted: collection failed on rank 1 of 3" in out
    assert "Interrupted: collection failed on rank 1 of 3" in rank_log(tmp_path, 2)


def test_session_fixture_error_on_one_rank_errors_everywhere(tmp_path):
    rc, out, seconds = pytest_job(tmp_path, "session_fixture", np=3, ini="mpidp = auto")
    assert rc == 1, out
    assert seconds < 15, f"took {seconds:.1f} s"
    assert "ERROR test_case.py::test_uses_resource - [rank 2] RuntimeError: planted fixture failure" in out
    assert "1 passed, 1 error" in out
    assert "1 passed, 1 error" in rank_log(tmp_path, 1)


def test_a_hanging_rank_aborts_the_job_after_the_timeout(tmp_path):
    rc, out, seconds = pytest_job(tmp_path, "hang", "--mpidp", "--mpidp-timeout", "3", np=3)
    assert rc not in (0, None), out
    assert 3 < seconds < 15, f"took {seconds:.1f} s"
    # rank 0's report: which test, which rank, what finished before -- unless, on a loaded
    # machine, the stuck rank's own watchdog ends the job first: then its line says the same
    if "mpidp: aborting the MPI job" in out:
        aborted = [e for e in events(tmp_path) if e["event"] == "aborted"]
        assert aborted and aborted[0]["text"].startswith(
            "test_case.py::test_hangs (call): rank 1 did not finish within the 3 s timeout"), aborted
        assert "before this: 1 passed" in out
    else:
        assert "rank 1: test_case.py::test_hangs timed out after 3 s (in call)" in out, out
    # the stuck rank's stack, in its log
    log = rank_log(tmp_path, 1)
    assert "[mpidp] rank 1: test_case.py::test_hangs timed out after 3 s (in call)" in log
    assert "time.sleep(120)" in log


@pytest.mark.parametrize("failing, test", [(1, "test_fails_on_rank_1_before_a_collective"),
                                           (0, "test_fails_on_rank_0_before_a_collective"),
                                           (2, "test_fails_on_rank_2_while_rank_1_waits_for_it")])
def test_a_rank_that_fails_before_a_collective_is_named_with_its_failure(tmp_path, failing, test):
    # one rank fails and skips what the others wait in: the job ends at the timeout, and the
    # report must show the cause, that rank's failure, which only its row held: unread (rank
    # 1 fails, rank 0 waits), or read by rank 0 that then aborted for the missing ranks
    rc, out, seconds = pytest_job(tmp_path, "skipped_collective", "--mpidp", "--mpidp-timeout", "3",
                                  "-k", f"test_before or {test}", np=3)
    test = f"test_case.py::{test}"
    assert rc not in (0, None), out
    assert seconds < 15, f"took {seconds:.1f} s"
    assert f"rank {failing} already failed {test} (call)" in out, out
    assert f"AssertionError: planted failure on rank {failing}" in out, out


def test_a_fixture_that_fails_on_one_rank_before_a_collective_teardown_is_shown(tmp_path):
    # ranks 0 and 2 meet in the fixture's teardown, rank 1 never set it up: the job ends at the
    # timeout, before pytest's summary would have shown the agreed setup error
    rc, out, seconds = pytest_job(tmp_path, "skipped_collective", "--mpidp", "--mpidp-timeout", "3",
                                  "-k", "test_before or teardown", np=3)
    assert rc not in (0, None), out
    assert seconds < 15, f"took {seconds:.1f} s"
    assert "test_fixture_fails_on_rank_1_and_the_others_meet_in_its_teardown (setup) failed on rank 1 of 3" in out
    assert "RuntimeError: planted fixture failure on rank 1" in out, out


def test_a_crashing_rank_ends_the_job(tmp_path):
    rc, out, seconds = pytest_job(tmp_path, "crash", "--mpidp", "--mpidp-timeout", "20", np=3)
    assert rc not in (0, None), out
    assert seconds < 10, f"took {seconds:.1f} s"  # mpiexec kills the job; no timeout involved
    started = [e["nodeid"] for e in events(tmp_path) if e["event"] == "start"]
    assert started[-1] == "test_case.py::test_rank_1_dies"  # what rank 0 knew: the test it was in


def test_a_crash_under_the_launcher_names_the_test(tmp_path):
    rc, out, seconds = pytest_job(tmp_path, "crash", "--mpidp-np", "2", "--mpidp-timeout", "20")
    assert rc == 1, out
    assert seconds < 15, f"took {seconds:.1f} s"
    assert "np=2: the job ended during test_case.py::test_rank_1_dies" in out
    assert "a rank exited or crashed" in out
    assert "FAILED test_case.py::[mpi np=2]" in out


def test_the_launcher_runs_marked_tests_at_each_size(tmp_path):
    rc, out, seconds = pytest_job(tmp_path, "launcher", "--mpidp-np", "2,3")
    assert rc == 1, out
    assert seconds < 20, f"took {seconds:.1f} s"
    assert "FAILED test_case.py::[mpi np=3] - np=3: 1 of 3 tests failed: test_wrong_on_last_of_3" in out
    assert "failed on rank 2 of 3" in out and "planted failure on the last rank of 3" in out
    assert "FAILED test_case.py::[mpi np=2]" not in out
    assert "1 failed, 3 passed, 2 skipped" in out  # serial + any-size here, np=2 item; 2 size skips
    assert (tmp_path / ".mpidp-pytest" / "np3" / "rank-2.log").exists()


def test_without_mpidp_the_plugin_is_inert(tmp_path):
    rc, out, seconds = pytest_job(tmp_path, "inert", ini="mpidp = auto")  # auto: only under mpiexec
    assert rc == 0, out
    assert "needs at least 2 MPI ranks, running with 1" in out
    assert "mpidp:" not in out and not (tmp_path / ".mpidp-pytest").exists()


def test_the_example_file_passes_under_mpiexec(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "test_example_mpi.py"
    shutil.copy(example, tmp_path / "test_example_mpi.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    rc, out, seconds = run(python("-m", "pytest", "-p", "mpidp.testing", "--mpidp", "-rs"), np=2,
                           timeout=60, env=ENV, cwd=tmp_path)
    assert rc == 0, out
    assert "5 passed, 1 skipped" in out and "needs at least 4 MPI ranks, running with 2" in out
    assert seconds < 20, f"took {seconds:.1f} s"
