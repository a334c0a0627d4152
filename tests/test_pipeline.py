"""End-to-end: the real dvc CLI on a copy of this project under the smoke profile."""

import getpass
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run, tree_digest

pytestmark = pytest.mark.e2e


def test_repro_writes_outputs_and_second_repro_is_noop(smoke_project):
    images = smoke_project / "data/images/toyfood"
    params = yaml.safe_load((smoke_project / "params.yaml").read_text())["toyworld"]["toyfood"]
    assert len(list(images.rglob("*.png"))) == params["shards"] * params["images_per_shard"]
    assert (smoke_project / "dvc.lock").is_file()
    before = tree_digest(smoke_project / "data")
    out = run("dvc", "repro", cwd=smoke_project).stdout
    assert "up to date" in out
    assert run("dvc", "status", cwd=smoke_project).stdout.strip() == "Data and pipelines are up to date."
    assert tree_digest(smoke_project / "data") == before
    assert not run("git", "status", "--porcelain", cwd=smoke_project).stdout.strip()  # outputs are git-ignored


def test_every_param_a_stage_reads_is_declared_in_its_stage(smoke_project):
    """What each stage read from params.yaml during the smoke repro (the strict reader records it) is declared in
    that stage's `params` in dvc.yaml, so that changing it reruns the stage: a declared section covers every
    key under it. Keys a stage reads are present in params.yaml, or the stage would have stopped."""
    import json
    import shlex

    lock = yaml.safe_load((smoke_project / "dvc.lock").read_text())["stages"]
    # cmd: python scripts/warm.py stages/<stage>.py ...; the stage logs its own argv, stages/<stage>.py ...
    declared = {" ".join(shlex.split(s["cmd"])[2:]): (name, set(s.get("params", {}).get("params.yaml", {})))
                for name, s in lock.items()}
    logged = [json.loads(line) for line in (smoke_project.parent / "params_read.jsonl").read_text().splitlines()]
    # every stage that reads params.yaml ran and logged (toyworld gets its settings on the command line)
    # a stage that runs workers (zoo: `--only NAME`) logs theirs too: they count as the stage's
    stage_of = lambda argv: max((cmd for cmd in declared if (argv + " ").startswith(cmd + " ")), key=len)  # noqa: E731
    silent = set(declared) - {stage_of(" ".join(entry["argv"])) for entry in logged}
    assert not [cmd for cmd in silent if "load_params" in (smoke_project / cmd.split()[0]).read_text()], silent
    undeclared = {}
    for entry in logged:
        name, keys = declared[stage_of(" ".join(entry["argv"]))]
        for read in entry["read"]:
            path = read.removesuffix("/keys")
            if not any(path == k or path.startswith(k + ".") for k in keys):
                undeclared.setdefault(name, []).append(read)
    assert not undeclared, f"read but not declared in dvc.yaml params: {undeclared}"


def test_committed_lock_records_the_pipelines_stages_only():
    """dvc.lock has an entry for every stage of dvc.yaml and for nothing else: DVC never removes the entry of a
    stage that dvc.yaml no longer has (the pretrain@ and zoo@<model> stages of before the zoo became one stage
    were left behind), and it reads and rewrites the whole file after every stage it runs."""
    stages = set(run("dvc", "stage", "list", "--all", "--name-only", cwd=ROOT).stdout.split())
    assert set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]) == stages


def push_clone_pull(project: Path, work: Path, url: str, config: dict[str, str] = {}) -> Path:
    """dvc push to `url`, git clone, dvc pull there; return the clone."""
    for where in (project,):
        run("dvc", "remote", "add", "--local", "-f", "-d", "test", url, cwd=where)
        for key, value in config.items():
            run("dvc", "remote", "modify", "--local", "test", key, value, cwd=where)
    run("dvc", "push", cwd=project)
    clone = work / "clone"
    run("git", "clone", "-q", project, clone, cwd=work)
    run("dvc", "remote", "add", "--local", "-f", "-d", "test", url, cwd=clone)
    for key, value in config.items():
        run("dvc", "remote", "modify", "--local", "test", key, value, cwd=clone)
    run("dvc", "pull", cwd=clone)
    return clone


