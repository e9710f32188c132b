"""The local set-up of README.md's first lines, as a new user meets it: ``make run`` (in a
real terminal, stopped with Ctrl-C), ``make status`` / ``check`` / ``retry`` in a second
shell, the one configuration file ``var/dropcut.toml`` they share, and ``pipx install .``.

Everything here is real: ``make`` and ``dropcut`` processes, a pseudo-terminal whose line
discipline turns the byte ``\\x03`` into the SIGINT of a user's Ctrl-C, files in tmp_path.
``make`` runs with ``VENV`` set to the virtualenv these tests run in, and ``-o`` on its
``dropcut`` so that it never installs it again; ``LOCAL`` points it at tmp_path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dropcut.settings import Settings, load_settings
from tests.fake_api import FakeWithoutBG
from tests.support import API_KEY, REPO, InProcessDaemon, drop, image_bytes, wait_for

VENV = Path(sys.prefix)
DROPCUT = VENV / "bin" / "dropcut"
BASE_CONFIG = REPO / "config" / "dropcut.toml"
FOLDERS = {
    "inbox": "inbox",
    "outbox": "outbox",
    "quarantine": "quarantine",
    "archive": "archive",
    "state_dir": "state",
}

pytestmark = [
    pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed"),
    pytest.mark.skipif(not DROPCUT.exists(), reason=f"dropcut is not installed in {VENV}"),
]


# --- helpers ------------------------------------------------------------------------------


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without dropcut's settings, pipx's and an outer make's
    (``make test`` runs pytest: its MAKEFLAGS would reach the make started here)."""
    drop_names = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "CREDENTIALS_DIRECTORY"}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DROPCUT_", "PIPX_")) and k not in drop_names and k != "STATE_DIRECTORY"
    }
    env.update(values)
    return env


def quiet_http() -> dict[str, str]:
    """No fixed status-page port (tests run side by side), where the setting exists."""
    return {"DROPCUT_HTTP_LISTEN": ""} if "http_listen" in Settings.model_fields else {}


def make_command(*args: str, local: Path, base: Path | None = None) -> list[str]:
    command = ["make", "--no-print-directory", "-o", str(DROPCUT), f"VENV={VENV}", f"LOCAL={local}"]
    if base is not None:
        command.append(f"BASE_CONFIG={base}")
    return [*command, *args]


def run_make(
    *args: str, local: Path, env: dict[str, str], base: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        make_command(*args, local=local, base=base),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_json(stdout: str) -> dict[str, Any]:
    """The configuration ``dropcut check`` printed (after any line of make's own)."""
    start = stdout.index("\n{") + 1 if not stdout.startswith("{") else 0
    data = json.loads(stdout[start:])
    assert isinstance(data, dict)
    return data


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} in {path}"
    path.write_text(text.replace(old, new))


def make_newer(path: Path, than: Path) -> None:
    """``path``'s mtime 10 s after ``than``'s, as if edited later (no sleep needed)."""
    later = than.stat().st_mtime + 10
    os.utime(path, (later, later))


class Terminal:
    """A program in a real pseudo-terminal, as its session leader (so in the foreground
    process group, like a command typed into a shell); its output collected as it comes."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: nothing but exec
            try:
                os.chdir(cwd)
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.raw = b""
        self.status: int | None = None
        self._eof = False

    @property
    def output(self) -> str:
        return self.raw.decode(errors="replace")

    def type(self, data: bytes) -> None:
        """Bytes typed at the keyboard (b"\\x03" is Ctrl-C, b"\\x1a" Ctrl-Z)."""
        os.write(self.fd, data)

    def foreground_group(self) -> int:
        return os.tcgetpgrp(self.fd)

    def _pump(self, timeout: float) -> None:
        if not self._eof:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: nobody has the terminal open any more
                    data = b""
                self.raw += data
                self._eof = not data
        else:
            time.sleep(timeout)
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)

    def expect(self, what: str, condition: Callable[[], Any], timeout: float) -> None:
        """Read the output until ``condition()`` holds; fail after ``timeout`` s or when the
        program ended without it."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self._eof and self.status is not None:
                raise AssertionError(f"{what}: the program ended ({self.status}) without it:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s:\n{self.output}")
            self._pump(0.05)

    def wait(self, timeout: float) -> int:
        """The exit status once the program ended and its output was read to the end."""
        self.expect("exit", lambda: self.status is not None and self._eof, timeout)
        assert self.status is not None
        return self.status

    def close(self) -> None:
        """Kill what is left of what this terminal ran: the program, and the process group
        that holds the terminal (dropcut's, once it took it)."""
        if self.status is None:
            with contextlib.suppress(OSError):
                group = os.tcgetpgrp(self.fd)
                if group not in (self.pid, os.getpgrp()):
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminals() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(argv: list[str], env: dict[str, str], cwd: Path = REPO) -> Terminal:
        terminal = Terminal(argv, env, cwd)
        opened.append(terminal)
        return terminal

    yield open_terminal
    for terminal in opened:
        terminal.close()


