"""``--mpidp`` under mpirun: ranks agree on every outcome, rank 0 reports, nothing hangs.

After collection, after every phase of every test and at the session's end each rank sends
rank 0 a small row about what happened there; rank 0 decides and sends the verdict back, and
every rank rewrites its pytest report to it, so all ranks take the same path through pytest.
Rank 0 waits for the rows with a deadline (the per-test timeout), and a watchdog thread on
every rank catches a rank stuck in test code; either way the job ends with ``MPI_Abort``
after rank 0 (or the stuck rank) has said which test and which ranks.
"""
import faulthandler
import json
import os
import sys
import threading
import time
import traceback

import pytest

from . import _report

_REPORT_TAG = 7701
_VERDICT_TAG = 7702
# Seconds rank 0 waits past a timeout before it reports, so that a stuck rank's watchdog
# has written its stack first; a stuck rank aborts the job itself a grace later still.
GRACE = 1.0
FORWARD_S = 0.5  # before an abort: time for mpiexec to forward what this rank printed last
# Collection and the session's end get at least this long: imports can be slow.
SLOW_PHASE_S = 60.0
SPIN_S = 0.02         # a waiting rank polls without sleeping this long, then sleeps
MAX_PAUSE_S = 0.005   # ... at most this long between polls
NOTE_WAIT_S = 0.1     # rank 0 notes in results.jsonl whom it waits for after this long
# Frames left out of a stuck rank's stack: pytest's, pluggy's and this plugin's.
_HIDDEN_FRAMES = ("/_pytest/", "/pluggy/", "<frozen runpy>", "/pytest/__main__.py",
                  f"{os.sep}testing{os.sep}_session.py")


