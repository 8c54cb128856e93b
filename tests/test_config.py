"""The TOML configuration: every key reaches the server, every kind of mistake is named."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from verdant_trio.engine.settings import CoreSettings, LibrarySettings
from verdant_trio.service import cli
from verdant_trio.service.cluster.placement import generate, render
from verdant_trio.service.cluster.tablefile import write_placement
from verdant_trio.service.config import (
    EXIT_CONFIG,
    KEYS,
    SCHEMA,
    ConfigError,
    load_config,
    render_example,
)
from verdant_trio.service.logs import LogSettings
from verdant_trio.transport.settings import AppSettings

REPO = Path(__file__).resolve().parents[1]
SECRET = "config-test-secret-0123456789"
ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str, name: str = "verdant.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_key_reaches_the_settings(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "admin").write_text("admin-token-from-a-credential")
    path = write(tmp_path, f"""
[server]
host = "::"
port = 8443
sync_path = "/api/sync/"
public_url = "https://sync.example.com/"
cors_origins = ["https://app.example.com"]
admin_path = "/ops"
metrics = false
[auth]
token_secret_file = "{tmp_path}/secret"
admin_token_file = "${{CREDENTIALS_DIRECTORY}}/admin"
[storage]
databases_dir = "dbs"
truancy_minutes = 60
idle_close_s = 30
synchronous = "NORMAL"
[files]
root = "{tmp_path}/files"
max_upload_bytes = 1000
expiration_days = 0.5
[limits]
max_message_bytes = 2048
max_connections = 5
outbound_queue_messages = 7
heartbeat_timeout_s = 9.5
max_concurrent_syncs = 2
max_concurrent_handshakes = 3
handshake_timeout_s = 4
shutdown_timeout_s = 0
[profiles]
url = "https://app.internal/profiles/{{user_id}}"
headers = {{ Authorization = "Bearer internal-profile-token" }}
timeout_s = 0.5
cache_ttl_s = 0
cache_max_entries = 3
[logging]
level = "debug"
format = "json"
timestamps = false
access_log = true
""")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    s = load_config(path, environ=environ).settings
    assert (s.host, s.port, s.public_url, s.metrics) == ("::", 8443, "https://sync.example.com", False)
    assert s.local_url == "http://[::1]:8443"
    assert s.sync_url == "https://sync.example.com/api/sync"
    assert s.token_secret == SECRET
    assert s.app == AppSettings(
        sync_path="/api/sync", admin_path="/ops", admin_token="admin-token-from-a-credential",
        cors_origins=("https://app.example.com",), max_body_bytes=2048,
    )
    lib = s.core.libraries
    assert lib.databases_dir == Path.cwd() / "dbs"
    assert (lib.truancy_minutes, lib.idle_close_s, lib.synchronous) == (60, 30, "NORMAL")
    assert lib.file_expiration_days == 0.5
    assert s.files_dir == tmp_path / "files"
    assert s.files_public_url == "https://sync.example.com"  # falls back to [server] public_url
    core = s.core
    assert (core.max_connections, core.max_concurrent_syncs, core.max_concurrent_handshakes) == (5, 2, 3)
    assert (core.handshake_timeout_s, core.max_upload_bytes) == (4, 1000)
    assert (core.connections.outbound_queue, core.connections.idle_timeout_s) == (7, 9.5)
    assert (s.max_message_bytes, s.graceful_timeout_s) == (2048, 0)
    p = s.profile_settings
    assert p.url == "https://app.internal/profiles/{user_id}" and p.callable is None
    assert dict(p.headers) == {"Authorization": "Bearer internal-profile-token"}
    assert (p.timeout_s, p.cache_ttl_s, p.cache_max_entries) == (0.5, 0, 3)
    assert s.logging == LogSettings(level="debug", format="json", timestamps=False, access_log=True)
    # what the log formatter scrubs, and what a traceback would show
    assert set(s.secrets) >= {SECRET, "admin-token-from-a-credential", "Bearer internal-profile-token"}
    assert SECRET not in repr(s)


def test_defaults_are_the_servers_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_config(write(tmp_path, f'[auth]\ntoken_secret = "{SECRET}"\n'), environ=ENV).settings
    assert s.core == CoreSettings(LibrarySettings(databases_dir=tmp_path / "verdant-dbs"))
    assert s.app == AppSettings()  # no admin token: admin API off; any CORS origin
    assert s.files_dir == tmp_path / "verdant-files"
    assert (s.host, s.port, s.files_public_url, s.metrics) == ("127.0.0.1", 3242, None, True)
    assert s.logging == LogSettings()


def test_the_example_file_is_generated_from_the_schema_and_documents_every_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = (REPO / "config.example.toml").read_text()
    assert example == render_example(), "regenerate: verdant-trio example-config > config.example.toml"
    parsed = tomllib.loads(example)
    for key in SCHEMA:
        if key.default is None:
            assert f"# {key.name} = " in example, key
        else:
            assert parsed[key.section][key.name] == key.default, key
    # and it is a working configuration once a secret is provided
    monkeypatch.chdir(tmp_path)
    loaded = load_config(REPO / "config.example.toml", environ={"VERDANT_TOKEN_SECRET": SECRET})
    assert loaded.settings.token_secret == SECRET


def test_environment_overrides_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[auth]
token_secret_file = "{tmp_path}/missing"
admin_token = "admin-token-in-the-file"
""")
    environ = {"VERDANT_TOKEN_SECRET": SECRET, "VERDANT_ADMIN_TOKEN": "admin-token-from-env"}
    s = load_config(path, environ=environ).settings
    assert (s.token_secret, s.app.admin_token) == (SECRET, "admin-token-from-env")


