"""The example configs in examples/ load without errors once their files exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO_ROOT
from relay.config import load_config

EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.toml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_config_loads(tmp_path: Path, example: Path) -> None:
    # Move the absolute paths under tmp_path and create the files they name.
    text = example.read_text().replace('"/etc/', f'"{tmp_path}/etc/').replace('"/var/', f'"{tmp_path}/var/')
    for name in ("etc/relay/tls/cert.pem", "etc/relay/tls/key.pem", "etc/relay/provider-password", "etc/relay/aliases"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    path = tmp_path / example.name
    path.write_text(text)

    config = load_config(path)

    assert config.listeners
    assert config.source == str(path)


def test_examples_cover_each_use() -> None:
    names = {path.name for path in EXAMPLES}

    assert names == {"relay-throughput.toml", "relay-sink.toml", "relay-smarthost.toml"}
    assert (REPO_ROOT / "examples" / "relay.service").is_file()