def _stacks():
    """Every other thread's Python stack, without pytest's and pluggy's frames."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        entries = [entry for entry in traceback.format_stack(frame)
                   if not any(part in entry.split("\n")[0] for part in _HIDDEN_FRAMES)]
        parts.append(f"thread {names.get(ident, ident)}, most recent call last:\n" + "".join(entries))
    return "\n".join(parts)


def _failure_text(rank, what, row):
    """'[mpidp] rank 1 already failed <what>:' and its traceback, for a row that says failed; else ''."""
    if row.get("outcome") != "failed":
        return ""
    return f"\n[mpidp] rank {rank} already failed {what}:\n{row.get('text', '').rstrip()}\n"


class _OutOfStep(Exception):
    """Rank 0 found ranks missing or at a different point; the message says which."""


class MpiSession:
    """The pytest plugin object registered when ``--mpidp`` mode is on (one per process)."""

    def __init__(self, config, timeout, logdir):
        from mpi4py import MPI

        from ._watchdog import Watchdog

        self.MPI = MPI
        self.config = config
        self.world = MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.timeout = timeout
        self.logdir = logdir
        self.stderr_fd = os.dup(2)  # the real stderr: pytest's fd capture replaces fd 2 during tests
        self.seq = 0
        self.started = self.clean = False
        self.stop = self.why = None
        self.collect_errors, self.other_collect_errors = [], []
        self.phase_reports, self.counts = [], {}
        self.statuses = None
        self.test_deadline = float("inf")
        self.test_seconds = timeout
        logdir.mkdir(parents=True, exist_ok=True)
        self.log = self.results = None
        if self.rank == 0:
            for stale in logdir.glob("rank-*.log"):
                if not stale.stem[5:].isdigit() or int(stale.stem[5:]) >= self.size:
                    stale.unlink()
            self.results = open(logdir / "results.jsonl", "w", buffering=1, encoding="utf-8")
        else:
            self.log = open(self.log_path(self.rank), "w", buffering=1, encoding="utf-8",
                            errors="replace")
            self._redirect_terminal()
        # faulthandler's own timer is free unless the user set faulthandler_timeout.
        self.backstop = not float(config.getini("faulthandler_timeout") or 0)
        self.backstop_until = float("-inf")
        self.watchdog = Watchdog(self._expired)
        self._arm(time.monotonic() + self._slow_seconds(), "start-up (MPI_Comm_dup) timed out", True)
        # A private communicator: a user's recv(ANY_TAG) on COMM_WORLD must not take our rows.
        self.comm = self.world.Dup() if self.size > 1 else self.world
        self._disarm(True)

    # --- where output goes -------------------------------------------------------------

    def log_path(self, rank):
        return self.logdir / f"rank-{rank}.log"

    def _relative(self, path):
        """``path`` relative to where pytest was started, if that is shorter."""
        try:
            relative = os.path.relpath(path, self.config.invocation_params.dir)
        except ValueError:
            return str(path)
        return relative if len(relative) < len(str(path)) else str(path)

    def log_names(self):
        """'.mpidp-pytest/rank-1.log' or '.mpidp-pytest/rank-{1..3}.log'."""
        if self.size == 2:
            return self._relative(self.log_path(1))
        return os.path.join(self._relative(self.logdir), f"rank-{{1..{self.size - 1}}}.log")

    def _redirect_terminal(self):
        """Send this rank's whole pytest report to its log file, and leave --junitxml to rank 0.

        Every rank writing the same JUnit file left whichever rank wrote last, without the
        tracebacks that only rank 0 has.
        """
        pm = self.config.pluginmanager
        old = pm.get_plugin("terminalreporter")
        if old is not None:
            pm.unregister(old)
            pm.register(pytest.TerminalReporter(self.config, self.log), "terminalreporter")
        try:
            from _pytest.junitxml import xml_key
        except ImportError:
            return
        xml = self.config.stash.get(xml_key, None)
        if xml is not None:
            del self.config.stash[xml_key]
            pm.unregister(xml)

    def _say(self, text):
        """Write a line to the real stderr (and this rank's log): for messages before an abort."""
        line = text.rstrip("\n") + "\n"
        os.write(self.stderr_fd, line.encode("utf-8", "replace"))
        if self.log is not None:
            self.log.write(line)
            self.log.flush()

    def _event(self, **fields):
        if self.results is not None:
            self.results.write(json.dumps(fields) + "\n")

    def _slow_seconds(self):
        return max(self.timeout, SLOW_PHASE_S) if self.timeout else float("inf")

    # --- ending the job ----------------------------------------------------------------

    def abort(self, text):
        """Say ``text`` where a person sees it, then end every rank of the job (main thread)."""
        if self.rank == 0:
            self._event(event="aborted", text=text)
            tr = self.config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:
                tr.write_line("")
                tr.write_sep("=", "mpidp: aborting the MPI job", red=True, bold=True)
                for line in text.split("\n"):
                    tr.write_line(line)
                done = ", ".join(f"{n} {word}" for word, n in sorted(self.counts.items()))
                tr.write_line(f"before this: {done or 'no tests finished'}")
                if self.size > 1:
                    tr.write_line(f"output of the other ranks: {self.log_names()}")
                tr.write_sep("=", red=True)
                self.config.get_terminal_writer().flush()
            else:
                self._say(text)
        else:
            self._say(f"[mpidp] rank {self.rank}: {text}")
        self._end()

    def _end(self):
        for stream in (sys.stdout, sys.stderr, self.log, self.results):
            try:
                stream.flush()
            except Exception:
                pass
        if self.size > 1:  # mpiexec forwards a rank's output through its proxy: let the last lines get out
            time.sleep(FORWARD_S)  # before MPI_Abort kills the proxies (a report was cut mid-traceback)
        try:
            self.world.Abort(1)
        finally:
            os._exit(1)

    def _expired(self, what):
        """Watchdog thread: this rank overstayed a deadline in test code; show where, then end the job."""
        current = os.environ.get("PYTEST_CURRENT_TEST", "")
        phase = current.rsplit(" ", 1)[-1] if current.endswith(")") else ""
        text = f"rank {self.rank}: {what}" + (f" (in {phase.strip('()')})" if phase else "")
        if self.log is not None:
            self.log.write(f"\n[mpidp] {text}; where each thread was:\n{_stacks()}\n")
            self._say(f"[mpidp] {text}; its stack is in {self._relative(self.log_path(self.rank))}")
        else:
            done = ", ".join(f"{n} {word}" for word, n in sorted(self.counts.items()))
            self._say(f"\n[mpidp] {text}; where each thread was:\n{_stacks()}{self._earlier_failures()}{self._failures_waiting()}"
                      f"[mpidp] before this: {done or 'no tests finished'}"
                      + (f"; output of the other ranks: {self.log_names()}" if self.size > 1 else ""))
        if self.size > 1:
            time.sleep(4 * GRACE)  # rank 0 reports and aborts first when it can (its deadline is one GRACE later)
        self._say(f"[mpidp] rank {self.rank}: aborting the job")
        self._end()

    def _earlier_failures(self):
        """Rank 0: the failed phases of the current test, agreed on but printed only at the session's end.

        A fixture that failed in setup on one rank leaves the others stuck in its teardown's
        collective; the job then ends before pytest's summary would show why.
        """
        return "".join(f"\n[mpidp] {rep.nodeid} ({rep.when}) {rep.longreprtext.rstrip()}\n"
                       for rep in self.phase_reports if rep.failed)

    def _failures_waiting(self):
        """Watchdog thread of rank 0: the failures in rows other ranks sent and rank 0 never read.

        A rank that failed before a collective the others wait in has reported its failure,
        the likely cause of the wait; it would die with the job unread.
        """
        if self.size == 1 or self.MPI.Query_thread() < self.MPI.THREAD_MULTIPLE:
            return ""
        found, status = [], self.MPI.Status()
        while (message := self.comm.improbe(self.MPI.ANY_SOURCE, _REPORT_TAG, status)) is not None:
            _, key, row = message.recv()
            found.append(_failure_text(status.Get_source(), f"{key[1]} ({key[2]})" if key[1] else key[0], row))
        return "".join(found)

    def _arm(self, deadline, what, backstop=False):
        """Set the watchdog for a phase; with ``backstop``, faulthandler's timer too.

        faulthandler's C thread ends the process even where the main thread holds the GIL
        and the watchdog thread cannot run; it is set once per test (each call starts a
        thread), so late enough to cover the exchanges and the watchdog's own grace.
        """
        self.watchdog.arm(deadline, what)
        if not (backstop and self.backstop) or deadline == float("inf"):
            return
        now, until = time.monotonic(), deadline + 8 * GRACE
        # Each call starts a thread (~0.5 ms): set it half a timeout later than needed, and
        # set it again only when it would fire before this phase's deadline + 8 graces.
        if self.backstop_until < until:
            self.backstop_until = until + (deadline - now) / 2
            faulthandler.dump_traceback_later(self.backstop_until - now, exit=True,
                                              file=self.log if self.log is not None else self.stderr_fd)

    def _disarm(self, backstop=False):
        self.watchdog.disarm()
        if backstop and self.backstop:
            faulthandler.cancel_dump_traceback_later()
            self.backstop_until = float("-inf")

    # --- the exchange ------------------------------------------------------------------

    def exchange(self, key, row, decide, deadline):
        """Every rank sends ``row``; rank 0 returns (verdict, rows), the others (verdict, None).

        Rank 0 raises ``_OutOfStep`` when ranks are missing at ``deadline`` or sent a row for
        another ``key``; the others abort if rank 0 has not answered a while after ``deadline``.
        """
        self.seq += 1
        if self.size == 1:
            return decide([row]), [row]
        what = f"{key[1]} ({key[2]})" if key[1] else key[0]
        self._arm(deadline + 4 * GRACE, f"stuck in mpidp's exchange about {what}")
        if self.rank != 0:
            self.comm.send((self.seq, key, row), dest=0, tag=_REPORT_TAG)
            verdict = self._receive(0, _VERDICT_TAG, deadline + 2 * GRACE, time.monotonic())
            if verdict is None:
                self.abort(f"rank 0 gave no verdict on {what} in time; "
                           "rank 0 is stuck or out of step (see its output)")
            return verdict, None
        rows = [None] * self.size
        rows[0] = row
        missing = set(range(1, self.size))
        status = self.MPI.Status()
        start, noted = time.monotonic(), None
        while missing:
            now = time.monotonic()
            if now >= deadline:  # a failure on a rank that did finish is likely why the others are stuck
                raise _OutOfStep(self._missing_text(what, sorted(missing), now - start) +
                                 "".join(_failure_text(r, what, row) for r, row in enumerate(rows) if row))
            if now - start > NOTE_WAIT_S and noted != missing:
                noted = set(missing)  # for a job that dies now: rank 0 knew whom it waited for
                self._event(event="waiting", what=what, ranks=sorted(missing))
            until = deadline if now >= start + NOTE_WAIT_S else min(deadline, start + NOTE_WAIT_S)
            message = self._receive(self.MPI.ANY_SOURCE, _REPORT_TAG, until, start, status)
            if message is None:
                continue
            source = status.Get_source()
            seq, their_key, their_row = message
            if (seq, their_key) != (self.seq, key):
                raise _OutOfStep(self._out_of_step_text(what, source, their_key, their_row))
            rows[source] = their_row
            missing.discard(source)
        verdict = decide(rows)
        for r in range(1, self.size):
            self.comm.send(verdict, dest=r, tag=_VERDICT_TAG)
        return verdict, rows

    def _receive(self, source, tag, until, since, status=None):
        """Poll for one message until ``until``; None if none came.

        For the first ``SPIN_S`` since ``since`` it polls and yields the CPU, then sleeps a tenth
        of the time waited (at most ``MAX_PAUSE_S``): quick when ranks are in step, and a
        rank that waits long leaves the CPU to the working ones.
        """
        while True:
            message = self.comm.improbe(source, tag, status)
            if message is not None:
                return message.recv()
            now = time.monotonic()
            if now >= until:
                return None
            waited = now - since
            if waited < SPIN_S:
                os.sched_yield()
            else:
                time.sleep(min(MAX_PAUSE_S, waited / 10, until - now))

    def _missing_text(self, what, missing, waited):
        logs = (", ".join(self._relative(self.log_path(r)) for r in missing) if len(missing) <= 4
                else self.log_names())
        return (f"{what}: {_report.ranks_word(missing)} did not finish within the "
                f"{self.test_seconds:g} s timeout (rank 0 waited {waited:.1f} s); a rank stuck in "
                f"test code writes its stack to its log: {logs}")

    def _out_of_step_text(self, what, source, key, row):
        if key[0] == "final":
            there = f"ended its session with exit status {row['exitstatus']}"
            if row.get("why"):
                there += f" ({row['why']})"
        elif key[0] == "collect":
            there = "is still collecting"
        else:
            there = f"is at {key[1]} ({key[2]})"
        return (f"ranks are out of step: rank 0 is at {what}, rank {source} {there}; "
                f"see {self._relative(self.log_path(source))}")

    def _exchange_or_abort(self, key, row, decide, deadline):
        try:
            return self.exchange(key, row, decide, deadline)
        except _OutOfStep as exc:
            self.abort(str(exc))

    # --- pytest hooks ------------------------------------------------------------------

    def pytest_report_header(self, config):
        from mpi4py import MPI

        # "MPICH Version:      5.0.2" / "Open MPI v5.0.11, package: ...\0" -> the name and version
        library = " ".join(MPI.Get_library_version().replace("\0", "").split("\n")[0].split(",")[0].split())
        limit = f"per-test timeout {self.timeout:g} s" if self.timeout else "no per-test timeout"
        lines = [f"mpidp: {self.size} MPI rank{'s' if self.size > 1 else ''} ({library}), {limit}"]
        if self.size > 1:
            lines.append(f"mpidp: this is rank 0's report; the other ranks write to {self.log_names()}; "
                         f"progress in {self._relative(self.logdir / 'results.jsonl')}")
        return lines

    def pytest_sessionstart(self, session):
        self.started = True

    @pytest.hookimpl(hookwrapper=True)
    def pytest_collection(self, session):
        self._arm(time.monotonic() + self._slow_seconds(),
                  f"collection timed out after {self._slow_seconds():g} s", True)
        self.collect_deadline = time.monotonic() + self._slow_seconds() + GRACE
        yield

    def pytest_collectreport(self, report):
        if report.failed:
            self.collect_errors.append((report.nodeid, report.longreprtext))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        row = {"errors": self.collect_errors, "ids": _report.pack_ids([i.nodeid for i in session.items])}
        keep_going = session.config.option.continue_on_collection_errors
        verdict, rows = self._exchange_or_abort(
            ("collect", "", ""), row, lambda rows: _report.decide_collection(rows, keep_going),
            self.collect_deadline)
        self._disarm()
        self.stop = verdict["stop"]
        self._event(event="collected", count=len(session.items), stop=self.stop)
        if rows is not None:
            mine = set(self.collect_errors)
            self.other_collect_errors = [(r, nodeid, text) for r in range(1, self.size)
                                         for nodeid, text in rows[r]["errors"] if (nodeid, text) not in mine]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        if self.stop:
            raise session.Interrupted(self.stop)

    def _item_timeout(self, item):
        marker = item.get_closest_marker("mpi")
        if marker is not None and "timeout" in marker.kwargs:
            return float(marker.kwargs["timeout"])
        return self.timeout

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.test_seconds = self._item_timeout(item)
        self.test_deadline = (time.monotonic() + self.test_seconds) if self.test_seconds else float("inf")
        self.phase_reports = []
        self._arm(self.test_deadline, f"{item.nodeid} timed out after {self.test_seconds:g} s", True)
        self._event(event="start", nodeid=item.nodeid)
        yield
        self._disarm()
        if self.results is not None and self.phase_reports:
            outcome = _report.overall_outcome(self.phase_reports)
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            bad = [rep for rep in self.phase_reports if rep.failed or rep.skipped]
            self._event(event="result", nodeid=item.nodeid, outcome=outcome,
                        text="\n\n".join(rep.longreprtext for rep in bad if rep.failed),
                        reason=next((_report.skip_reason(rep) for rep in bad if rep.skipped), ""))

    def _arm_test(self, item):
        self._arm(self.test_deadline, f"{item.nodeid} timed out after {self.test_seconds:g} s")

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if self.size == 1:
            self.phase_reports.append(report)
            return
        timed_out = self.watchdog.fired and f"timed out after {self.test_seconds:g} s"
        row = _report.summarize(report, timed_out)
        when = report.when
        try:
            verdict, rows = self.exchange(("test", item.nodeid, when), row,
                                          lambda rows: _report.decide(when, rows),
                                          self.test_deadline + GRACE)
        except _OutOfStep as exc:
            self.abort(str(exc) + self._earlier_failures())
        _report.apply(report, verdict, rows, self.test_seconds)
        self.phase_reports.append(report)
        if verdict.get("timed_out"):
            # The ranks that timed out abort the job a grace from now; say it properly first.
            if rows is not None:
                self.abort(f"{item.nodeid} ({when}) {report.longreprtext}")
            time.sleep(4 * GRACE)
            self.abort(f"{item.nodeid} timed out on {_report.ranks_word(verdict['timed_out'])}")
        self._arm_test(item)

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        deadline = time.monotonic() + self._slow_seconds() + GRACE
        self._arm(deadline, "the session's end timed out", True)
        row = {"exitstatus": int(session.exitstatus), "why": self.why}
        verdict, rows = self._exchange_or_abort(("final", "", ""), row, _report.decide_final, deadline)
        self._disarm(True)
        session.exitstatus = verdict["exitstatus"]
        self.statuses = verdict["statuses"]
        self._event(event="final", exitstatus=int(verdict["exitstatus"]), statuses=verdict["statuses"])
        self.clean = True
        yield

    def pytest_terminal_summary(self, terminalreporter):
        if self.rank != 0 or self.size == 1:
            return
        tr = terminalreporter
        for r, nodeid, text in self.other_collect_errors:
            tr.write_sep("_", f"collection error on rank {r}: {nodeid or '(session)'}", red=True)
            tr.write_line(text)
        if self.statuses and len(set(self.statuses)) > 1:
            tr.write_line("mpidp: exit status per rank: " +
                          ", ".join(f"rank {r}: {s}" for r, s in enumerate(self.statuses)))
        tr.write_line(f"mpidp: rank 0's report for {self.size} ranks; "
                      f"the other ranks' output is in {self.log_names()}")

    @pytest.hookimpl(trylast=True)
    def pytest_internalerror(self, excrepr, excinfo):
        if self.size > 1 and not self.clean:
            where = f"see {self._relative(self.log_path(self.rank))}" if self.rank else "see above"
            self.abort(f"pytest internal error ({where}): {excinfo.exconly()}")

    def pytest_keyboard_interrupt(self, excinfo):
        self.why = excinfo.exconly()

    def pytest_unconfigure(self, config):
        if self.started and not self.clean and self.size > 1:
            self.abort(f"pytest ended on rank {self.rank} before the ranks agreed on the end of the session")
        self._disarm(True)
        for stream in (self.log, self.results):
            if stream is not None:
                stream.flush()