BAD_CONFIGS = [
    ('[server]\nport = "abc"', '[server] port: expected an integer 1-65535, got "abc"'),
    ("[server]\nport = 70000", "[server] port: expected an integer 1-65535, got 70000"),
    ("[server]\nprot = 1", '[server] prot: unknown key (did you mean "port"?)'),
    ("[srever]\nport = 1", '[srever]: unknown section (did you mean "server"?)'),
    ("port = 1", "port: unknown top-level key"),
    ("server = 1", "[server]: expected a table, got 1"),
    ('[server\nport = 1', "invalid TOML: Expected ']' at the end of a table declaration (at line 1"),
    ('[server]\nsync_path = "sync"', '[server] sync_path: expected a path starting with "/", got "sync"'),
    ('[server]\nsync_path = "/metrics"', "[server] sync_path: '/metrics' is taken by another route"),
    ("[server]\nmetrics = 1", "[server] metrics: expected true or false, got 1"),
    ('[server]\ncors_origins = "*"', '[server] cors_origins: expected an array of origins'),
    ('[server]\npublic_url = "sync.example.com"', '[server] public_url: expected an http(s) URL, got "sync.example.com"'),
    ("[limits]\nheartbeat_timeout_s = 0", "[limits] heartbeat_timeout_s: expected a number > 0, got 0"),
    ("[limits]\nmax_connections = 1.5", "[limits] max_connections: expected an integer >= 1, got 1.5"),
    ('[logging]\nformat = "xml"', '[logging] format: expected one of "logfmt", "json", got "xml"'),
    ('[storage]\nsynchronous = "off"', '[storage] synchronous: expected one of "full", "normal", got "off"'),
    ('[storage]\ndatabases_dir = "${NOT_SET_ANYWHERE}/dbs"', "[storage] databases_dir: ${NOT_SET_ANYWHERE} is not set"),
    ('[profiles]\nurl = "https://app/profiles"', "[profiles] url: expected a URL containing {user_id}"),
    ('[profiles]\ncallable = "no_such_module_x:get"', "[profiles] callable: cannot import module 'no_such_module_x'"),
    ('[profiles]\ncallable = "get_profile"', '[profiles] callable: expected "package.module:function"'),
    ('[profiles]\nurl = "https://a/{user_id}"\ncallable = "json:loads"', "[profiles] callable: set either url or callable, not both"),
    ('[profiles]\nheaders = { X = 1 }', "[profiles] headers: expected a table of strings"),
    ('[clustr]\nnode_id = "n1"', '[clustr]: unknown section (did you mean "cluster"?)'),
    ('[cluster]\nnode_id = "a b"', "[cluster] node_id: invalid node name 'a b'"),
    ('[cluster]\nnode_id = "n1"', "[cluster] placement_file: required with node_id"),
    ('[cluster]\nplacement_file = "/x.map"', "[cluster] node_id: required with [cluster] placement_file"),
    ('[cluster]\nnode_id = "n1"\nplacement_file = "/nonexistent/p.map"', "[cluster] placement_file: /nonexistent/p.map: cannot read the placement table: No such file or directory"),
    ('[cluster]\npeers = { n2 = "10.0.0.2:3300" }', '[cluster] peers: expected an http(s) URL for peer n2, got "10.0.0.2:3300"'),
    ('[cluster]\npeers = { "a.b" = "http://10.0.0.2:3300" }', "[cluster] peers: invalid node name 'a.b'"),
    ('[cluster]\nnode_id = "n1"\npeers = { n1 = "http://x" }', "[cluster] peers: lists this node (n1) itself"),
    ('[cluster]\nnode_id = "n1"\ninternal_port = 3300', "[cluster] secret: required with internal_port"),
    ('[cluster]\nnode_id = "n1"\ninternal_port = 3242', "[cluster] internal_port: must differ from [server] port"),
    ("[cluster]\nrefusal_delay_s = -1", "[cluster] refusal_delay_s: expected a number >= 0, got -1"),
    ("[cluster]\nmove_timeout_s = 0", "[cluster] move_timeout_s: expected a number > 0, got 0"),
]  # fmt: skip
SECRET_LINE = f'[auth]\ntoken_secret = "{SECRET}"\n'


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_CONFIGS])
def test_each_kind_of_mistake_is_named_by_serve_and_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path, text + "\n" + SECRET_LINE)
    databases = tmp_path / "verdant-dbs"
    assert cli.main(["check-config", str(path)]) == EXIT_CONFIG
    checked = capsys.readouterr()
    assert f"{path}: {message}" in checked.err
    assert checked.out == ""
    assert cli.main(["serve", "--config", str(path)]) == EXIT_CONFIG
    served = capsys.readouterr()
    assert f"{path}: {message}" in served.err
    assert "not starting" in served.err
    assert not databases.exists()


