"""Run a stage script in a warm interpreter: `python scripts/warm.py stages/geometry.py --model llava`.

Every stage is a fresh `python` process, and before its work starts it imports torch, transformers and the
model families' modules (benchmarks/stage_overhead.py measures how long): over the stages of the default
study that adds up. This wrapper hands the script to a server that has imported those libraries once and
forks a child per script: the child takes this process's arguments, working directory, environment and
stdin/stdout/stderr, imports the project's own code fresh and runs the script as `python script args` would;
this process forwards SIGINT/SIGTERM to it and exits with its exit status, and when this process dies
(SIGKILL) the child kills itself. The results are the same: the same code runs on the same libraries, only
their import is shared.

The server imports third-party libraries only (PRELOAD; the families' transformers modules come from
conngeo/families/registry.py, read as data), never conngeo or the stage scripts, so an edited source file is
always the one that runs. It is keyed by the interpreter and the environment (a changed variable gets a
server of its own), listens on a socket that only this user can open, and exits IDLE seconds after its last
script ended. When it is not running yet, the script runs here directly while the server starts in the
background for the next one; with CONNGEO_WARM=0, or where there is no fork (Windows), always.
"""

import gc
import hashlib
import json
import os
import runpy
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

IDLE = 30  # seconds a server waits for the next script
# the model families' transformers modules, from their registry (plain data: read without importing conngeo)
REGISTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "conngeo", "families", "registry.py")
FAMILY_MODULES = tuple(m for _, modules in runpy.run_path(REGISTRY)["FAMILIES"].values() for m in modules)
PRELOAD = ("numpy", "torch", "transformers", "transformers.modeling_utils", "transformers.generation",
           *FAMILY_MODULES,
           "transformers.models.clip.modeling_clip", "transformers.models.siglip.modeling_siglip",  # zoo, references
           "transformers.models.dinov2.modeling_dinov2", "transformers.models.roberta.modeling_roberta",
           "tokenizers", "safetensors.torch", "PIL.Image", "pandas", "scipy.stats", "typer", "yaml", "tqdm",
           "dvclive", "bert_score", "matplotlib.pyplot", "matplotlib.backends.backend_agg", "sklearn.linear_model",
           "pydantic.main", "PIL.ImageDraw", "dvc.repo", "transformers.models.bert.modeling_bert")


# what changes from one command to the next without changing what an import does: DVC names each stage in
# DVC_STAGE, pytest each test (the script still sees them: it gets the whole environment)
PER_COMMAND = ("DVC_STAGE", "PYTEST_CURRENT_TEST", "PWD", "OLDPWD", "SHLVL", "_")


def address() -> str:
    """The socket of the server for this interpreter, environment and warm.py (and this user)."""
    env = sorted((k, v) for k, v in os.environ.items() if k not in PER_COMMAND)
    with open(__file__, "rb") as own:  # an edited warm.py gets a server of its own
        key = hashlib.sha256(repr((sys.executable, sys.path, env, own.read())).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"conngeo-warm-{os.getuid()}-{key}.sock")


def send(conn: socket.socket, data: bytes) -> None:
    conn.sendall(struct.pack("!I", len(data)) + data)


def receive(conn: socket.socket) -> bytes:
    size = struct.unpack("!I", recv_exactly(conn, 4))[0]
    return recv_exactly(conn, size)


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


# -- the server -------------------------------------------------------------------------------------------

def serve(path: str) -> None:
    """Import PRELOAD, then fork a child per connection; exit IDLE seconds after the last child ended."""
    import fcntl
    import importlib
    # one server per address: every client that finds none starts one, and on a cold machine a dozen
    # servers importing torch at once would starve the scripts (and each other) of the CPU
    lock = open(f"{path}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    del sys.path[0]  # this folder: a script of it must not shadow a library module
    os.environ["MPLBACKEND"] = "Agg"
    for name in PRELOAD:  # any failure ends the server (a half-imported module must not reach a script)
        importlib.import_module(name)
    gc.freeze()  # the libraries' objects: a child's garbage collector neither scans nor copies them
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    old = os.umask(0o077)
    listener.bind(tmp)
    os.umask(old)
    listener.listen(16)
    os.replace(tmp, path)  # appears ready-to-serve, atomically
    inode = os.stat(path).st_ino
    children, idle_since = set(), time.monotonic()
    listener.settimeout(1.0)
    try:
        while children or time.monotonic() - idle_since < IDLE:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                conn = None
            children -= finished(children)
            if children:
                idle_since = time.monotonic()  # idle counts from the last script's end
            if conn is None:
                continue
            pid = os.fork()
            if pid == 0:
                try:
                    listener.close()
                    lock.close()
                    child(conn)
                finally:
                    os._exit(1)  # never back into the server's loop
            children.add(pid)
            conn.close()
    finally:
        if os.path.exists(path) and os.stat(path).st_ino == inode:  # not a successor's socket
            os.unlink(path)


def finished(children: set[int]) -> set[int]:
    """The children that have exited (reaped, so that none lingers as a zombie)."""
    done = set()
    for pid in children:
        if os.waitpid(pid, os.WNOHANG)[0]:
            done.add(pid)
    return done


def child(conn: socket.socket) -> None:
    """Become the client's script: its fds, directory, environment and argv; report the exit status."""
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    request = json.loads(msg)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    sys.stdin, sys.stdout, sys.stderr = (open(i, mode, closefd=False, buffering=1 if i else -1)
                                         for i, mode in ((0, "r"), (1, "w"), (2, "w")))
    send(conn, str(os.getpid()).encode())
    threading.Thread(target=die_with_client, args=(conn,), daemon=True).start()
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        if not isinstance(err.code, (int, type(None))):
            print(err.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    import atexit
    threading._shutdown()  # what the interpreter does at exit: wait for the script's threads, then atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    send(conn, str(code).encode())
    os._exit(code)


def die_with_client(conn: socket.socket) -> None:
    """Kill this script (and whatever it started) when its client is gone: a SIGKILL of `dvc repro` and its
    process group (a node failure, Slurm's wall-clock limit) reaches the client only, never this fork."""
    while conn.recv(1):  # the client sends nothing more: only its exit ends the wait
        pass
    os.killpg(0, signal.SIGKILL)  # the script's process group (this child called setsid)


# -- the client -------------------------------------------------------------------------------------------

def run_here(argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, *argv])


def start_server(path: str) -> None:
    subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", path], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--serve":
        return serve(argv[1])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python scripts/warm.py STAGE_SCRIPT [ARGS]...\n\n" + __doc__)
        return
    if os.environ.get("CONNGEO_WARM") == "0" or not hasattr(os, "fork"):
        run_here(argv)
    path = address()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        start_server(path)
        run_here(argv)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    try:
        pid = int(receive(conn))
    except (ConnectionError, struct.error, ValueError):
        conn.close()
        run_here(argv)  # the server went away before forking: run it here
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _: os.kill(pid, s))
    try:
        code = int(receive(conn))
    except (ConnectionError, ValueError):
        code = 1  # the script died without reporting (killed)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
