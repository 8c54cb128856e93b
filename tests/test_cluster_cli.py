"""`verdant-trio cluster placement|haproxy-config|locate` and `serve --quickstart`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from verdant_trio.service import cli
from verdant_trio.service.cluster.placement import generate, moves_between, rebalance, slot_of
from verdant_trio.service.cluster.tablefile import read_placement, write_placement
from verdant_trio.service.config import load_config
from verdant_trio.storage.names import encode_id

from .cluster_front import haproxy_binary


def test_placement_writes_the_first_table_and_then_only_new_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "placement.map"
    assert cli.main(["cluster", "placement", "--nodes", "n1,n2,n3", "--out", str(table)]) == 0
    assert read_placement(table) == generate(["n1", "n2", "n3"])
    assert "version 1, n1 1366, n2 1365, n3 1365 slots" in capsys.readouterr().out
    # once there, a table changes only by a newer version
    assert cli.main(["cluster", "placement", "--nodes", "n1,n2", "--out", str(table)]) == 1
    assert "exists" in capsys.readouterr().err
    assert read_placement(table) == generate(["n1", "n2", "n3"])
    # a node gone: its slots to the others, a version later, nothing else moved
    new = tmp_path / "new.map"
    assert cli.main(["cluster", "placement", "--from", str(table), "--nodes", "n1,n3",
                     "--out", str(new)]) == 0
    expected = rebalance(generate(["n1", "n2", "n3"]), ["n1", "n3"])
    assert read_placement(new) == expected and expected.version == 2
    out = capsys.readouterr().out
    moves = moves_between(generate(["n1", "n2", "n3"]), expected)
    assert {m.source for m in moves} == {"n2"}
    assert all(f"move {move}" in out for move in moves)
    with pytest.raises(SystemExit) as usage:  # argparse: a usage error, status 2
        cli.main(["cluster", "placement", "--nodes", "n1,bad name", "--out", str(new)])
    assert usage.value.code == 2
    assert "invalid node name 'bad name'" in capsys.readouterr().err


def test_haproxy_config_is_one_haproxy_accepts(tmp_path: Path) -> None:
    table = tmp_path / "placement.map"
    write_placement(table, generate(["n1", "n2"]))
    out = tmp_path / "haproxy.cfg"
    assert cli.main([
        "cluster", "haproxy-config", "--nodes", "n1=127.0.0.1:3301,n2=127.0.0.1:3302",
        "--placement", str(table), "--bind", "0.0.0.0:443", "--socket", str(tmp_path / "s"),
        "--out", str(out),
    ]) == 0
    config = out.read_text()
    assert "bind 0.0.0.0:443" in config and f"map_int({table})" in config
    check = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(out)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # a table naming a node without an address is refused, naming it
    write_placement(table, generate(["n1", "n2", "n3"]))
    assert cli.main(["cluster", "haproxy-config", "--nodes", "n1=127.0.0.1:3301",
                     "--placement", str(table)]) == 1


def test_locate_names_the_owner_of_each_shard_and_files_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = generate(["n1", "n2"])
    write_placement(tmp_path / "placement.map", table)
    backup = tmp_path / "backup"
    backup.mkdir()
    libraries = [f"lib-{i}" for i in range(20)] + ["a library/with ü"]
    for library in libraries:
        (backup / f"{encode_id(library, 'library id')}.sqlite").write_bytes(b"")
    (backup / "not-a-shard.txt").write_text("")
    assert cli.main(["cluster", "locate", "--placement", str(tmp_path / "placement.map"),
                     str(backup)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    shown = {Path(path).name: (int(slot), owner) for path, slot, owner in rows if path.endswith(".sqlite")}
    assert shown == {
        f"{encode_id(lib, 'library id')}.sqlite": (slot_of(lib), table.owner_of(lib))
        for lib in libraries
    }
    assert cli.main(["cluster", "locate", "--placement", str(tmp_path / "placement.map"),
                     "--node", "n2", str(backup)]) == 0
    paths = capsys.readouterr().out.split()
    owned = {f"{encode_id(lib, 'library id')}.sqlite" for lib in libraries
             if table.owner_of(lib) == "n2"}
    assert {Path(p).name for p in paths if p.endswith(".sqlite")} == owned and owned


def test_serve_quickstart_adds_only_the_dev_extras(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[auth]\ntoken_secret = "quickstart-extras-secret-0123"\n')
    settings = load_config(path).settings
    extras = cli.quickstart_extras(settings)
    assert (settings.app.admin_open, settings.app.dev_token_secret) == (False, None)
    assert (extras.app.admin_open, extras.app.dev_token_secret) == (True, settings.token_secret)
    assert extras.app.sync_path == settings.app.sync_path and extras.core == settings.core
