"""A save that dies (SIGKILL mid-write) or fails (file-size limit: a full disk) never costs the previous checkpoint."""
import os
import signal
import subprocess
import textwrap
import time

import pytest

from _mpirun import clean_env, mpiexec, python, run, ROOT

pytestmark = pytest.mark.spawns

PRELUDE = """
import os, resource, signal, sys
import numpy
import mpidp
from mpidp import checkpoint
mpidp.init()
r = mpidp.rank()
d = sys.argv[1]


class Model:
    def __init__(self, n, value):
        self.w = numpy.full(n, value, dtype=numpy.float32)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w[...] = state["w"]
"""

BIG = 16 << 20  # float32 elements: 64 MiB, long enough a write to kill it halfway


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(PRELUDE + textwrap.dedent(body))
    return path


def temps(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    writer = script(tmp_path, "writer.py", f"""
        model = Model({BIG}, 1.0)
        checkpoint.save(d, model, step=1)
        open(os.path.join(d, "pid"), "w").write(str(os.getpid()))
        model.w[:] = 2.0
        checkpoint.save(d, model, step=2)   # killed in here
        print("second save finished: the kill came too late", flush=True)
    """)
    proc = subprocess.Popen([mpiexec(), "-n", "1", *python(writer, ckdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=clean_env(), cwd=ROOT,
                            start_new_session=True)
    try:
        deadline, killed_at = time.monotonic() + 90, None
        while killed_at is None and time.monotonic() < deadline and proc.poll() is None:
            for name in temps(ckdir) if (ckdir / "pid").exists() else []:
                size = os.path.getsize(ckdir / name) if (ckdir / name).exists() else 0
                if name.startswith(".ckpt-00000002-") and size >= 1 << 20:  # mid-write
                    os.kill(int((ckdir / "pid").read_text()), signal.SIGKILL)
                    killed_at = size
                    break
            time.sleep(0.001)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert killed_at, f"never saw the second save's temporary file grow past 1 MiB\n{out[-3000:]}"
    assert proc.returncode != 0 and "second save finished" not in out, out[-3000:]
    names = sorted(os.listdir(ckdir))
    assert "ckpt-00000001.npz" in names and "ckpt-00000002.npz" not in names, names
    assert len(temps(ckdir)) == 1, f"the killed save's partial file ({killed_at} bytes) should be there: {names}"

    reader = script(tmp_path, "reader.py", f"""
        model = Model({BIG}, 0.0)
        info = checkpoint.load(d, model)
        assert info["step"] == 1 and (model.w == 1.0).all(), (info, model.w[:4])
        print(f"rank {{r}} loaded step {{info['step']}} intact", flush=True)
        checkpoint.save(d, Model(10, 3.0), step=3, keep=5)   # the next save sweeps the stale partial file
        if r == 0:
            print("after:", sorted(os.listdir(d)), flush=True)
    """)
    rc, out, seconds = run(python(reader, ckdir), np=2, timeout=120)
    assert rc == 0, out[-3000:]
    assert "rank 0 loaded step 1 intact" in out and "rank 1 loaded step 1 intact" in out
    assert temps(ckdir) == [], out
    assert sorted(n for n in os.listdir(ckdir) if n.endswith(".npz")) == ["ckpt-00000001.npz", "ckpt-00000003.npz"]


def test_full_disk_during_save_is_a_clear_error_on_every_rank(tmp_path):
    ckdir = tmp_path / "ck"
    body = """
        model = Model(1 << 18, 1.0)                      # 1 MiB of weights
        checkpoint.save(d, model, step=1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        model.w[:] = 2.0
        try:
            checkpoint.save(d, model, step=2)
        except mpidp.CheckpointError as exc:
            print(f"rank {r} CheckpointError: {exc}", flush=True)
        else:
            print(f"rank {r}: no error", flush=True)
        mpidp.barrier()  # rank 1's line is out before rank 0's: hydra may splice lines written at once
        if r == 0:
            print("files:", sorted(os.listdir(d)), flush=True)
        fresh = Model(1 << 18, 0.0)
        info = checkpoint.load(d, fresh)
        assert info["step"] == 1 and (fresh.w == 1.0).all(), info
        print(f"rank {r} loaded step 1 intact", flush=True)
    """
    rc, out, seconds = run(python(script(tmp_path, "full.py", body), ckdir), np=2, timeout=120)
    assert rc == 0, out[-3000:]
    assert seconds < 60
    for r in (0, 1):
        assert f"rank {r} CheckpointError: could not save checkpoint step 2 in {ckdir}" in out, out
        assert f"rank {r} loaded step 1 intact" in out, out
    assert "File too large; the previous checkpoint is unchanged; free space there or save elsewhere" in out, out
    assert "files: ['ckpt-00000001.npz']" in out, out   # no stray temporary file
