"""
Run untrusted Python (model-written HumanEval completions) in a separate, limited process.

    result = execute_code("print(1 + 1)")      # ExecutionResult(success=True, stdout="2\\n", ...)

What it does:
- a fresh `python -I` process (isolated mode: no site dir, no PYTHON* variables) in its own
  session and process group, with stdin closed, an empty environment but PATH, a new temporary
  working directory, removed afterwards;
- a pass means the program ran to its end: once the code returns, the runner writes a random
  token (which the code is never shown) to a file, and the caller compares it exactly. A program
  that leaves early (`sys.exit(0)`, `os._exit(0)`, `raise SystemExit`, `exit()`) has not passed,
  even where it meant to stop there (`sys.exit(main())`, `unittest.main()`);
- kernel limits, which the child sets on itself before the code runs (not in a preexec_fn, which
  is unsafe when the caller has threads, as a CUDA process does): address space
  (`maximum_memory_bytes`: a big allocation raises MemoryError there), CPU seconds, size of any
  file it writes (its stdout and stderr go to files, so output is capped at MAX_OUTPUT_BYTES each);
- a wall-clock timeout, after which the whole process group is killed (and it is killed once the
  code finishes too, so nothing it started lives on);
- run as root, it drops to the `nobody` user first: it then cannot write, delete or signal
  anything of the caller's, and a process limit of 1 makes fork bombs fail in the kernel;
- inside, before the code runs, the os/shutil/subprocess functions that destroy files, start or
  signal processes, or change the environment are replaced with ones that raise. That is a guard
  against accidents, not a wall: code can reach the originals (e.g. `import posix`), so without
  root (no `nobody`, no process limit) a deliberate fork bomb or file deletion is not stopped.

What it does not do: isolate the network or the file system from reading (the code can read
whatever the user it runs as can read, and as a non-root caller it runs as you and can write what
you can), stop a process that escaped the guards from writing into world-writable places such
as /tmp, or hide the token from code that goes looking for it in the runner's frames. For code
you do not trust at all, run this inside a container or VM as well.
"""

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 1 << 20  # per stream
MEMORY_ERROR_EXIT = 113  # the runner's exit status when the code ran out of memory

# The stdlib modules model-written code commonly imports: loaded before dropping to `nobody`, who
# may not be able to read the interpreter's own folders (e.g. under /root).
PRELOAD = ("math cmath re string collections itertools functools operator heapq bisect random statistics typing "
           "fractions decimal numbers hashlib json copy datetime time calendar array enum dataclasses textwrap "
           "unicodedata struct abc io")

# Executed by the child, as `RUNNER memory_bytes cpu_seconds [uid gid]`: set the kernel limits,
# take the token, become `nobody` if started as root, disable dangerous functions, run the code,
# and write the token only if the code returned.
RUNNER = r"""
import importlib, os, resource, shutil, signal, subprocess, sys

def main(memory, cpu, *user):
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too much output: a write error, not a silent kill
    with open("prog.py", encoding="utf-8") as f:
        source = f.read()
    with open("token") as f:
        token = f.read()
    os.remove("token")
    finished = os.open("finished", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    write = os.write
    if user:  # started as root: become nobody (uid, gid), allowed no child processes
        for module in "%s".split():
            importlib.import_module(module)
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
        os.setgroups([])
        os.setgid(user[1])
        os.setuid(user[0])
    guard()
    try:
        exec(compile(source, "prog.py", "exec"), {"__name__": "__main__"})
    except MemoryError:
        sys.stderr.write("MemoryError\n")
        sys.stderr.flush()
        os._exit(%d)
    write(finished, token.encode())

def guard():
    def refuse(name):
        def refused(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return refused

    for name in ["kill", "killpg", "system", "popen", "fork", "forkpty", "vfork", "remove", "unlink", "rmdir",
                 "removedirs", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "chown",
                 "fchown", "lchown", "chdir", "fchdir", "chroot", "putenv", "unsetenv", "setuid", "setgid",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp", "setsid", "setpgid", "nice"]:
        if hasattr(os, name):
            setattr(os, name, refuse("os." + name))
    shutil.rmtree = refuse("shutil.rmtree")
    shutil.move = refuse("shutil.move")
    subprocess.Popen = refuse("subprocess.Popen")
    for name in ["ctypes", "_ctypes", "multiprocessing", "resource", "pty"]:
        sys.modules[name] = None  # importing them fails

main(*map(int, sys.argv[1:]))
""" % (MAX_OUTPUT_BYTES, MAX_OUTPUT_BYTES, PRELOAD, MEMORY_ERROR_EXIT)


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None  # why it did not succeed, in a few words
    timeout: bool = False
    memory_exceeded: bool = False


def _read(path):
    with open(path, "rb") as f:
        return f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace")


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run `code` as a Python program under the limits above and report what happened."""
    run_as = pwd.getpwnam("nobody") if os.getuid() == 0 else None
    token = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="nanochat-exec-")
    try:
        if run_as is not None:
            os.chown(workdir, run_as.pw_uid, run_as.pw_gid)
        for name, text in (("prog.py", code), ("token", token)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        limits = [maximum_memory_bytes, int(timeout) + 1] + ([run_as.pw_uid, run_as.pw_gid] if run_as else [])
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", RUNNER, *map(str, limits)], cwd=workdir, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir},
                start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the code and anything it started
                except ProcessLookupError:
                    pass
                proc.wait()
        stdout, stderr = _read(out_path), _read(err_path)
        finished = os.path.exists(os.path.join(workdir, "finished")) and _read(os.path.join(workdir, "finished")) == token
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _outcome(proc.returncode, stdout, stderr, timed_out, finished)


def _outcome(returncode, stdout, stderr, timed_out, finished):
    if timed_out:
        return ExecutionResult(False, stdout, stderr, "timed out", timeout=True)
    if returncode == MEMORY_ERROR_EXIT:
        return ExecutionResult(False, stdout, stderr, "memory limit exceeded", memory_exceeded=True)
    if returncode == 0:
        if finished:
            return ExecutionResult(True, stdout, stderr)
        return ExecutionResult(False, stdout, stderr, "exited before the end of the program")
    if returncode < 0:
        reason = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGKILL: "killed"}.get(-returncode, f"signal {-returncode}")
        return ExecutionResult(False, stdout, stderr, reason)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
    return ExecutionResult(False, stdout, stderr, last)
