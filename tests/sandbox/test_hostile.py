"""The zoo of hostile programs. Each one: a non-passing status within its timeout plus a small margin,
the service still serves the next request, and no process or file outlives the run."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from services.sandbox.client import AssertTests, RunResult, Status, StdioCase, StdioTests
from tests.sandbox.conftest import MARGIN_S, SECRET, Sandbox


def contained(sandbox: Sandbox, code: str, timeout_s: float = 1.0, **kwargs: object) -> RunResult:
    workers = sandbox.worker_pids()
    started = time.monotonic()
    result = sandbox.run(code, timeout_s=timeout_s, **kwargs)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    assert not result.passed and result.status is not Status.PASSED, result
    assert elapsed < timeout_s + MARGIN_S, f"took {elapsed:.2f}s for a {timeout_s}s limit"
    sandbox.assert_clean()
    assert sandbox.worker_pids() == workers, "a worker died"
    sandbox.assert_serving()
    return result


def test_infinite_loop(sandbox: Sandbox):
    assert contained(sandbox, "while True:\n    pass\n").status is Status.TIMEOUT


def test_signals_ignored_and_c_level_sleep(sandbox: Sandbox):
    code = (
        "import signal, time\n"
        "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGXCPU, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "time.sleep(1000)\n"
    )
    assert contained(sandbox, code).status is Status.TIMEOUT


def test_c_level_loop_without_signal_checks(sandbox: Sandbox):
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nsum(range(10**15))\n"
    assert contained(sandbox, code).status is Status.TIMEOUT


def test_fork_bomb(sandbox: Sandbox):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert contained(sandbox, code, timeout_s=2.0).status is Status.TIMEOUT


def test_thread_bomb(sandbox: Sandbox):
    code = (
        "import threading, time\n"
        "while True:\n"
        "    try:\n"
        "        threading.Thread(target=time.sleep, args=(1000,)).start()\n"
        "    except Exception:\n"
        "        pass\n"
    )
    assert contained(sandbox, code, timeout_s=2.0).status is Status.TIMEOUT


def test_memory_bomb_at_once(sandbox: Sandbox):
    result = contained(sandbox, "x = bytearray(50 * 1024**3)\n", timeout_s=5.0, memory_mb=256)
    assert result.status is Status.MEMORY


def test_memory_bomb_gradual(sandbox: Sandbox):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 1024**2))\n"
    result = contained(sandbox, code, timeout_s=5.0, memory_mb=256)
    assert result.status is Status.MEMORY


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_runaway_output(sandbox: Sandbox, stream: str):
    code = f"import sys\nwhile True:\n    sys.{stream}.write('x' * 4096)\n"
    result = contained(sandbox, code, timeout_s=5.0)
    assert result.status is Status.OUTPUT_LIMIT
    assert len(getattr(result, stream)) <= sandbox.core.settings.return_output_bytes + 100


def test_disk_filling_one_file(sandbox: Sandbox):
    code = "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 1024 * 1024)\n"
    contained(sandbox, code, timeout_s=5.0)


def test_disk_filling_many_files(sandbox: Sandbox):
    code = (
        "import os\n"
        "for i in range(10**7):\n"
        "    with open(f'f{i}', 'wb') as f:\n"
        "        f.write(os.urandom(64 * 1024))\n"
    )
    contained(sandbox, code, timeout_s=5.0)


def test_directory_trees_deeper_than_any_path_or_recursion_limit(sandbox: Sandbox):
    """Nested by chdir far past PATH_MAX and the recursion limit, with locked directories, a read-only
    file and a symlink out: all removed after the run, and the next run starts in an empty dir."""
    code = (
        "import os\n"
        "os.symlink('/usr', 'out')\n"
        "os.mkdir('locked'); open('locked/x', 'w').close(); os.chmod('locked', 0)\n"
        "for i in range(5000):\n"
        "    os.mkdir('d' * 40)\n"
        "    os.chdir('d' * 40)\n"
        "    if i % 1000 == 999:\n"
        "        open('ro', 'w').close(); os.chmod('ro', 0o400); os.chmod('..', 0o500)\n"
        "print(i + 1)\n"
        "assert False\n"
    )
    result = contained(sandbox, code, timeout_s=20.0)
    assert result.stdout.split() == ["5000"], result  # the whole tree was made: 200,000 bytes of path
    assert os.path.isdir("/usr/bin"), "the symlink was followed"
    after = sandbox.run(
        "import os\ndef f():\n    return os.listdir('.')\n", AssertTests("assert f() == []\n")
    )
    assert after.passed, after


def test_environment_and_proc_secrets_are_invisible(sandbox: Sandbox):
    assert os.environ.get("PSGPO_SANDBOX_TEST_SECRET") == SECRET  # the service's own environment has it
    code = (
        "import os, glob\n"
        "found = [repr(dict(os.environ))]\n"
        "for path in ['/proc/self/environ', '/proc/1/environ', f'/proc/{os.getppid()}/environ']"
        " + glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
        "    try:\n"
        "        found.append(open(path, 'rb').read().decode('latin-1'))\n"
        "    except OSError as exc:\n"
        "        found.append(type(exc).__name__)\n"
        "print('\\n'.join(found))\n"
        "assert False\n"
    )
    result = contained(sandbox, code)
    assert SECRET not in result.stdout and SECRET not in result.stderr
    assert "PSGPO_SANDBOX_TEST_SECRET" not in result.stdout


def test_writing_outside_its_directory(sandbox: Sandbox, tmp_path: Path):
    targets = [
        f"/tmp/psgpo-escape-{uuid.uuid4().hex}",
        f"/dev/shm/psgpo-escape-{uuid.uuid4().hex}",
        str(tmp_path / "escape"),
        str(Path(__file__).resolve().parents[2] / f"escape-{uuid.uuid4().hex}"),
    ]
    os.chmod(tmp_path, 0o777)  # even a world-writable directory stays out of reach
    code = (
        f"targets = {targets!r}\n"
        "written = []\n"
        "for t in targets:\n"
        "    try:\n"
        "        open(t, 'w').write('escaped')\n"
        "        written.append(t)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(written)\n"
        "assert False\n"
    )
    result = contained(sandbox, code)
    assert result.stdout.strip() == "[]", result.stdout
    assert not any(os.path.exists(t) for t in targets)


def test_reading_outside_its_directory(sandbox: Sandbox):
    code = (
        "import os\n"
        "readable = []\n"
        f"for path in ['/root', '/home', '/tmp', {str(Path(__file__).resolve().parents[2])!r}]:\n"
        "    try:\n"
        "        os.listdir(path)\n"
        "        readable.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(readable)\n"
        "assert False\n"
    )
    result = contained(sandbox, code)
    if sandbox.layer("landlock"):
        assert result.stdout.strip() == "[]", result.stdout


def test_network_to_a_loopback_listener(sandbox: Sandbox):
    if not (sandbox.layer("network namespace") or sandbox.layer("landlock") or sandbox.layer("seccomp")):
        pytest.skip("no network isolation layer is active on this kernel (see the startup log)")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            "outcomes = []\n"
            "for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):\n"
            "    try:\n"
            "        s = socket.socket(socket.AF_INET, kind)\n"
            "        s.settimeout(0.5)\n"
            f"        s.connect(('127.0.0.1', {port}))\n"
            "        s.send(b'hello')\n"
            "        outcomes.append('connected')\n"
            "    except OSError as exc:\n"
            "        outcomes.append(type(exc).__name__)\n"
            "print(outcomes)\n"
        )
        result = sandbox.run(code, timeout_s=3.0)
        assert "connected" not in result.stdout, result.stdout
        with pytest.raises(TimeoutError):
            listener.accept()
    sandbox.assert_clean()


def test_killing_the_parent_and_its_group(sandbox: Sandbox):
    code = (
        "import os, signal\n"
        "for target in (os.getppid(), 1):\n"
        "    for kill in (os.kill, os.killpg):\n"
        "        try:\n"
        "            kill(target, signal.SIGKILL)\n"
        "        except OSError:\n"
        "            pass\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)\n"
        "except OSError:\n"
        "    pass\n"
        "assert False\n"
    )
    contained(sandbox, code)


def test_killing_its_own_group_before_the_tests(sandbox: Sandbox):
    result = contained(sandbox, "import os, signal\nos.killpg(0, signal.SIGKILL)\ndef f():\n    return 1\n")
    assert result.status is Status.FAILED


def test_double_fork_daemon_does_not_survive(sandbox: Sandbox):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    try:\n"
        "        os.setsid()\n"
        "    except OSError:\n"
        "        pass\n"
        "    if os.fork() == 0:\n"
        "        while True:\n"
        "            time.sleep(0.1)\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
        "assert False\n"
    )
    contained(sandbox, code, timeout_s=3.0)


def test_daemon_left_behind_by_a_passing_program(sandbox: Sandbox):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.close(1)\n"
        "    os.close(2)\n"
        "    while True:\n"
        "        time.sleep(0.1)\n"
        "def f():\n"
        "    return 1\n"
    )
    result = sandbox.run(code, AssertTests("assert f() == 1\n"), timeout_s=3.0)
    assert result.passed, result
    sandbox.assert_clean()


def test_setuid_attempts(sandbox: Sandbox):
    code = (
        "import os\n"
        "outcomes = [os.getuid() != 0, os.geteuid() != 0]\n"
        "for call in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.setresuid(0, 0, 0),\n"
        "             lambda: os.setgroups([0]), lambda: os.seteuid(0)):\n"
        "    try:\n"
        "        call()\n"
        "        outcomes.append('escalated')\n"
        "    except OSError:\n"
        "        outcomes.append('denied')\n"
        "print(outcomes)\n"
        "assert False\n"
    )
    result = contained(sandbox, code)
    assert "escalated" not in result.stdout
    if sandbox.layer("separate uid"):
        assert result.stdout.startswith("[True, True"), result.stdout


def test_sudo_style_binaries_cannot_raise_privileges(sandbox: Sandbox):
    code = (
        "import subprocess\n"
        "try:\n"
        "    out = subprocess.run(['/bin/su', '-c', 'id'], capture_output=True, timeout=2, input=b'')\n"
        "    print(out.returncode, out.stdout)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
        "assert False\n"
    )
    result = contained(sandbox, code, timeout_s=3.0)
    assert "uid=0" not in result.stdout


def test_stdio_program_cannot_escape_either(sandbox: Sandbox):
    code = "import os\nwhile True:\n    os.fork()\n"
    started = time.monotonic()
    result = sandbox.run(code, StdioTests((StdioCase("", ""), StdioCase("", ""))), timeout_s=1.0)
    assert not result.passed and time.monotonic() - started < 1.0 + MARGIN_S
    sandbox.assert_clean()
    sandbox.assert_serving()