SECRET_MISTAKES = [
    ("", "[auth] token_secret: required; set token_secret, token_secret_file or $VERDANT_TOKEN_SECRET"),
    ('[auth]\ntoken_secret = "tiny-s3cret"', "[auth] token_secret: too short (11 characters)"),
    ("[auth]\ntoken_secret = 123456789", "[auth] token_secret: expected a non-empty string, got an integer"),
    ('[auth]\ntoken_secret_file = "/nonexistent/secret"', "[auth] token_secret_file: cannot read /nonexistent/secret: No such file or directory"),
    (f'[auth]\ntoken_secret = "{SECRET}"\ntoken_secret_file = "/x"', "[auth] token_secret: set either token_secret or token_secret_file, not both"),
    (f'[auth]\ntoken_secret = "{SECRET}"\nadmin_token = "admin-2short"', "[auth] admin_token: too short"),
    (f'[auth]\ntoken_secret = "{SECRET}"\n[cluster]\nsecret = "tiny-s3cret"', "[cluster] secret: too short (11 characters)"),
    (f'[auth]\ntoken_secret = "{SECRET}"\n[cluster]\nsecret = 123456789', "[cluster] secret: expected a non-empty string, got an integer"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), SECRET_MISTAKES)
def test_secret_mistakes_are_named_without_showing_the_secret(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ=ENV)
    assert message in str(caught.value)
    for leaked in ("tiny-s3cret", "123456789", "admin-2short"):
        assert leaked not in str(caught.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 0\nhost = ""\n[logging]\nlevel = "loud"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENV)
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "[server] port", "[server] host", "[logging] level", "[auth] token_secret",
    ]


def test_command_line_overrides_are_checked_like_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, SECRET_LINE)
    assert cli.main(["serve", "--config", str(path), "--port", "70000"]) == EXIT_CONFIG
    assert "[server] port: expected an integer 1-65535, got 70000" in capsys.readouterr().err
    loaded = load_config(path, environ=ENV, overrides={("logging", "level"): "debug"})
    assert loaded.settings.logging.level == "debug"


def test_check_config_summarises_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, SECRET_LINE + '[profiles]\ncallable = "json:loads"\n')
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: ok" in out and "json:loads" in out and SECRET not in out