def run_env(api: FakeWithoutBG) -> dict[str, str]:
    """What a user sets for ``make run`` (the key), plus what points it at the fake API and
    makes it quick; the folders come from var/dropcut.toml alone."""
    return clean_env(
        DROPCUT_API_KEY=API_KEY,
        DROPCUT_API_URL=api.url,
        DROPCUT_DEBOUNCE_SECONDS="0.2",
        DROPCUT_WATCH_MODE="native",
        **quiet_http(),
    )


def daemon_pid(output: str) -> int:
    found = re.search(r"daemon_started\S*\s.*?\bpid=(\d+)", output)
    assert found, output
    return int(found.group(1))


# --- var/dropcut.toml ---------------------------------------------------------------------


def test_make_check_writes_the_local_config_that_dropcut_check_accepts(tmp_path: Path) -> None:
    local = tmp_path / "var"
    config = local / "dropcut.toml"
    done = run_make("check", local=local, env=clean_env(DROPCUT_API_KEY="dummy-key"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"make: wrote {config}" in done.stdout
    assert "configuration OK" in done.stderr
    via_make = check_json(done.stdout)

    # README's second-shell command, from another directory, the key now in var/api-key
    (local / "api-key").write_text("file-key\n")
    direct = subprocess.run(
        [str(DROPCUT), "check", "--config", str(config)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert direct.returncode == 0, direct.stderr
    assert "configuration OK" in direct.stderr
    effective = json.loads(direct.stdout)
    assert via_make.pop("api_key") == "**********"  # from DROPCUT_API_KEY
    assert effective.pop("api_key") is None  # the key file is read when the key is used
    assert effective == via_make
    for key, name in FOLDERS.items():
        assert effective[key] == str(local / name)
        assert (local / name).is_dir()
    assert effective["api_key_file"] == str(local / "api-key")

    # everything else is config/dropcut.toml's
    base = subprocess.run(
        [str(DROPCUT), "check", "--config", str(BASE_CONFIG)],
        cwd=REPO,
        env=clean_env(DROPCUT_API_KEY="dummy-key"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    from_base = json.loads(base.stdout)  # printed although /srv/dropcut is refused
    from_base.pop("api_key")
    assert {k for k in effective if effective[k] != from_base[k]} == {*FOLDERS, "api_key_file"}


def test_the_local_config_follows_its_base_but_an_edited_copy_is_kept(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    shutil.copyfile(BASE_CONFIG, base)
    local = tmp_path / "var"
    config = local / "dropcut.toml"
    env = clean_env(DROPCUT_API_KEY="dummy-key")
    assert run_make("check", local=local, base=base, env=env).returncode == 0

    # nothing changed: left alone
    again = run_make("check", local=local, base=base, env=env)
    assert again.returncode == 0 and "make: wrote" not in again.stdout

    # the base changed, the copy was not edited: written again
    replace_in(base, "debounce_seconds = 5.0", "debounce_seconds = 2.5")
    make_newer(base, config)
    done = run_make("check", local=local, base=base, env=env)
    assert done.returncode == 0, done.stderr
    assert f"make: wrote {config}" in done.stdout
    assert check_json(done.stdout)["debounce_seconds"] == 2.5

    # the user edits the copy, then the base changes again: the copy is kept, and make says so
    replace_in(config, 'log_level = "info"', 'log_level = "debug"')
    edited = config.read_text()
    replace_in(base, "debounce_seconds = 2.5", "debounce_seconds = 1.0")
    make_newer(base, config)
    kept = run_make("check", local=local, base=base, env=env)
    assert kept.returncode == 0, kept.stderr
    assert "make: wrote" not in kept.stdout
    assert f"make: {config} was edited, so it is kept as it is" in kept.stderr
    assert config.read_text() == edited
    effective = check_json(kept.stdout)
    assert effective["log_level"] == "debug" and effective["debounce_seconds"] == 2.5

    # deleted: written again from the base
    config.unlink()
    fresh = run_make("check", local=local, base=base, env=env)
    assert fresh.returncode == 0 and f"make: wrote {config}" in fresh.stdout
    assert check_json(fresh.stdout)["debounce_seconds"] == 1.0


def test_make_status_and_retry_use_the_local_config(tmp_path: Path, api: FakeWithoutBG) -> None:
    local = tmp_path / "var"
    env = clean_env(DROPCUT_API_KEY=API_KEY)
    assert run_make("check", local=local, env=env).returncode == 0  # writes it, makes the folders

    # a daemon on var/dropcut.toml quarantines a broken photo
    overrides: dict[str, Any] = {
        "api_url": api.url,
        "api_key": API_KEY,
        "debounce_seconds": 0.2,
        "corrupt_grace_seconds": 0.0,
        "watch_mode": "native",
        "log_format": "json",
    }
    if "http_listen" in Settings.model_fields:
        overrides["http_listen"] = ""
    settings = load_settings(local / "dropcut.toml", **overrides)
    assert settings.inbox == local / "inbox"
    with InProcessDaemon(settings):
        drop(local / "inbox", "broken.jpg", b"\xff\xd8\xff\xe0 not a photo" * 40)
        wait_for(lambda: (local / "quarantine" / "broken.jpg").exists())

    status = run_make("status", local=local, env=clean_env())
    assert status.returncode == 0, status.stderr
    assert re.search(r"\bquarantined 1\b", status.stdout), status.stdout

    usage = run_make("retry", local=local, env=clean_env())
    assert usage.returncode != 0
    assert "usage: make retry FILES=" in usage.stderr

    retried = run_make("retry", f"FILES={local / 'quarantine' / 'broken.jpg'}", local=local, env=clean_env())
    assert retried.returncode == 0, retried.stderr
    assert "requeued broken.jpg -> inbox/broken.jpg" in retried.stdout
    assert (local / "inbox" / "broken.jpg").exists()
    assert not (local / "quarantine" / "broken.jpg").exists()


# --- make run in a terminal -----------------------------------------------------------------


@pytest.mark.slow
def test_make_run_cuts_out_a_photo_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, api: FakeWithoutBG, terminals: Callable[..., Terminal]
) -> None:
    local = tmp_path / "var"
    terminal = terminals(make_command("run", local=local), run_env(api))
    terminal.expect("daemon_started", lambda: "daemon_started" in terminal.output, timeout=60)
    assert f"make: wrote {local / 'dropcut.toml'}" in terminal.output
    assert f"dropcut run --config {local / 'dropcut.toml'}" in terminal.output
    # dropcut holds the terminal in a process group of its own: a Ctrl-C reaches it alone
    assert terminal.foreground_group() == daemon_pid(terminal.output) != terminal.pid

    drop(local / "inbox", "photo.jpg", image_bytes("JPEG", (320, 240), seed=11))
    cutout = local / "outbox" / "photo.png"
    terminal.expect("the cut-out", cutout.exists, timeout=30)
    terminal.expect("the input archived", (local / "archive" / "photo.jpg").exists, timeout=30)

    # a second shell sees the same queue
    status = run_make("status", local=local, env=clean_env())
    assert status.returncode == 0, status.stderr
    assert re.search(r"\bdone 1\b", status.stdout), status.stdout

    terminal.type(b"\x03")
    assert terminal.wait(timeout=30) == 0, terminal.output
    assert "daemon_stopped" in terminal.output
    assert "*** Interrupt" not in terminal.output
    assert "Error" not in terminal.output


@pytest.mark.slow
def test_make_run_from_a_script_gives_the_terminal_back_and_ignores_ctrl_z(
    tmp_path: Path, api: FakeWithoutBG, terminals: Callable[..., Terminal]
) -> None:
    # The terminal's program is a script that runs make and, once make is done, says how
    # make ended and whether its own process group has the terminal again.
    script = (
        "import os, subprocess, sys\n"
        "code = subprocess.call(sys.argv[1:])\n"
        "print(f'make exited {code}; the script has the terminal: {os.tcgetpgrp(0) == os.getpgrp()}')\n"
    )
    local = tmp_path / "var"
    terminal = terminals([sys.executable, "-c", script, *make_command("run", local=local)], run_env(api))
    terminal.expect("daemon_started", lambda: "daemon_started" in terminal.output, timeout=60)
    assert terminal.foreground_group() == daemon_pid(terminal.output)

    # Ctrl-Z is ignored (dropcut's group stopped alone would hang the terminal), then Ctrl-C
    terminal.type(b"\x1a")
    terminal.type(b"\x03")
    assert terminal.wait(timeout=30) == 0, terminal.output
    assert "make exited 0; the script has the terminal: True" in terminal.output
    assert "KeyboardInterrupt" not in terminal.output
    assert "daemon_stopped" in terminal.output


# --- pipx install . ---------------------------------------------------------------------------


def _pypi_unreachable() -> str | None:
    """Why PyPI cannot be reached (pipx needs it for dropcut's dependencies), or None."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=15) as answer:
            answer.read(1)
    except (urllib.error.URLError, OSError) as exc:
        return f"PyPI is unreachable ({exc}); pipx installs dropcut's dependencies from it"
    return None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pipx_installs_dropcut_from_a_wheel(tmp_path: Path) -> None:
    unreachable = _pypi_unreachable()
    if unreachable:
        pytest.skip(unreachable)
    # the wheel is built from a copy of the sources: no build/ or egg-info in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "daemon", src / "daemon", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("dropcut-*.whl")

    pipx = tmp_path / "pipx"
    pipx_env = clean_env(
        PIPX_HOME=str(pipx / "home"),
        PIPX_BIN_DIR=str(pipx / "bin"),
        PIPX_MAN_DIR=str(pipx / "man"),
        USE_EMOJI="0",
    )
    installed = subprocess.run(
        [str(VENV / "bin" / "pipx"), "install", str(wheel)],
        env=pipx_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    dropcut = pipx / "bin" / "dropcut"
    assert dropcut.exists()
    # its own copy of dropcut, not this checkout's
    assert list((pipx / "home" / "venvs" / "dropcut").glob("lib/python*/site-packages/dropcut/cli.py"))

    # run as a user would: only the system's PATH, in a directory of their own
    user_env = clean_env(PATH="/usr/local/bin:/usr/bin:/bin", DROPCUT_API_KEY="dummy-key")
    user_env.pop("VIRTUAL_ENV", None)
    user_env.pop("PYTHONPATH", None)
    helped = subprocess.run(
        [str(dropcut), "--help"], cwd=tmp_path, env=user_env, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    assert "usage: dropcut" in helped.stdout and "check" in helped.stdout

    folders = tmp_path / "folders"
    (folders / "inbox").mkdir(parents=True)
    config = tmp_path / "dropcut.toml"
    config.write_text(
        "".join(f"{key} = '{folders / name}'\n" for key, name in FOLDERS.items()) + 'log_level = "debug"\n'
    )
    checked = subprocess.run(
        [str(dropcut), "check", "--config", str(config)],
        cwd=tmp_path,
        env=user_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert "configuration OK" in checked.stderr
    effective = json.loads(checked.stdout)
    assert effective["inbox"] == str(folders / "inbox")
    assert effective["log_level"] == "debug"
