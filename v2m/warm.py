"""Warm starts for the flow runs of a worker host: a fork server that imported the heavy libraries once.

Each step of a team retrain is a flow run, and a process worker starts each one as a new Python process that
imports torch, transformers, diffusers, MLflow, Prefect... again: 4-10 s of CPU per step before any work.
`v2m stack worker` therefore starts, beside its Prefect worker, a *zygote*: a process that imports those
libraries once, then forks one child per flow run (a fork shares the imported modules; the child imports only
its commit's own code, from its checkout). The work pools' job command is `python -m v2m.warm run`
(infra/work-pools/), a small launcher: it hands its environment, folder and stdin/stdout/stderr to the
zygote, which forks a child that runs `prefect.engine` as `python -m prefect.engine` would; the launcher
forwards signals to the child and exits as the child exits. Without a zygote (no V2M_WARM_SOCKET, or nothing
answers there: a plain `prefect worker start`, compose, Kubernetes) the launcher becomes
`python -m prefect.engine` itself.

What the zygote must not do, and why:
- import numba (librosa's compiled kernels, which librosa loads lazily): numba fixes its cache folder at
  import, and each process must use its own (v2m/numba_cache.py);
- keep the project's modules (v2m, tasks, flows, models) for its children: a child runs its commit's code.
  The zygote's own module is v2m.warm, so a child drops every project module before it starts;
- start threads or touch CUDA: a forked child gets one thread and no usable CUDA context.
The zygote dies with its worker (it is the worker's child, in its process group); a child dies with its
launcher (the zygote kills it when the launcher's connection closes).
"""

from __future__ import annotations

import array
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import time

PRELOAD = (  # what the steps import (python -X importtime), none of which imports numba
    "numpy", "scipy.signal", "soundfile", "librosa", "torch", "safetensors.torch",
    "transformers", "transformers.models.musicgen_melody.modeling_musicgen_melody",
    "transformers.models.t5.modeling_t5", "transformers.models.encodec.modeling_encodec",
    "transformers.models.clap.modeling_clap", "transformers.models.speecht5.modeling_speecht5",
    "diffusers", "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
    "mlflow", "mlflow.tracking", "mlflow.pyfunc", "boto3", "dvc.repo", "prefect", "prefect.flow_engine",
    "prefect.deployments")
PROJECT = ("v2m", "tasks", "flows", "models")
ENGINE = "prefect.engine"


# --- the zygote ---------------------------------------------------------------------------------------------

def preload(modules: tuple[str, ...] | list[str]) -> list[str]:
    """Import what can be imported; returns the modules that could not (e.g. diffusers on a CPU-only host)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
        if "numba" in sys.modules:
            raise RuntimeError(f"preloading {name} imported numba; leave it out of the zygote (see v2m/warm.py)")
    return missing


def serve(path: str, modules: tuple[str, ...] | list[str] = PRELOAD) -> int:
    """Fork a child per launcher connecting to `path`. Returns 0 when the worker that started it is gone; in a
    child, returns the child's exit status (the caller exits with it)."""
    started = time.perf_counter()
    missing = preload(modules)
    print(f"v2m.warm: {len(modules) - len(missing)} modules preloaded in {time.perf_counter() - started:.1f} s"
          + (f" (not installed: {', '.join(missing)})" if missing else ""), file=sys.stderr, flush=True)
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    parent, selector, children = os.getppid(), selectors.DefaultSelector(), {}
    selector.register(listener, selectors.EVENT_READ)
    while os.getppid() == parent:
        for key, _ in selector.select(timeout=0.2):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                request, fds = _receive(conn)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:  # the child: become the launcher's process, run its module, exit with its status
                    selector.close()
                    listener.close()
                    for other in [conn, *children.values()]:
                        other.close()
                    _become(request, fds)
                    return _run(request)
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"{pid}\n".encode())
                children[pid] = conn
                selector.register(conn, selectors.EVENT_READ)
            elif not key.fileobj.recv(1):  # a launcher went away (killed): its child goes too
                _signal(next(p for p, c in children.items() if c is key.fileobj), signal.SIGKILL)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = children.pop(pid)
                selector.unregister(conn)
                try:
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:  # its launcher is gone already
                    pass
                conn.close()
    for pid in children:  # the worker is gone: so is this host's work
        _signal(pid, signal.SIGKILL)
    return 0


def _become(request: dict, fds: list[int]) -> None:
    """Turn this fresh child into the process `python -m <module>` would have been for the launcher."""
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT]:
        del sys.modules[name]  # the commit's own code is imported afresh, from its checkout
    context = sys.modules.get("prefect.context")
    if context is not None:  # Prefect read its settings at import, from the zygote's environment
        context.refresh_global_settings_context()
    sys.argv = [request["module"], *request["argv"]]
    sys.path[0] = request["cwd"]  # as `python -m` sets it


def _run(request: dict) -> int:
    import runpy
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """A launcher's request (one JSON line: env, cwd, module, argv) and its stdin, stdout and stderr."""
    fds = array.array("i")
    data, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return json.loads(data), list(fds)


# --- the launcher (the work pools' job command) ---------------------------------------------------------------

def launch(module: str = ENGINE, argv: list[str] | None = None) -> int:
    """Run `module` in a child of this host's zygote (same environment, folder and standard streams) and
    return its exit status; without a zygote, become `python -m module`."""
    argv = argv or []
    path = os.environ.get("V2M_WARM_SOCKET", "")
    conn = _connect(path)
    if conn is None:
        if path:
            print(f"v2m.warm: cold start (no zygote answers at {path})", file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, "-m", module, *argv])
    request = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "module": module, "argv": argv}) + "\n"
    conn.sendmsg([request.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    reply = conn.makefile("r")
    pid = int(reply.readline())
    print(f"v2m.warm: warm start, process {pid} forked from the zygote", file=sys.stderr, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # cancellation reaches the flow run
        signal.signal(sig, lambda s, _f: _signal(pid, s))
    line = reply.readline()
    if not line.startswith("exit "):
        print(f"v2m.warm: the zygote went away while flow run process {pid} ran", file=sys.stderr)
        return 1
    code = int(line.split()[1])
    if code < 0:  # killed by a signal: end the same way, so the worker sees what happened
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _connect(path: str) -> socket.socket | None:
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    return conn


def host(path: str, command: list[str]) -> None:
    """`v2m stack worker`'s entry: fork the zygote, then become the worker (`command`), so the zygote is the
    worker's child: it dies with it, and a killed host takes both (v2m/stack.py stop(kill=True))."""
    if os.fork() == 0:
        code = serve(path)
        sys.exit(code)
    os.environ["V2M_WARM_SOCKET"] = path
    os.execvp(command[0], command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        return launch(*(argv[1:2] or [ENGINE]), argv=argv[2:])
    if argv[:1] == ["host"] and "--" in argv:
        split = argv.index("--")
        host(argv[1], argv[split + 1:])
    if argv[:1] == ["serve"]:
        return serve(argv[1], argv[2].split(",") if len(argv) > 2 else PRELOAD)
    print("usage: python -m v2m.warm run [MODULE [ARGS...]] | host SOCKET -- WORKER COMMAND | serve SOCKET [MODULES]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