def test_a_reload_tells_which_changes_need_a_restart(tmp_path: Path) -> None:
    path = write(tmp_path, SECRET_LINE)
    before = load_config(path, environ=ENV)
    path.write_text(SECRET_LINE + '[server]\nport = 4000\n[logging]\nlevel = "debug"\n')
    after = load_config(path, environ=ENV)
    changed = after.changed_keys(before)
    assert changed == [("server", "port"), ("logging", "level")]
    assert [KEYS[k].reloadable for k in changed] == [False, True]


def test_the_process_exits_non_zero_without_starting(tmp_path: Path) -> None:
    path = write(tmp_path, SECRET_LINE + "[limits]\nmax_connections = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "verdant_trio.service.cli", "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode == EXIT_CONFIG
    assert f"{path}: [limits] max_connections: expected an integer >= 1, got -1" in result.stderr
    assert not (tmp_path / "verdant-dbs").exists()


def test_the_cluster_section_reaches_the_settings(tmp_path: Path) -> None:
    placement = tmp_path / "placement.map"
    write_placement(placement, generate(["n1", "n2", "n3"]))
    (tmp_path / "cluster-secret").write_text("cluster-secret-from-a-file-0123\n")
    path = write(tmp_path, SECRET_LINE + f"""
[cluster]
node_id = "n2"
placement_file = "{placement}"
secret_file = "{tmp_path}/cluster-secret"
internal_host = "10.0.0.2"
internal_port = 3300
peers = {{ n1 = "http://10.0.0.1:3300/", n3 = "https://10.0.0.3:3300" }}
refusal_delay_s = 0.25
move_timeout_s = 30
""")
    s = load_config(path, environ=ENV).settings
    assert s.cluster is not None
    c = s.cluster
    assert (c.node_id, c.placement_file, c.placement) == ("n2", placement, generate(["n1", "n2", "n3"]))
    assert (c.internal_host, c.internal_port, c.move_timeout_s) == ("10.0.0.2", 3300, 30)
    assert dict(c.peers) == {"n1": "http://10.0.0.1:3300", "n3": "https://10.0.0.3:3300"}
    assert c.secret == "cluster-secret-from-a-file-0123"
    assert c.refusal_delay_s == s.core.refusal_delay_s == 0.25
    assert c.secret in s.secrets and c.secret not in repr(s) and c.secret not in repr(c)
    environ = {"VERDANT_CLUSTER_SECRET": "cluster-secret-from-the-environment"}
    from_env = load_config(path, environ=environ).settings.cluster
    assert from_env is not None and from_env.secret == "cluster-secret-from-the-environment"
    # without [cluster] node_id: a single server, whatever keys with defaults say
    assert load_config(write(tmp_path, SECRET_LINE + "[cluster]\nrefusal_delay_s = 2\n"),
                       environ=ENV).settings.cluster is None


def test_a_broken_placement_table_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    table = tmp_path / "placement.map"
    table.write_text(render(generate(["n1", "n2"])).replace("n2", "n 2"))
    path = write(tmp_path, SECRET_LINE + f'[cluster]\nnode_id = "n1"\nplacement_file = "{table}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENV)
    line = next(i for i, text in enumerate(table.read_text().splitlines(), 1) if text.startswith("2048:"))
    assert caught.value.problems == [
        f"[cluster] placement_file: {table}:{line}: expected '<slot> <node>' or "
        f"'<first>:<last> <node>', got '2048:4095 n 2'"
    ]


def test_the_placement_file_is_reloadable_and_the_node_id_is_not(tmp_path: Path) -> None:
    placement = tmp_path / "placement.map"
    write_placement(placement, generate(["n1", "n2"]))
    cluster = f'[cluster]\nplacement_file = "{placement}"\n'
    path = write(tmp_path, SECRET_LINE + cluster + 'node_id = "n1"\n')
    before = load_config(path, environ=ENV)
    path.write_text(SECRET_LINE + cluster.replace("placement.map", "p2.map") + 'node_id = "n2"\n')
    write_placement(tmp_path / "p2.map", generate(["n1", "n2"]))
    changed = load_config(path, environ=ENV).changed_keys(before)
    assert changed == [("cluster", "node_id"), ("cluster", "placement_file")]
    assert [KEYS[k].reloadable for k in changed] == [False, True]