def assert_same_data(project: Path, clone: Path):
    assert run("dvc", "status", cwd=clone).stdout.strip() == "Data and pipelines are up to date."
    assert tree_digest(clone / "data") == tree_digest(project / "data")


def test_push_pull_local_remote(smoke_project, tmp_path):
    clone = push_clone_pull(smoke_project, tmp_path, str(tmp_path / "remote"))
    assert_same_data(smoke_project, clone)


def test_default_remote_is_a_local_folder_outside_the_repo(smoke_project):
    out = run("dvc", "remote", "list", cwd=smoke_project).stdout
    assert "conngeo-dvc-remote" in out and "(default)" in out


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1 with a generated host key and a client key."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(binary):
        pytest.skip("sshd not installed (Debian: apt-get install openssh-server; .ci/run does this)")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here for its privilege-separation folder /run/sshd")
    d = tmp_path_factory.mktemp("ssh")
    for key in ("host", "client"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / key, cwd=d)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nPidFile {d / 'sshd.pid'}\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([binary, "-D", "-e", "-f", d / "sshd_config"], stderr=open(d / "log", "w"))
    for _ in range(100):  # wait up to ~10 s for the port, without sleeping on the clock
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            try:
                proc.wait(timeout=0.1)
                pytest.skip(f"sshd could not start: {(d / 'log').read_text()[-500:]}")
            except subprocess.TimeoutExpired:
                pass
    else:
        proc.kill()
        pytest.skip("sshd did not open its port in 10 s")
    yield {"port": port, "user": getpass.getuser(), "key": d / "client", "dir": d}
    proc.terminate()
    proc.wait(timeout=10)


def test_push_pull_ssh_remote(smoke_project, tmp_path, sshd):
    url = f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}{tmp_path / 'ssh-remote'}"
    clone = push_clone_pull(smoke_project, tmp_path, url, {"keyfile": str(sshd["key"])})
    assert_same_data(smoke_project, clone)
    assert any((tmp_path / "ssh-remote").rglob("*")), "nothing arrived on the SSH side"


def test_exp_run_with_other_seed(smoke_project, tmp_path):
    repo = tmp_path / "exp"
    shutil.copytree(smoke_project, repo)
    before = (repo / "data/images/toyfood/attributes.csv").read_text()
    # only the toyworld stage: the rest of the pipeline would rerun on the new world, which the
    # repro test already covers and CI has no time for twice
    run("dvc", "exp", "run", "-n", "seed1", "-S", "toyworld.toyfood.seed=1", "toyworld@toyfood", cwd=repo)
    assert (repo / "data/images/toyfood/attributes.csv").read_text() != before
    shown = run("dvc", "exp", "show", "-A", "--no-pager", "--csv", cwd=repo).stdout
    assert "seed1" in shown
    # scripts/compare_runs.py on an experiment's results/, read through a branch of it (here the same
    # verdicts: the report did not rerun)
    run("dvc", "exp", "branch", "seed1", "seed1-branch", cwd=repo)
    (tmp_path / "seed1.csv").write_text(run("git", "show", "seed1-branch:results/question.csv", cwd=repo).stdout)
    compared = run(sys.executable, "scripts/compare_runs.py", "results", str(tmp_path / "seed1.csv"), cwd=repo).stdout
    assert "0 verdicts differ" in compared and "rho moves by 0.000 on average" in compared


def test_report_outputs_and_offline_plots_page(smoke_project):
    results = smoke_project / "results"
    for rel in ("summary.csv", "summary.md", "question.csv", "question.md", "figures/question.png",
                "figures/patch_loss.png", "series/perturbation.csv", "examples/index.html"):
        assert (results / rel).is_file(), rel
    # the examples page shows the study's own images and each shown image's neighbours from the geometry stage
    page = (results / "examples/index.html").read_text()
    assert "not in this sample" not in page.lower() and list((results / "examples/thumbs").glob("*.jpg"))
    assert (smoke_project / "data/geometry/llava/neighbours.csv").is_file()
    run("dvc", "plots", "show", cwd=smoke_project)
    page = (smoke_project / "dvc_plots/index.html").read_text()
    assert "vegaEmbed" in page and "results_figures_question.png" in page
    assert "cdn.jsdelivr" not in page  # the offline template: no script comes from the network
