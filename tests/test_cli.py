"""``dropcut run | check | status | retry`` as an administrator meets them.

Most commands are called in-process through :func:`dropcut.cli.main` (fast, output through
capsys); the exit codes of ``dropcut run`` are also checked on a real process. Daemons
that ``status`` and ``retry`` look at are real (:class:`InProcessDaemon`) and talk HTTP to
the fake withoutBG server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dropcut.cli import main
from dropcut.queue import STATES, JobQueue
from tests.fake_api import FakeWithoutBG
from tests.support import REPO, Folders, InProcessDaemon, drop, image_bytes, wait_for

SECRET = "sk-dropcut-CLI-7Q2x9Zp4Lm"
"""The API key of these tests: distinctive, so that finding it in output means a leak."""

NO_SERVER = "http://127.0.0.1:9"
"""``api_url`` for commands that never talk to the API."""

CliRun = Callable[..., tuple[int, str, str]]


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def api() -> Iterator[FakeWithoutBG]:
    with FakeWithoutBG(api_key=SECRET, rate_limit=50, rate_period=1.0) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No configuration leaks in from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("DROPCUT_") or name in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
            monkeypatch.delenv(name)


def set_env(
    monkeypatch: pytest.MonkeyPatch, folders: Folders, api_url: str = NO_SERVER, **values: Any
) -> None:
    """The folders (and a short debounce…) as DROPCUT_* variables; ``None`` unsets one."""
    base: dict[str, Any] = {
        "inbox": folders.inbox,
        "outbox": folders.outbox,
        "quarantine": folders.quarantine,
        "archive": folders.archive,
        "state_dir": folders.state,
        "api_url": api_url,
        "api_key": SECRET,
        "debounce_seconds": 0.2,
        "watch_mode": "native",
        "log_format": "json",
    }
    base.update(values)
    for key, value in base.items():
        name = f"DROPCUT_{key.upper()}"
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRun:
    """``dropcut ARGS…`` in-process: returns (exit code, stdout, stderr)."""

    def run(*argv: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def daemon_settings(folders: Folders, api: FakeWithoutBG, **overrides: Any) -> Any:
    values: dict[str, Any] = {"api_key": SECRET, "credit_check_interval_seconds": 0.3}
    values.update(overrides)
    return folders.settings(api.url, **values)


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


def all_output_files(folders: Folders) -> list[str]:
    return [
        f"{name}/{rel}"
        for name, root in (
            ("outbox", folders.outbox),
            ("quarantine", folders.quarantine),
            ("archive", folders.archive),
            ("inbox", folders.inbox),
        )
        if root.exists()
        for rel in folders.files(root)
    ]


# --- dropcut run: refusals ----------------------------------------------------------------


def _missing_inbox(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, inbox=f.root / "no-such-inbox")
    return []


def _inbox_is_a_file(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    (f.root / "inbox.txt").write_text("not a folder")
    set_env(mp, f, inbox=f.root / "inbox.txt")
    return []


def _no_key(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, api_key=None)
    return []


def _blank_key(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, api_key="   ")
    return []


def _key_file_missing(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, api_key=None, api_key_file=f.root / "missing.key")
    return []


def _empty_credentials(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    creds = f.root / "creds"
    creds.mkdir()
    (creds / "dropcut-api-key").write_text("\n")
    set_env(mp, f, api_key=None)
    mp.setenv("CREDENTIALS_DIRECTORY", str(creds))
    return []


def _outbox_is_inbox(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, outbox=f.inbox)
    return []


def _outbox_in_inbox(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, outbox=f.inbox / "out")
    return []


def _quarantine_in_inbox(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, quarantine=f.inbox / "bad")
    return []


def _quarantine_is_inbox(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, quarantine=f.inbox)
    return []


def _archive_in_inbox(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, archive=f.inbox / "done" / "deep")
    return []


def _archive_is_inbox_via_symlink(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    (f.root / "link").symlink_to(f.inbox)
    set_env(mp, f, archive=f.root / "link")
    return []


def _outbox_in_inbox_relative_spelling(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, outbox=f"{f.archive}/../inbox/./out")
    return []


def _invalid_value(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, max_in_flight=0)
    return []


def _invalid_choice(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, on_success="shred")
    return []


def _unknown_toml_key(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f)
    cfg = f.root / "dropcut.toml"
    cfg.write_text("max_in_flight = 2\ndebounce_secnods = 1.0\n")
    return ["--config", str(cfg)]


def _toml_syntax_error(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f)
    cfg = f.root / "dropcut.toml"
    cfg.write_text("max_in_flight = \n")
    return ["--config", str(cfg)]


def _config_file_missing(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    set_env(mp, f, config=f.root / "nope.toml")
    return []


def _outbox_below_a_file(f: Folders, mp: pytest.MonkeyPatch) -> list[str]:
    (f.root / "plain-file").write_text("not a folder")
    set_env(mp, f, outbox=f.root / "plain-file" / "outbox")
    return []


REFUSALS: dict[str, tuple[Callable[[Folders, pytest.MonkeyPatch], list[str]], str]] = {
    # case: (set-up, a word the one line must contain)
    "missing_inbox": (_missing_inbox, "inbox"),
    "inbox_is_a_file": (_inbox_is_a_file, "inbox"),
    "no_key": (_no_key, "API key"),
    "blank_key": (_blank_key, "API key"),
    "key_file_missing": (_key_file_missing, "API key"),
    "empty_credential": (_empty_credentials, "API key"),
    "outbox_is_inbox": (_outbox_is_inbox, "outbox"),
    "outbox_in_inbox": (_outbox_in_inbox, "outbox"),
    "quarantine_in_inbox": (_quarantine_in_inbox, "quarantine"),
    "quarantine_is_inbox": (_quarantine_is_inbox, "quarantine"),
    "archive_in_inbox": (_archive_in_inbox, "archive"),
    "archive_is_inbox_via_symlink": (_archive_is_inbox_via_symlink, "archive"),
    "outbox_in_inbox_dotted": (_outbox_in_inbox_relative_spelling, "outbox"),
    "invalid_value": (_invalid_value, "max_in_flight"),
    "invalid_choice": (_invalid_choice, "on_success"),
    "unknown_toml_key": (_unknown_toml_key, "debounce_secnods"),
    "toml_syntax_error": (_toml_syntax_error, "dropcut.toml"),
    "config_file_missing": (_config_file_missing, "nope.toml"),
    "outbox_below_a_file": (_outbox_below_a_file, "outbox"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_run_refuses_with_one_line_and_exit_2(
    case: str, folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    setup, word = REFUSALS[case]
    extra = setup(folders, monkeypatch)
    code, out, err = cli("run", *extra)
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert line.startswith("dropcut: ")
    assert word in line
    assert SECRET not in line
    # refused before touching anything
    assert not folders.state.exists()


@pytest.mark.parametrize("case", ["missing_inbox", "no_key", "quarantine_in_inbox", "unknown_toml_key"])
def test_run_refusal_exit_code_of_the_real_process(
    case: str, folders: Folders, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup, word = REFUSALS[case]
    extra = setup(folders, monkeypatch)
    proc = subprocess.run(
        [sys.executable, "-m", "dropcut.cli", "run", *extra],
        env=dict(os.environ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert word in one_line(proc.stderr)


# --- configuration: precedence, check --------------------------------------------------


@pytest.mark.parametrize("how", ["--config", "DROPCUT_CONFIG"])
def test_environment_overrides_the_toml_file(
    how: str, folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    cfg = folders.root / "etc" / "dropcut.toml"
    cfg.parent.mkdir()
    cfg.write_text(
        f'inbox = "{folders.root / "from-toml"}"\n'
        "max_in_flight = 3\n"
        "debounce_seconds = 1.5\n"
        'log_level = "warning"\n'
        f'api_key = "{SECRET}"\n'
    )
    set_env(monkeypatch, folders, api_key=None, max_in_flight=5, debounce_seconds=None)
    args: list[str | Path] = ["check"]
    if how == "--config":
        args += ["--config", cfg]
    else:
        monkeypatch.setenv("DROPCUT_CONFIG", str(cfg))
    code, out, err = cli(*args)
    assert code == 0, err
    effective = json.loads(out)
    assert effective["max_in_flight"] == 5  # env beats TOML
    assert effective["inbox"] == str(folders.inbox)  # env beats TOML
    assert effective["debounce_seconds"] == 1.5  # TOML beats the default
    assert effective["log_level"] == "warning"  # TOML beats the default
    assert effective["rate_limit_requests"] == 7  # nobody set it: the default
    assert effective["api_key"] not in (None, SECRET)
    assert SECRET not in out + err
    assert one_line(err) == "dropcut: configuration OK"


def test_explicit_config_option_wins_over_dropcut_config(
    folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    first = folders.root / "a.toml"
    first.write_text("max_in_flight = 2\n")
    second = folders.root / "b.toml"
    second.write_text("max_in_flight = 3\n")
    set_env(monkeypatch, folders, config=first)
    code, out, _ = cli("check", "--config", second)
    assert code == 0
    assert json.loads(out)["max_in_flight"] == 3


def test_check_prints_every_key_with_the_key_redacted(
    folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, rate_limit_requests=9, shutdown_grace_seconds=3)
    code, out, err = cli("check")
    assert code == 0
    effective = json.loads(out)
    from dropcut.settings import Settings

    assert set(effective) == set(Settings.model_fields)
    assert effective["rate_limit_requests"] == 9
    assert effective["shutdown_grace_seconds"] == 3.0
    assert effective["outbox"] == str(folders.outbox)
    assert effective["api_key"] and effective["api_key"] != SECRET
    assert SECRET not in out + err
    assert "configuration OK" in err


@pytest.mark.parametrize("source", ["api_key_file", "credentials"])
def test_check_accepts_key_from_file_or_credential_and_never_shows_it(
    source: str, folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    if source == "api_key_file":
        key_file = folders.root / "api.key"
        key_file.write_text(SECRET + "\n")
        set_env(monkeypatch, folders, api_key=None, api_key_file=key_file)
    else:
        creds = folders.root / "creds"
        creds.mkdir()
        (creds / "dropcut-api-key").write_text(SECRET + "\n")
        set_env(monkeypatch, folders, api_key=None)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    code, out, err = cli("check")
    assert code == 0, err
    assert SECRET not in out + err
    assert json.loads(out)["api_key"] is None


def test_check_exits_2_and_names_every_problem(
    folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    gone = folders.root / "gone"
    set_env(monkeypatch, folders, inbox=gone, api_key=None, outbox=gone / "o")
    code, out, err = cli("check")
    assert code == 2
    assert json.loads(out)["inbox"] == str(folders.root / "gone")  # still shows the config
    problems = [line for line in err.splitlines() if line != "dropcut: configuration OK"]
    assert len(problems) == len(err.splitlines()) == 3
    assert any("inbox" in p and "does not exist" in p for p in problems)
    assert any("API key" in p for p in problems)
    assert any("outbox" in p and "inside the inbox" in p for p in problems)


def test_check_invalid_value_is_one_line_and_exit_2(
    folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, api_url="ftp://example.org", max_attempts="many")
    code, out, err = cli("check")
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert "api_url" in line and "max_attempts" in line


@pytest.mark.parametrize("with_file", [False, True])
def test_bad_environment_value_is_not_blamed_on_the_config_file(
    with_file: bool, folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    # ignore_patterns is a list: from the environment it must be JSON.
    set_env(monkeypatch, folders, ignore_patterns="*.tmp")
    args: list[str | Path] = ["check"]
    if with_file:
        cfg = folders.root / "ok.toml"
        cfg.write_text("max_in_flight = 2\n")
        args += ["--config", cfg]
    code, _, err = cli(*args)
    assert code == 2
    line = one_line(err)
    assert "DROPCUT_IGNORE_PATTERNS" in line or "ignore_patterns" in line
    assert "config file" not in line, line


# --- dropcut status -----------------------------------------------------------------------


def test_status_before_any_run(folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun) -> None:
    set_env(monkeypatch, folders)
    code, out, _ = cli("status")
    assert code == 0
    assert "no queue yet" in out
    code, out, _ = cli("status", "--json")
    assert code == 0
    assert json.loads(out)["exists"] is False


def test_status_after_a_run(
    folders: Folders, api: FakeWithoutBG, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, api.url)
    with InProcessDaemon(daemon_settings(folders, api)):
        drop(folders.inbox, "a.jpg", image_bytes(seed=11))
        drop(folders.inbox, "sub/b.png", image_bytes("PNG", seed=12))
        drop(folders.inbox, "notes.jpg", b"plain text, not a JPEG\n" * 20)
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        wait_for(lambda: (folders.archive / "sub" / "b.png").exists())
        wait_for(lambda: (folders.quarantine / "notes.jpg.error.json").exists())
    code, out, err = cli("status", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["exists"] is True
    # every state of the queue is listed, the ones without jobs as 0
    assert report["jobs"] == {state: 0 for state in STATES} | {"done": 2, "quarantined": 1}
    assert report["paused"] is None
    assert isinstance(report["credit"]["credit"], int)
    assert report["last_error"]["file"] == "notes.jpg"
    assert report["last_error"]["error"]["status"] == 415
    assert report["last_error"]["error"]["code"]
    # the overview (README: "dropcut status --json")
    assert report["running"] is False
    assert report["backlog"] == 0 and report["eta_seconds"] is None
    assert report["rate"]["used"] == {"minute": 2, "hour": 2, "day": 2}  # two requests, one refused locally
    assert report["rate"]["limit"] == 50 and report["rate"]["period_seconds"] == 1.0
    assert report["rate"]["allowance"] == {"minute": 3000, "hour": 180000, "day": 4320000}
    assert report["last_success"] is not None
    assert report["conditions"] == []

    code, out, _ = cli("status")
    assert code == 0
    assert "done 2" in out and "quarantined 1" in out and "queued 0" in out
    assert "dropcut: not running" in out
    assert "requests: 2/3000 in the last minute" in out
    assert "not paused; no conditions" in out
    assert "last error: notes.jpg: refused here, not sent (415) unsupported_format" in out
    assert "None" not in out
    assert SECRET not in out


def test_status_while_paused_for_credit(
    folders: Folders, api: FakeWithoutBG, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, api.url)
    api.credit = 0
    with InProcessDaemon(daemon_settings(folders, api)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=21))
        wait_for(lambda: run.logs.events("queue_paused"))
        # status reads the live queue of a running daemon
        code, out, err = cli("status", "--json")
        assert code == 0, err
        report = json.loads(out)
        assert report["paused"]["code"] == "insufficient_credit"
        assert report["paused"]["status"] == 402
        assert report["paused"]["since"]
        assert report["jobs"]["queued"] == 1
        assert report["jobs"]["done"] == 0
        code, out, _ = cli("status")
        assert code == 0
        assert "PAUSED" in out and "insufficient_credit" in out

        api.credit = 5  # topped up: the next credit check resumes the queue
        wait_for(lambda: (folders.outbox / "a.png").exists())
        wait_for(lambda: run.logs.events("queue_resumed"))
    code, out, _ = cli("status", "--json")
    report = json.loads(out)
    assert report["paused"] is None
    assert report["jobs"]["done"] == 1
    code, out, _ = cli("status")
    assert "not paused" in out


def test_status_still_shows_a_pause_after_the_daemon_stopped(
    folders: Folders, api: FakeWithoutBG, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, api.url)
    api.expired = True
    with InProcessDaemon(daemon_settings(folders, api)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=22))
        wait_for(lambda: run.logs.events("queue_paused"))
    code, out, _ = cli("status", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["paused"]["code"] == "credits_expired"
    assert report["jobs"]["queued"] == 1


def test_status_last_error_of_a_paused_job_has_its_code(
    folders: Folders, api: FakeWithoutBG, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, api.url)
    api.credit = 0
    with InProcessDaemon(daemon_settings(folders, api)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=24))
        wait_for(lambda: run.logs.events("queue_paused"))
        code, out, _ = cli("status", "--json")
        assert code == 0
        last = json.loads(out)["last_error"]
        code, text, _ = cli("status")
    assert last["file"] == "a.jpg" and last["error"]["status"] == 402
    assert "None" not in text, text
    assert last["error"].get("code") == "insufficient_credit"


def test_status_with_a_hash_in_the_state_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    folders = Folders.make(tmp_path / "site#2")
    set_env(monkeypatch, folders)
    JobQueue.open(folders.state / "queue.sqlite3").close()  # the daemon's own queue, empty
    code, out, err = cli("status", "--json")
    assert code == 0, err
    assert json.loads(out)["jobs"]["queued"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site#2"]  # and nothing created beside it


# --- dropcut retry --------------------------------------------------------------------------


def _quarantine_via_api_413(folders: Folders, api: FakeWithoutBG, name: str, seed: int) -> bytes:
    """A file that passes local checks but that the server refuses as too large."""
    data = image_bytes("JPEG", (64, 48), seed=seed)
    assert len(data) > api.max_bytes
    drop(folders.inbox, name, data)
    wait_for(lambda: (folders.quarantine / f"{name}.error.json").exists())
    wait_for(lambda: (folders.quarantine / name).exists())
    record = json.loads((folders.quarantine / f"{name}.error.json").read_text())
    assert record["error"]["status"] == 413
    assert record["error"]["source"] == "api"
    return data


def test_retry_puts_quarantined_files_back_and_they_are_processed(
    folders: Folders, api: FakeWithoutBG, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, api.url)
    api.max_bytes = 1000  # below our files; the daemon's own limit stays at 10 MB
    settings = daemon_settings(folders, api)
    with InProcessDaemon(settings):
        a = _quarantine_via_api_413(folders, api, "a.jpg", seed=31)
        b = _quarantine_via_api_413(folders, api, "sub/b.jpg", seed=32)
    assert [r.status for r in api.records()] == [413, 413]
    api.max_bytes = 10 * 1024 * 1024

    # daemon stopped: the file goes back to the inbox and its error record goes away
    code, out, err = cli("retry", folders.quarantine / "a.jpg")
    assert code == 0, err
    assert "a.jpg" in out
    assert (folders.inbox / "a.jpg").read_bytes() == a
    assert not (folders.quarantine / "a.jpg").exists()
    assert not (folders.quarantine / "a.jpg.error.json").exists()
    assert (folders.quarantine / "sub" / "b.jpg").exists()  # only what was asked for
    code, out, _ = cli("status", "--json")
    assert json.loads(out)["jobs"]["quarantined"] == 1

    with InProcessDaemon(settings):
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        with Image.open(folders.outbox / "a.png") as img:
            assert img.format == "PNG" and img.mode == "RGBA"
        # daemon running: --all takes the rest, and it is processed again
        code, out, err = cli("retry", "--all")
        assert code == 0, err
        assert "sub/b.jpg" in out
        assert not (folders.quarantine / "sub" / "b.jpg.error.json").exists()
        wait_for(lambda: (folders.archive / "sub" / "b.jpg").exists(), timeout=10)
        assert (folders.archive / "sub" / "b.jpg").read_bytes() == b
    assert sorted(all_output_files(folders)) == [
        "archive/a.jpg",
        "archive/sub/b.jpg",
        "outbox/a.png",
        "outbox/sub/b.png",
    ]
    assert [r.status for r in api.records()] == [413, 413, 200, 200]
    code, out, _ = cli("status", "--json")
    assert json.loads(out)["jobs"] == {state: 0 for state in STATES} | {"done": 2}


def test_retry_of_something_not_quarantined_fails_naming_it(
    folders: Folders, api: FakeWithoutBG, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, api.url)
    monkeypatch.chdir(folders.root)
    with InProcessDaemon(daemon_settings(folders, api)):
        drop(folders.inbox, "done.jpg", image_bytes(seed=41))
        drop(folders.inbox, "deep/er/bad.jpg", b"not an image\n" * 10)
        wait_for(lambda: (folders.archive / "done.jpg").exists())
        wait_for(lambda: (folders.quarantine / "deep" / "er" / "bad.jpg.error.json").exists())
    targets = (folders.archive / "done.jpg", folders.inbox / "done.jpg", folders.quarantine / "never.jpg")
    for target in targets:
        code, out, err = cli("retry", target)
        assert code != 0
        assert target.name in one_line(err)
        assert "not quarantined" in err
        assert out == ""
    # a mix: the quarantined one (given by its inbox-relative name) is retried, the other
    # is named, and the exit code says so
    code, out, err = cli("retry", "deep/er/bad.jpg", folders.quarantine / "never.jpg")
    assert code != 0
    assert "never.jpg" in one_line(err)
    assert "deep/er/bad.jpg" in out
    assert (folders.inbox / "deep" / "er" / "bad.jpg").exists()
    assert not (folders.quarantine / "deep" / "er" / "bad.jpg.error.json").exists()
    # nothing at all
    code, _, err = cli("retry")
    assert code == 2
    assert "--all" in one_line(err)


def test_retry_before_any_run_names_the_path(
    folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders)
    code, _, err = cli("retry", folders.quarantine / "x.jpg")
    assert code != 0
    assert "x.jpg" in one_line(err)


def test_a_quarantined_file_moved_back_by_hand_is_tried_again(
    folders: Folders, api: FakeWithoutBG, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, api.url)
    api.max_bytes = 1000
    settings = daemon_settings(folders, api, credit_check_interval_seconds=300.0)
    with InProcessDaemon(settings):
        _quarantine_via_api_413(folders, api, "a.jpg", seed=51)
        api.max_bytes = 10 * 1024 * 1024
        # same inode, size and mtime as the quarantined job: still tried again
        os.rename(folders.quarantine / "a.jpg", folders.inbox / "a.jpg")
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=2)


def test_a_retry_whose_move_fails_leaves_the_file_quarantined_and_retryable(
    folders: Folders, api: FakeWithoutBG, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_env(monkeypatch, folders, api.url)
    with InProcessDaemon(daemon_settings(folders, api)):
        drop(folders.inbox, "bad.jpg", b"not an image\n" * 10)
        wait_for(lambda: (folders.quarantine / "bad.jpg.error.json").exists())
    locked = subprocess.run(["chattr", "+i", str(folders.quarantine)], capture_output=True, text=True)
    if locked.returncode != 0:
        pytest.skip(f"cannot set the immutable flag here: {locked.stderr.strip()}")
    try:
        code, out, err = cli("retry", "--all")  # EPERM: the file cannot leave the quarantine
        assert code == 1 and "bad.jpg" in err and "cannot move back" in err, err
        code, out, _ = cli("status", "--json")
        assert json.loads(out)["jobs"]["quarantined"] == 1, "the job was not forgotten"
    finally:
        subprocess.run(["chattr", "-i", str(folders.quarantine)], check=False)
    code, out, err = cli("retry", "--all")
    assert code == 0, err
    assert (folders.inbox / "bad.jpg").exists()
    code, out, _ = cli("status", "--json")
    assert json.loads(out)["jobs"].get("quarantined", 0) == 0
