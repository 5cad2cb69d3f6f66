"""The warm executor's guard: only the agreed ClientApp, and no code in the app bundle."""

import io
import zipfile
from pathlib import Path

import pytest

from fedguard.client.executor import (
    DEFAULT_CLIENTAPP,
    ExecutorConfig,
    FabRejectedError,
    check_fab,
)
from fedguard.core.errors import ConfigError
from fedguard.deploy.bundles import write_app


def _fab(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def _pyproject(tmp_path: Path, clientapp: str = DEFAULT_CLIENTAPP) -> str:
    text = write_app(tmp_path / "app", {"rounds": 2}).read_text()
    return text.replace(f'clientapp = "{DEFAULT_CLIENTAPP}"', f'clientapp = "{clientapp}"')


def test_the_app_fedguard_run_builds_is_accepted(tmp_path: Path) -> None:
    fab = _fab({"pyproject.toml": _pyproject(tmp_path), ".info/CONTENT": "x"})
    assert check_fab(fab, (DEFAULT_CLIENTAPP,)) == DEFAULT_CLIENTAPP


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_flower_builds_the_same_app_into_an_accepted_bundle(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    write_app(tmp_path / "app", {"rounds": 2, "run-name": "x"})
    assert check_fab(build_fab_from_disk(tmp_path / "app"), (DEFAULT_CLIENTAPP,))


def test_another_clientapp_is_refused(tmp_path: Path) -> None:
    fab = _fab({"pyproject.toml": _pyproject(tmp_path, "evil.module:app")})
    with pytest.raises(FabRejectedError, match=r"only runs fedguard\.apps\.silo:client_app"):
        check_fab(fab, (DEFAULT_CLIENTAPP,))


@pytest.mark.parametrize("name", ["evil.py", "pkg/fedguard/__init__.py", "x.so", "hook.pth"])
def test_a_bundle_with_code_is_refused(tmp_path: Path, name: str) -> None:
    fab = _fab({"pyproject.toml": _pyproject(tmp_path), name: "import os"})
    with pytest.raises(FabRejectedError, match="ships code"):
        check_fab(fab, (DEFAULT_CLIENTAPP,))


def test_malformed_bundles_are_refused() -> None:
    with pytest.raises(FabRejectedError, match="not a zip"):
        check_fab(b"not a zip", (DEFAULT_CLIENTAPP,))
    with pytest.raises(FabRejectedError, match="no pyproject"):
        check_fab(_fab({"README.md": "hi"}), (DEFAULT_CLIENTAPP,))
    with pytest.raises(FabRejectedError, match="no readable clientapp"):
        check_fab(_fab({"pyproject.toml": "[project]\nname='x'\n"}), (DEFAULT_CLIENTAPP,))


def test_config_is_validated() -> None:
    assert ExecutorConfig("127.0.0.1:9094").poll_interval == 0.1
    with pytest.raises(ConfigError, match="HOST:PORT"):
        ExecutorConfig("9094")
    with pytest.raises(ConfigError, match="poll interval"):
        ExecutorConfig("127.0.0.1:9094", poll_interval=0)
    with pytest.raises(ConfigError, match="at least one"):
        ExecutorConfig("127.0.0.1:9094", allowed_clientapps=())
    with pytest.raises(ConfigError, match="parent PID"):
        ExecutorConfig("127.0.0.1:9094", parent_pid=0)


def test_fast_object_pulls_only_shortens_the_first_retry() -> None:
    from flwr.supercore.inflatable import inflatable_utils

    from fedguard.client.executor import fast_object_pulls

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__ or {}) for f in functions]
    try:
        assert all(s["initial_backoff"] == 1 for s in saved)  # Flower 1.41's default
        fast_object_pulls(0.05)
        for function, before in zip(functions, saved, strict=True):
            after = function.__kwdefaults__ or {}
            assert after["initial_backoff"] == 0.05
            assert {k: v for k, v in after.items() if k != "initial_backoff"} == {
                k: v for k, v in before.items() if k != "initial_backoff"
            }
    finally:
        for function, before in zip(functions, saved, strict=True):
            function.__kwdefaults__ = before
