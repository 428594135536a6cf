"""GANRAY_MLFLOW_ENV_FILE: MLflow credentials from an owner-only file, loaded into this process only.

Refusals are one-line TrackingErrors (exit 2 from the CLI) that never quote a value, variables
already in the environment win, and a loaded password never reaches a tag or param (`scrub`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.tracking import store
from ganray.orchestrator.tracking.credentials import ENV_FILE_VAR, load_mlflow_env_file

PASSWORD = "s3cr3t-Pa55word"
NAMES = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*NAMES, ENV_FILE_VAR):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    for name in NAMES:  # the loader writes os.environ directly; monkeypatch did not record these
        os.environ.pop(name, None)


def _env_file(tmp_path: Path, mode: int = 0o600, text: str | None = None) -> Path:
    path = tmp_path / "mlflow.env"
    path.write_text(text if text is not None else (
        "# written by hand\n"
        "MLFLOW_TRACKING_URI=https://mlflow.example.com\n"
        "export MLFLOW_TRACKING_USERNAME=ganray\n"
        f"MLFLOW_TRACKING_PASSWORD='{PASSWORD}'\n"))
    path.chmod(mode)
    return path


def test_unset_loads_nothing(clean_env: pytest.MonkeyPatch) -> None:
    assert load_mlflow_env_file() == []
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_loads_values_and_resolves_the_uri_from_them(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(ENV_FILE_VAR, str(_env_file(tmp_path)))
    assert store.resolve_tracking_uri(None, None) == "https://mlflow.example.com"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ganray"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD  # quotes stripped as a shell would
    assert load_mlflow_env_file() == []  # a second call changes nothing


def test_environment_wins_over_the_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(ENV_FILE_VAR, str(_env_file(tmp_path)))
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert sorted(load_mlflow_env_file()) == ["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"]
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_missing_file_refuses_in_one_line(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(ENV_FILE_VAR, str(tmp_path / "absent.env"))
    with pytest.raises(TrackingError) as info:
        store.resolve_tracking_uri(None, None)
    message = str(info.value)
    assert "\n" not in message and "absent.env" in message and "cannot read" in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_world_readable_file_refuses(clean_env: pytest.MonkeyPatch, tmp_path: Path, mode: int) -> None:
    clean_env.setenv(ENV_FILE_VAR, str(_env_file(tmp_path, mode)))
    with pytest.raises(TrackingError) as info:
        load_mlflow_env_file()
    message = str(info.value)
    assert "\n" not in message and f"{mode:o}" in message and "chmod 600" in message
    assert PASSWORD not in message
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ  # nothing half-loaded


def test_malformed_line_refuses_without_quoting_it(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(ENV_FILE_VAR, str(_env_file(tmp_path, text=f"MLFLOW_TRACKING_USERNAME=ganray\n{PASSWORD}\n")))
    with pytest.raises(TrackingError, match="line 2 is not KEY=VALUE") as info:
        load_mlflow_env_file()
    assert PASSWORD not in str(info.value)
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ


def test_loaded_password_never_reaches_tags_or_params(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(ENV_FILE_VAR, str(_env_file(tmp_path)))
    load_mlflow_env_file()
    leaked = f"connect failed: https://ganray:{PASSWORD}@mlflow.example.com (password {PASSWORD})"
    for cleaned in (store.scrub(leaked), store.param_value(leaked), store._tag_value(leaked)):
        assert PASSWORD not in cleaned
    assert store.redact(f"https://ganray:{PASSWORD}@mlflow.example.com") == "https://mlflow.example.com"


def test_cli_refuses_with_one_line_and_exit_2(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from ganray.orchestrator.cli import main

    clean_env.setenv(ENV_FILE_VAR, str(_env_file(tmp_path, 0o644)))
    assert main(["sample", "--run", "0" * 32, "--out", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {ENV_FILE_VAR}=") and PASSWORD not in err[0]
    assert not (tmp_path / "x.npy").exists()


def test_tune_trial_loads_the_file_before_talking_to_mlflow(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A trial process resolves no URI (the driver passes it) but is an MLflow client of its own.
    from ganray.orchestrator.tune import trial

    clean_env.setenv(ENV_FILE_VAR, str(tmp_path / "absent.env"))
    with pytest.raises(TrackingError, match=ENV_FILE_VAR):
        trial._open_child_run(None, "http://127.0.0.1:9", "0" * 32, "trial_1", "trial_1")  # type: ignore[arg-type]
