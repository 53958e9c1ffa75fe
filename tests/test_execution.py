"""The code sandbox: right and wrong code, and hostile code that must be contained."""

import glob
import os
import tempfile

import pytest

from nanochat.execution import MAX_OUTPUT_BYTES, execute_code
from tasks.humaneval import HumanEval

AS_ROOT = os.getuid() == 0


def leftover_workdirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "nanochat-exec-*")))


@pytest.fixture
def data_mirror(shared_mirror, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", shared_mirror)


@pytest.fixture(autouse=True)
def workdirs_are_removed():
    before = leftover_workdirs()
    yield
    assert leftover_workdirs() <= before


def test_correct_code_passes_and_wrong_code_fails():
    solution = "def add(a, b):\n    return a + b\n"
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nprint('ok')\n"
    r = execute_code(solution + tests)
    assert r.success and r.stdout == "ok\n" and r.error is None
    r = execute_code("def add(a, b):\n    return a - b\n" + tests)
    assert not r.success and r.error == "AssertionError" and not r.timeout
    r = execute_code("def add(a, b)\n    return a + b\n")
    assert not r.success and "SyntaxError" in r.error


EARLY_EXITS = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit", "raise SystemExit(0)", "exit()",
               "quit()"]


@pytest.mark.parametrize("leave", EARLY_EXITS)
def test_leaving_before_the_end_is_not_a_pass(leave):
    r = execute_code(f"print('before')\n{leave}\nprint('after')\n")
    assert not r.success and r.error == "exited before the end of the program"
    assert "after" not in r.stdout  # it stopped where it said (os._exit even drops the buffered "before")


@pytest.mark.parametrize("leave", EARLY_EXITS)
def test_a_humaneval_completion_that_exits_early_scores_zero(data_mirror, leave):
    task = HumanEval()
    conversation = task[0]
    solution = conversation["messages"][-1]["content"]
    assert task.evaluate(conversation, solution) == 1  # the reference solution passes
    broken = "def " + conversation["entry_point"] + "(*args):\n    return None\n"
    assert task.evaluate(conversation, broken) == 0
    # The same wrong solution, leaving before the tests run, scores 0.
    assert task.evaluate(conversation, broken + leave + "\n") == 0


def test_infinite_loop_times_out():
    r = execute_code("while True:\n    pass\n", timeout=1.0)
    assert r.timeout and not r.success and r.error == "timed out"


def test_big_allocation_hits_the_memory_limit():
    r = execute_code("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", maximum_memory_bytes=256 * 1024 * 1024)
    assert r.memory_exceeded and not r.success and "allocated" not in r.stdout


def test_fork_bomb_is_refused():
    r = execute_code("import os\nwhile True:\n    os.fork()\n", timeout=3.0)
    assert not r.success and "disabled" in r.error


def test_deleting_files_outside_is_refused(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for code in [f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})"]:
        r = execute_code(code)
        assert not r.success
    assert victim.read_text() == "keep me"


def test_the_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    r = execute_code("import os\nprint(sorted(os.environ))")
    assert r.success and r.stdout == "['HOME', 'LANG', 'PATH']\n"
    # Its own environ, and (only when it runs as another user: see execution.py) the caller's.
    for path in ["/proc/self/environ"] + ([f"/proc/{os.getpid()}/environ"] if AS_ROOT else []):
        r = execute_code(f"print(open({path!r}, 'rb').read())")
        assert "hunter2" not in r.stdout


def test_killing_the_parent_is_refused():
    r = execute_code("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)")
    assert not r.success and "disabled" in r.error  # (and we are still here)


def test_spawning_a_shell_is_refused(tmp_path):
    marker = tmp_path / "shell_ran"
    for code in [f"import os\nos.system('touch {marker}')", f"import subprocess\nsubprocess.run(['sh', '-c', 'touch {marker}'])",
                 f"import pty\npty.spawn(['sh', '-c', 'touch {marker}'])"]:
        r = execute_code(code)
        assert not r.success
    assert not marker.exists()


def test_huge_output_is_capped():
    r = execute_code("while True:\n    print('x' * 10000)\n", timeout=5.0)
    assert not r.success and not r.timeout and "File too large" in r.error
    assert len(r.stdout) <= MAX_OUTPUT_BYTES


def test_stdin_is_closed():
    r = execute_code("import sys\nprint(repr(sys.stdin.read()))")
    assert r.success and r.stdout == "''\n"


@pytest.mark.skipif(not AS_ROOT, reason="the kernel-level containment (running as nobody) applies to root callers")
def test_the_kernel_contains_code_that_gets_past_the_guards(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    os.chmod(tmp_path, 0o755)  # readable by anyone, writable by root only
    r = execute_code(f"import posix\nposix.unlink({str(victim)!r})")  # posix.unlink is not the guarded os.unlink
    assert not r.success and "Permission denied" in r.error and victim.exists()
    r = execute_code("import posix\nfor _ in range(100):\n    posix.fork()\n", timeout=3.0)
    assert not r.success and "Resource temporarily unavailable" in r.error
    r = execute_code("import posix\nposix.kill(1, 9)")
    assert not r.success and "Operation not permitted" in r.error
