"""scripts/system-deps.sh, the system step of `make test` / `make demo`, against stub commands.

``dpkg``, ``apt-get``, ``id`` and ``sudo`` are small scripts in ``tmp_path`` put first on PATH:
they record their arguments, so nothing here touches the real system.
"""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system-deps.sh"
BASH = shutil.which("bash")
ALL = (  # noqa: SIM905 - the packages as scripts/system-deps.sh lists them
    "xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 "
    "libxkbcommon-x11-0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-image0 libgl1 "
    "libegl1 libfontconfig1 libdbus-1-3"
).split()

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or BASH is None,
    reason="the script's Linux paths; needs bash",
)


def _stub(folder: Path, name: str, body: str) -> None:
    p = folder / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake(tmp_path):
    """A stub folder; ``run(...)`` runs the script with it first on PATH."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    log.touch()

    def setup(*, uid=1000, missing=(), sudo=None, debian=True, extra=()):
        installed = " ".join(p for p in ALL if p not in missing)
        _stub(bin_, "id", f'[ "$1" = -u ] && echo {uid} || echo "uid={uid}"')
        for name in extra:
            _stub(bin_, name, "exit 0")
        if debian:
            _stub(
                bin_,
                "dpkg",
                f"""
case " {installed} " in
  *" $2 "*) printf 'Package: %s\\nStatus: install ok installed\\n' "$2" ;;
  *) echo "dpkg-query: package '$2' is not installed" >&2; exit 1 ;;
esac""",
            )
            _stub(bin_, "apt-get", f'echo "apt-get $* FRONTEND=$DEBIAN_FRONTEND" >> {log}')
        if sudo == "password":
            _stub(bin_, "sudo", "echo 'sudo: a password is required' >&2; exit 1")
        elif sudo == "nopasswd":
            _stub(bin_, "sudo", f'echo "sudo $*" >> {log}; [ "$1" = -n ] && shift; exec "$@"')

    def run(*args, path=None):
        if path is None:
            path = f"{bin_}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("MICROCLF_SKIP_SYSTEM_DEPS", "DEBIAN_FRONTEND")
        }
        env["PATH"] = path
        r = subprocess.run(
            [BASH, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30
        )
        return r, log.read_text().splitlines()

    return setup, run, bin_


def test_not_root_without_sudo_prints_one_command_and_fails(fake):
    setup, run, _ = fake
    setup(uid=1000, missing=("xvfb", "libxcb-cursor0"), sudo="password")
    r, calls = run()
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].endswith(
        "sudo apt-get update && sudo apt-get install -y --no-install-recommends xvfb libxcb-cursor0"
    )
    assert "make test" in lines[0]
    assert calls == []  # apt-get never ran


def test_root_installs_only_the_missing_packages(fake):
    setup, run, _ = fake
    setup(uid=0, missing=("xvfb", "libxcb-cursor0", "libegl1"))
    r, calls = run()
    assert r.returncode == 0, r.stderr
    assert calls == [
        "apt-get update -qq FRONTEND=",
        "apt-get install -y -qq --no-install-recommends xvfb libxcb-cursor0 libegl1 "
        "FRONTEND=noninteractive",
    ]
    assert "xvfb libxcb-cursor0 libegl1" in r.stdout


def test_password_less_sudo_is_used(fake):
    setup, run, _ = fake
    setup(uid=1000, missing=("xauth",), sudo="nopasswd")
    r, calls = run()
    assert r.returncode == 0, r.stderr
    assert "apt-get install -y -qq --no-install-recommends xauth FRONTEND=noninteractive" in calls
    assert any(c.startswith("sudo -n env DEBIAN_FRONTEND=noninteractive apt-get") for c in calls)


def test_nothing_missing_is_silent(fake):
    setup, run, _ = fake
    setup(uid=1000, sudo="password")
    r, calls = run()
    assert (r.returncode, r.stdout, r.stderr, calls) == (0, "", "", [])


def test_a_window_needs_no_xvfb(fake):
    setup, run, _ = fake
    setup(uid=1000, missing=("xvfb", "xauth"), sudo="password")
    r, calls = run("--window")
    assert (r.returncode, r.stderr, calls) == (0, "", [])
    setup(uid=1000, missing=("xvfb", "libgl1"), sudo="password")
    r, _ = run("--window")
    assert r.returncode == 1 and r.stderr.strip().endswith("--no-install-recommends libgl1")
    assert "make demo" in r.stderr


def test_not_debian(fake, tmp_path):
    """No dpkg/apt-get: stop with one line unless Xvfb is there already."""
    setup, run, bin_ = fake
    setup(debian=False)
    (bin_ / "uname").symlink_to(shutil.which("uname"))
    r, _ = run(path=str(bin_))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "not Debian/Ubuntu" in r.stderr and "libxcb-cursor" in r.stderr
    setup(debian=False, extra=("dnf",))
    r, _ = run(path=str(bin_))
    assert r.returncode == 1
    assert "sudo dnf install -y xorg-x11-server-Xvfb xorg-x11-xauth xcb-util-wm" in r.stderr
    setup(debian=False, extra=("dnf", "Xvfb"))
    r, _ = run(path=str(bin_))
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1
    assert "not checked" in r.stdout


@pytest.mark.parametrize("system", ["Darwin", "MINGW64_NT-10.0-19045"])
def test_macos_and_windows_need_nothing(fake, system):
    setup, run, bin_ = fake
    setup(debian=False)
    _stub(bin_, "uname", f"echo {system}")
    r, _ = run()
    assert r.returncode == 0 and "Xvfb is Linux-only" in r.stdout and "native display" in r.stdout


def test_package_metadata_as_the_hub_reads_it():
    """One version (the package's ``__version__``), an SPDX license with its file, and the
    classifiers the napari hub filters on."""
    from importlib.metadata import distribution

    import napari_microclf

    meta = distribution("napari-microclf").metadata
    assert meta["Version"] == napari_microclf.__version__
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    classifiers = set(meta.get_all("Classifier"))
    assert {"Framework :: napari", "Operating System :: OS Independent"} <= classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert not any(c.startswith("License ::") for c in classifiers)  # the SPDX field says it
