"""Sharded extraction and captions, and the Slurm wrappers on a real one-node Slurm.

A throwaway project (the stage scripts, scripts/slurm, a params.yaml naming two tiny random models
saved with save_pretrained, a toy world of 2 shards x 5 images) is run three ways: one process; N
workers then the plain join run; and scripts/slurm/submit.sh on Debian's slurm-wlm (munged, slurmctld
and slurmd started here on 127.0.0.1). The outputs must be byte-identical, and verify must pass only
on the finished ones. Then a perturbation sweep longer than a wall of one minute runs under
submit.sh: its tasks are warned before the wall, stop after their current part, requeue themselves,
and the chain completes with the outputs of an uninterrupted run. The Slurm tests skip, with the
reason, where the daemons cannot start; CI (.ci/run) installs them.
"""

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import typer
import yaml

from conftest import ENV, ROOT, Stages, tiny_project, tree_digest
from conngeo.data import toyworld
from conngeo.families import adapter_class
from models_helpers import toy_tokenizer

MODELS = {"llava": "llava", "qwen": "qwen2.5vl"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for folder in ("stages", "scripts"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    toyworld.generate(root / "images", split="study", seed=0, shards=2, images_per_shard=5, size=48)
    models = {}
    for name, family in MODELS.items():
        cls = adapter_class(family)
        cls.tiny(toy_tokenizer(cls.special_tokens), 48, seed=0).save(root / "models" / name)
        models[name] = {"family": family, "source": str(root / "models" / name), "hub": None, "revision": None,
                        "dtype": "float32", "prompt": "", "image_size": 48}
    # 5 images a shard in parts of 3: chunks (shard000: 0, 1), (shard001: 0, 1), dealt across workers
    params = {"data": {"root": "images", "on_bad_image": "error"}, "models": models, "device": "cpu", "threads": 1,
              "extract": {"batch_size": 2, "num_workers": 0, "save_every": 3, "store_dtype": None},
              "captions": {"max_new_tokens": 4, "batch_size": 2},
              "references": {"spaces": {}}, "perturb": {"modes": [], "levels": []}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root



@pytest.fixture(scope="module")
def stages(project):
    stages = Stages(project)
    yield stages
    sys.path.remove(str(project / "stages"))


@pytest.fixture(scope="module")
def single(project, stages):
    """Single-process extraction of both models, and llava's captions, under single/."""
    for name in MODELS:
        stages("extract", "--model", name, "--out", f"single/{name}", "--metrics", "single/metrics.json")
    stages("captions", "--model", "llava", "--vectors", "single/llava", "--no-recon", "--out", "single/captions",
           "--metrics", "single/metrics.json")
    return project / "single"


def test_workers_then_join_equal_one_process(project, stages, single, monkeypatch):
    out = "sharded/llava"
    for i in range(3):
        stages("extract", "--model", "llava", "--out", out, "--worker", i, "--workers", 3, "--metrics", "x.json")
    assert not (project / "x.json").exists()  # the metrics are the joining run's
    parts = sorted(p.relative_to(project / out).as_posix() for p in (project / out).rglob("part*.safetensors"))
    assert parts == [f"{s}/parts/part0000{c}.safetensors" for s in ("shard000", "shard001") for c in (0, 1)]
    assert "partial file left behind" in stages("verify", "vectors", "--model", "llava", "--out", out, code=1)

    # the join needs no model: every part is there
    monkeypatch.setattr(stages.module("extract"), "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    stages("extract", "--model", "llava", "--out", out, "--metrics", "sharded/metrics.json")
    assert "ok, 10 images in 2 shards" in stages("verify", "vectors", "--model", "llava", "--out", out)
    assert tree_digest(project / out) == tree_digest(single / "llava")

    # captions: 2 workers, then the join, equal the single run's table
    cap = "sharded/captions"
    for i in range(2):
        stages("captions", "--model", "llava", "--vectors", out, "--no-recon", "--out", cap, "--worker", i,
               "--workers", 2, "--metrics", "x.json")
    # one part per generate batch of 2 images: shards of 5 -> batches at 0, 2, 4
    assert sorted(p.name for p in (project / cap / "parts").glob("*.csv")) == [
        f"{s:03d}-{a:07d}.csv" for s in (0, 1) for a in (0, 2, 4)]
    monkeypatch.setattr(stages.module("captions"), "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    stages("captions", "--model", "llava", "--vectors", out, "--no-recon", "--out", cap, "--metrics", "x.json")
    assert tree_digest(project / cap) == tree_digest(single / "captions")
    assert "ok, 10 images" in stages("verify", "captions", "--model", "llava", "--vectors", out, "--out", cap)


def test_verify_finds_missing_and_doubled_stems(project, stages, single, tmp_path):
    out = tmp_path / "vectors"
    shutil.copytree(single / "llava", out)
    index = out / "shard001" / "index.csv"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-1] + [lines[1]]) + "\n")  # the last stem dropped, the first twice
    said = stages("verify", "vectors", "--model", "llava", "--out", out, code=1)
    assert "stem study_001_00000 also in shard001" in said and "missing ['study_001_00004']" in said
    index.write_text("\n".join(lines[:-1]) + "\n")  # one image fewer than the tensors hold
    assert "rows but index.csv lists" in stages("verify", "vectors", "--model", "llava", "--out", out, code=1)
    said = stages("verify", "vectors", "--model", "qwen", "--out", single / "llava", code=1)
    assert "fingerprint differs" in said


def test_a_stage_that_is_done_ignores_sigterm(monkeypatch):
    """The wall's SIGTERM may land while a finished stage exits, when Python has put back the default action
    (death): the task would take the exit 143 for a stop and rerun the stage. run() ignores SIGTERM once
    the work is done."""
    spec = importlib.util.spec_from_file_location("stage_common", ROOT / "stages" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    app = typer.Typer()
    app.command()(lambda: None)
    monkeypatch.setattr(sys, "argv", ["stages/nothing.py"])
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as done:
            common.run(app)
        assert done.value.code == 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


# -- a real Slurm ------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again cred_expire + 1 s later (default 120 s)
AuthInfo=socket={run}/munge/munge.socket.2,cred_expire=5
StateSaveLocation={run}/state
SlurmdSpoolDir={run}/spool
SlurmctldPidFile={run}/run/slurmctld.pid
SlurmdPidFile={run}/run/slurmd.pid
SlurmctldLogFile={run}/log/slurmctld.log
SlurmdLogFile={run}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={run}/log/jobcomp.txt
SchedulerType=sched/backfill
# try pending jobs every second (defaults 60 and 30 s): a requeued task starts once it may
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Environment for Slurm clients of a one-node cluster (munged, slurmctld, slurmd) started here."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
               if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        pytest.skip(f"Slurm not installed (no {', '.join(missing)}): apt-get install slurm-wlm slurmctld slurmd "
                    "slurm-client munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm of this test runs its daemons as root; not root here")
    run = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "run", "log", "key"):
        (run / sub).mkdir()
    (run / "key").chmod(0o700)
    (run / "munge").chmod(0o755)
    key = run / "key" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = run / "slurm.conf"
    conf.write_text(SLURM_CONF.format(run=run, ctld_port=free_port(), d_port=free_port()))
    env = {**ENV, "SLURM_CONF": str(conf), "PATH": ENV["PATH"] + ":/usr/sbin:/sbin"}
    which = {b: shutil.which(b, path=env["PATH"]) for b in ("munged", "slurmctld", "slurmd")}
    log = open(run / "log" / "daemons.out", "w")
    daemons = []

    def start(*cmd):
        daemons.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stop():  # slurmd, then slurmctld, then munged, each by its own pid
        for proc in reversed(daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.close()

    try:
        start(which["munged"], "-F", "--force", f"--socket={run}/munge/munge.socket.2", f"--key-file={key}",
              f"--pid-file={run}/run/munged.pid", f"--log-file={run}/log/munged.log", f"--seed-file={run}/run/seed")
        socket, deadline = run / "munge" / "munge.socket.2", time.time() + 10
        while not socket.exists() and time.time() < deadline:  # slurmctld needs munge's socket up
            time.sleep(0.05)
        start(which["slurmctld"], "-D", "-i", "-f", str(conf))
        start(which["slurmd"], "-D", "-N", "localhost", "-f", str(conf))
        deadline = time.time() + 20
        state = ""
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle" or any(p.poll() is not None for p in daemons):
                break
            time.sleep(0.3)
        if state != "idle":
            logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-800:] for p in sorted((run / "log").iterdir()))
            stop()
            pytest.skip(f"the Slurm daemons did not start (node state {state!r}); logs:{logs}")
        yield env
    finally:
        stop()


def wait_for_jobs(env, timeout=180):
    """Wait until the queue is empty; fail at once on a dependency that can never be satisfied."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], env=env, capture_output=True, text=True).stdout
        if not queue.strip():
            return
        if "DependencyNeverSatisfied" in queue:
            raise AssertionError(f"a job failed, its dependants can never run:\n{queue}")
        time.sleep(0.5)
    raise AssertionError(f"jobs still queued after {timeout} s:\n{queue}")


def test_slurm_array_over_models_and_shards_equals_one_process(project, single, slurm):
    env = {**slurm, "MODELS": " ".join(MODELS), "WORKERS": "2",
           # the wrappers' defaults ask for a GPU, 32G and a warning 900 s before an 8 h wall; this node has
           # 2 CPUs, 2 GB and no GPU, and these tasks take seconds
           "SBATCH_ARGS": "--gres=none --cpus-per-task=1 --mem=400M --time=10 --signal=B:USR1@30"}
    proc = subprocess.run(["bash", "scripts/slurm/submit.sh", "extract"], cwd=project, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    join = proc.stdout.strip()
    assert join.isdigit(), proc.stdout
    wait_for_jobs(env)
    logs = project / "logs" / "slurm"
    jobs = subprocess.run(["scontrol", "show", "job"], env=env, capture_output=True, text=True).stdout
    states = [w.split("=")[1] for w in jobs.split() if w.startswith("JobState=")]
    # 2 models x 2 workers, then a join + verify per model
    assert states == ["COMPLETED"] * 6, jobs + "".join(p.read_text() for p in sorted(logs.glob("*.out")))
    assert len((logs / "extract.tasks").read_text().splitlines()) == 4
    for name in MODELS:
        assert tree_digest(project / "data" / "vectors" / name) == tree_digest(single / name)
    joined = "".join(p.read_text() for p in logs.glob("conngeo-extract-join-*.out"))
    assert joined.count("verify vectors") == 2 and "ok, 10 images in 2 shards" in joined


# -- a wall time: tasks warned before it stop after their part, requeue themselves, and the chain completes

@pytest.fixture(scope="module")
def long_sweep(tmp_path_factory):
    """A project whose perturbation sweep has many parts: one tiny LLaVA, 2 shards x 24 images in windows of 4
    (12 units), 20 caption sets."""
    root = tmp_path_factory.mktemp("wall")
    params = tiny_project(root, "llava", "llava", images_per_shard=24, batch_size=4)
    shutil.copytree(ROOT / "scripts", root / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    params["captions"].update(max_new_tokens=8, batch_size=4)
    params["max_window_mb"] = 1e-6  # a window of one generate batch
    params["threads"] = 1
    params["perturb"].update(modes=["mask", "lowrank"], levels=[round(0.1 * i, 1) for i in range(1, 11)])
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    stages = Stages(root)
    try:
        stages("extract", "--model", "llava")
    finally:
        sys.path.remove(str(root / "stages"))
    return root


def slurm_records(env, project):
    """Slurm's record of every job (array task) submitted from `project`: {field: value} each."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], env=env, capture_output=True, text=True, check=True).stdout
    jobs = [dict(w.split("=", 1) for w in line.split() if "=" in w) for line in out.splitlines() if line.strip()]
    return [j for j in jobs if j.get("WorkDir") == str(project)]


def warn_each_task_at_work(env, project, name, stop):
    """Send each task of the array `name`, once it has finished its first window of images, the signal that
    `--signal=B:USR1@N` makes Slurm send N seconds before the wall (to the batch shell). Waiting for Slurm's
    own time-limit check instead (every 30 s, at a phase of its own) made the outcome depend on how fast
    the machine got through the sweep."""
    warned = set()
    while not stop.is_set():
        for job in slurm_records(env, project):
            task = f"{job['ArrayJobId']}_{job['ArrayTaskId']}" if job.get("ArrayTaskId") else None
            if job["JobName"] != name or task is None or task in warned or job["JobState"] != "RUNNING":
                continue
            log = project / "logs" / "slurm" / f"{name}-{task}.out"
            if log.exists() and re.search(r"\| [1-9]\d*/\d+ \[", log.read_text()):  # a window done
                subprocess.run(["scancel", "--batch", "--signal=USR1", task], env=env, check=True)
                warned.add(task)
        time.sleep(0.2)


def test_slurm_tasks_warned_of_their_wall_requeue_and_the_chain_completes(long_sweep, slurm):
    project = long_sweep
    # The workers ask for both CPUs, so they run one after the other; each is warned once, mid-sweep, and
    # its next run resumes. Meanwhile this process runs the same sweep uninterrupted, as the reference.
    env = {**slurm, "MODELS": "llava", "WORKERS": "2",
           "SBATCH_ARGS": "--gres=none --cpus-per-task=2 --mem=400M --time=10 --signal=B:USR1@30"}
    proc = subprocess.run(["bash", "scripts/slurm/submit.sh", "perturb"], cwd=project, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stop = threading.Event()
    warner = threading.Thread(target=warn_each_task_at_work, args=(env, project, "conngeo-perturb", stop))
    warner.start()
    stages = Stages(project)
    try:
        stages("perturb", "--model", "llava", "--out", "uninterrupted")
    finally:
        sys.path.remove(str(project / "stages"))
    try:
        wait_for_jobs(env, timeout=600)
    finally:
        stop.set()
        warner.join()

    logs = "".join(p.read_text() for p in sorted((project / "logs" / "slurm").glob("*.out")))
    records = slurm_records(env, project)
    workers = [j for j in records if j["JobName"] == "conngeo-perturb"]
    joins = [j for j in records if j["JobName"] == "conngeo-perturb-join"]
    assert len(workers) == 2 and len(joins) == 1, records
    assert {j["JobState"] for j in records} == {"COMPLETED"}, logs
    restarts = [int(j["Restarts"]) for j in workers]
    assert restarts == [1, 1] and joins[0]["Restarts"] == "0", logs  # Slurm's own count of the requeues
    assert logs.count("requeueing: the next run resumes from the kept parts") == sum(restarts), logs
    assert joins[0]["StartTime"] >= max(j["EndTime"] for j in workers), records  # it waited for the last runs
    assert "verify perturb llava: ok, 48 images x 20 caption sets" in logs
    assert tree_digest(project / "data" / "perturb" / "llava") == tree_digest(project / "uninterrupted")
