"""scripts/warm.py runs a script in a forked child of an interpreter that has torch and transformers imported:
the script must see and do exactly what `python script args` would (argv, working directory, environment, its
own folder first on sys.path, stdout/stderr, exit status, SIGTERM), and an edited file must be the one that
runs. The end-to-end tests (test_pipeline, test_resume, ...) run every stage through it as dvc.yaml says."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENV, ROOT

WARM = ROOT / "scripts" / "warm.py"
SCRIPT = '''import os, sys
import helper
print("argv", sys.argv[1:], "cwd", os.getcwd(), "var", os.environ.get("CONNGEO_TEST_VAR"), "helper", helper.VALUE)
print("to stderr", file=sys.stderr)
print("preloaded", "torch" in sys.modules, file=open("where.txt", "w"))
sys.exit(int(sys.argv[1]))
'''


def warm(*args, cwd, env=None):
    return subprocess.run([sys.executable, WARM, *map(str, args)], cwd=cwd, env=env or ENV, capture_output=True,
                          text=True, timeout=120)


def wait_for_server(cwd: Path, env: dict | None = None) -> None:
    """The first call starts the server (and runs its script directly meanwhile): call until one runs warm."""
    deadline = time.time() + 90
    while warm("probe.py", cwd=cwd, env=env).stdout.strip() != "True":
        assert time.time() < deadline, "the warm server did not start"
        time.sleep(0.5)


@pytest.fixture
def scripts(tmp_path):
    (tmp_path / "probe.py").write_text("import sys\nprint('torch' in sys.modules)\n")
    (tmp_path / "tool").mkdir()
    (tmp_path / "tool" / "script.py").write_text(SCRIPT)
    (tmp_path / "tool" / "helper.py").write_text("VALUE = 1\n")
    return tmp_path


def test_a_script_runs_warm_exactly_as_it_runs_alone(scripts):
    env = {**ENV, "CONNGEO_TEST_VAR": "seen"}
    wait_for_server(scripts, env)
    alone = subprocess.run([sys.executable, "tool/script.py", "3", "two words"], cwd=scripts, env=env,
                           capture_output=True, text=True)
    assert (scripts / "where.txt").read_text().strip() == "preloaded False"
    warmed = warm("tool/script.py", "3", "two words", cwd=scripts, env=env)
    assert (scripts / "where.txt").read_text().strip() == "preloaded True"  # it ran in the server's child
    assert (warmed.returncode, warmed.stdout, warmed.stderr) == (alone.returncode, alone.stdout, alone.stderr)
    assert alone.returncode == 3 and "'two words'" in alone.stdout and "var seen" in alone.stdout


def test_an_edited_module_is_the_one_that_runs(scripts):
    wait_for_server(scripts)
    assert "helper 1" in warm("tool/script.py", 0, cwd=scripts).stdout
    (scripts / "tool" / "helper.py").write_text("VALUE = 2\n")
    assert "helper 2" in warm("tool/script.py", 0, cwd=scripts).stdout
    assert (scripts / "where.txt").read_text().strip() == "preloaded True"


def test_sigterm_reaches_the_script_and_its_exit_status_comes_back(scripts):
    (scripts / "stop.py").write_text(
        "import os, signal, sys, time\n"
        # os.write: a print in the handler may land inside print('ready') and fail as a reentrant call
        "signal.signal(signal.SIGTERM, lambda *_: (os.write(1, b'stopped on SIGTERM\\n'), sys.exit(143)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")
    wait_for_server(scripts)
    proc = subprocess.Popen([sys.executable, WARM, "stop.py"], cwd=scripts, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "stopped on SIGTERM" in out


def test_sigkill_of_the_client_kills_the_script_and_what_it_started(scripts):
    """`dvc repro` killed with its process group (a node failure, a wall-clock limit) must not leave the
    script running on in the server's fork: it would go on writing the outputs of a stage DVC thinks dead."""
    (scripts / "hang.py").write_text(
        "import os, subprocess, time\n"
        "sleeper = subprocess.Popen(['sleep', '60'])\n"
        "print(os.getpid(), sleeper.pid, flush=True)\n"
        "time.sleep(60)\n")
    wait_for_server(scripts)
    proc = subprocess.Popen([sys.executable, WARM, "hang.py"], cwd=scripts, env=ENV, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids[0] != proc.pid  # it did run in the server's fork
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
    """Running (a zombie, killed and not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_conngeo_warm_0_runs_the_script_directly(scripts):
    env = {**ENV, "CONNGEO_WARM": "0"}
    assert warm("tool/script.py", 0, cwd=scripts, env=env).returncode == 0
    assert (scripts / "where.txt").read_text().strip() == "preloaded False"
