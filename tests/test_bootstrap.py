"""tools/python312.sh -> tools/bootstrap.sh on a machine without Python 3.12 (simulated by PATH).

Every run gets a clean environment: PATH is one stub directory (a few coreutils and, per test, a
fake python3 that says it is not 3.12, and a fake uv), HOME and PYENV_ROOT are empty temporary
directories, pip's configuration files are off and its index is http://127.0.0.1:9/simple (a
closed loopback port), so nothing here reaches a real host.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from experiments import launch_tpu

ROOT = Path(__file__).resolve().parents[1]
PY312_SH = ROOT / "tools" / "python312.sh"
BASH = shutil.which("bash")
DEAD_INDEX = "http://127.0.0.1:9/simple"

pytestmark = pytest.mark.skipif(
    any(Path(p).exists() for p in ("/usr/bin/python3.12", "/usr/local/bin/python3.12")),
    reason="python312.sh looks at /usr/bin/python3.12 and /usr/local/bin/python3.12 by absolute "
           "path: a machine without 3.12 cannot be simulated by PATH here")


def _stub_dir(tmp_path: Path, *, python3: str | None = None, uv: str | None = None) -> Path:
    stub = tmp_path / "stub"
    stub.mkdir()
    for tool in ("mkdir", "rm", "mv", "dirname", "ls", "sort", "cp", "chmod"):
        os.symlink(shutil.which(tool), stub / tool)
    for name, body in (("python3", python3), ("uv", uv)):
        if body is not None:
            (stub / name).write_text(f"#!{BASH}\n" + textwrap.dedent(body))
            (stub / name).chmod(0o755)
    return stub


def _env(tmp_path: Path, stub: Path, **extra) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (tmp_path / "no-pyenv").mkdir(exist_ok=True)
    env = {"PATH": str(stub), "HOME": str(home), "PYENV_ROOT": str(tmp_path / "no-pyenv"),
           "PIP_INDEX_URL": DEAD_INDEX, "UV_INDEX_URL": DEAD_INDEX, "PIP_CONFIG_FILE": os.devnull,
           "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
           "UV_PYTHON_INSTALL_MIRROR": "http://127.0.0.1:9/python", "UV_OFFLINE": "1",
           "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def _run(env) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(PY312_SH)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


# A python3 that answers python312.sh's version check with "not 3.12" and is a real Python (the
# one running the tests) for anything else, so pip really runs against the dead index.
OLD_PYTHON3 = f"""\
case "$*" in *version_info*) exit 1;; esac
exec {sys.executable} "$@"
"""


def test_no_312_and_no_index_takes_the_install_path_and_fails_in_one_line(tmp_path):
    env = _env(tmp_path, _stub_dir(tmp_path, python3=OLD_PYTHON3))
    t0 = time.monotonic()
    r = _run(env)
    assert time.monotonic() - t0 < 60
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("bootstrap: no Python 3.12 interpreter found (looked at:")
    assert any(l.startswith("bootstrap: no Python 3.12 on this machine: installing one with uv")
               for l in lines)
    assert any(l.startswith("bootstrap: installing uv:") and "pip install --target" in l
               for l in lines)
    errors = [l for l in lines if l.startswith("error:")]
    assert errors == [lines[-1]]
    assert errors[0].startswith(f"error: could not install uv from the package index ({DEAD_INDEX})")
    assert "PYTHON312=" in errors[0] and "install python3.12" in errors[0]
    log = Path(env["HOME"]) / ".cache" / "sparse-lm-bootstrap" / "pip-install-uv.log"
    assert str(log) in errors[0] and log.exists()
    assert not (log.parent / "uv").exists() and not (log.parent / "uv.partial").exists()


def test_no_python_with_pip_says_so(tmp_path):
    r = _run(_env(tmp_path, _stub_dir(tmp_path)))
    assert r.returncode != 0 and r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: uv is not installed and no python3 with pip was found")


def test_opt_out_keeps_the_old_error(tmp_path):
    r = _run(_env(tmp_path, _stub_dir(tmp_path, python3=OLD_PYTHON3), PYTHON312_NO_BOOTSTRAP="1"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: no Python 3.12 interpreter found") and "bootstrap:" not in r.stderr


def test_install_path_with_a_reachable_index_is_idempotent(tmp_path):
    """pip and uv faked (the index and the interpreter download are what the tests cannot reach):
    pip 'installs' a fake uv, uv 'installs' a 3.12 that is the real one running the tests."""
    calls = tmp_path / "calls.log"
    fake_uv = f"""\
    echo "uv $*" >> {calls}
    if [ "$1 $2" = "python install" ]; then
      d="$UV_PYTHON_INSTALL_DIR/cpython-3.12.99-linux-x86_64-gnu/bin"; mkdir -p "$d"
      printf '#!{BASH}\\nexec {sys.executable} "$@"\\n' > "$d/python3.12"; chmod +x "$d/python3.12"
      exit 0
    fi
    exit 2
    """
    (tmp_path / "fake_uv").write_text(f"#!{BASH}\n" + textwrap.dedent(fake_uv))
    python3 = f"""\
    case "$*" in *version_info*) exit 1;; esac
    if [ "$1 $2 $3" = "-m pip install" ]; then
      echo "pip $*" >> {calls}
      while [ "$1" != --target ]; do shift; done
      mkdir -p "$2/bin" && cp {tmp_path / "fake_uv"} "$2/bin/uv" && chmod +x "$2/bin/uv"; exit 0
    fi
    exec {sys.executable} "$@"
    """
    env = _env(tmp_path, _stub_dir(tmp_path, python3=python3))
    boot = Path(env["HOME"]) / ".cache" / "sparse-lm-bootstrap"
    py = boot / "python" / "cpython-3.12.99-linux-x86_64-gnu" / "bin" / "python3.12"

    first = _run(env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(py)
    assert "bootstrap: installing uv:" in first.stderr
    assert f"bootstrap: installed uv: {boot / 'uv' / 'bin' / 'uv'}" in first.stderr
    assert "bootstrap: installing Python 3.12: " in first.stderr
    assert f"bootstrap: installed Python 3.12: {py}" in first.stderr
    assert [l.split()[0] for l in calls.read_text().splitlines()] == ["pip", "uv"]

    second = _run(env)
    assert second.returncode == 0 and second.stdout.strip() == str(py)
    assert "found Python 3.12 installed by an earlier bootstrap" in second.stderr
    assert "installing" not in second.stderr
    assert len(calls.read_text().splitlines()) == 2

    shutil.rmtree(boot / "python")
    third = _run(env)
    assert third.returncode == 0 and third.stdout.strip() == str(py)
    assert "using uv installed by an earlier bootstrap" in third.stderr
    assert [l.split()[0] for l in calls.read_text().splitlines()] == ["pip", "uv", "uv"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_launcher_install_step_is_idempotent_and_says_what_it_did(tmp_path):
    (tmp_path / "Makefile").write_text(".venv/.installed:\n\tmkdir -p .venv && touch $@\n")
    cmd = dict(launch_tpu.tpu_commands("r", "v5p-8", "z", steps=["install"],
                                       remote_dir=str(tmp_path)))["install"][-1]
    assert "make .venv/.installed" in cmd
    runs = [subprocess.run([BASH, "-c", cmd], capture_output=True, text=True, timeout=60)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0]
    assert runs[0].stdout.strip().splitlines()[-1] == "install: .venv/.installed built from requirements.txt"
    assert runs[1].stdout.strip() == ("install: .venv is up to date with requirements.txt and "
                                      "setup.py (nothing to do)")
