"""Config loading and `relay check-config`: defaults, every error kind, exact prefixes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, unprivileged_command
from relay import config as config_module
from relay.cli import main
from relay.config import Config, ConfigError, ListenerConfig, describe_defaults, load_config
from relay.reload import reload_config
from relay.smtp.auth import hash_password
from relay.units import parse_duration, parse_host_port, parse_size


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.errors


def test_defaults_give_working_relay(workdir: Path) -> None:
    config = load_config(None)

    assert [listener.address for listener in config.listeners] == [("127.0.0.1", 2525)]
    assert config.listeners[0].role == "mx"
    assert config.listeners[0].tls == "none"
    assert config.spool.path == str(workdir / "relay-spool")
    assert config.policy.local_domains == ("localhost",)
    assert config.local.maildir_root == str(workdir / "mail")
    assert config.policy.trusted_networks == ("127.0.0.0/8", "::1/128")
    assert config.delivery.relayhost == ""
    assert config.delivery.maximal_queue_lifetime == 5 * 86400
    assert config.policy.max_message_size == 36700160


def test_config_is_immutable() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.policy.max_recipients = 5  # type: ignore[misc]


def test_full_sample_loads(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    path = write(
        tmp_path,
        """
[server]
hostname = "mx.example.test"
workers = 2

[[listener]]
address = "127.0.0.1:2525"
role = "mx"
tls = "starttls"

[[listener]]
address = "[::1]:2587"
role = "submission"
tls = "implicit"

[tls]
cert = "cert.pem"
key = "key.pem"

[spool]
path = "spool"

[policy]
local_domains = ["example.test"]
trusted_networks = ["127.0.0.0/8", "::1/128"]
max_message_size = "10M"
max_recipients = 1000

[delivery]
nameservers = ["127.0.0.1:5353"]
smtp_port = 2526
maximal_queue_lifetime = "5d"

[delivery.transport]
"example.net" = "smtp:[127.0.0.1]:2526"
"example.org" = "local"

[log]
format = "json"
""",
    )
    config = load_config(path)

    assert config.server.hostname == "mx.example.test"
    assert config.listeners[1].address == ("::1", 2587)
    assert config.tls.cert == str(tmp_path / "cert.pem")
    assert config.spool.path == str(tmp_path / "spool")
    assert config.policy.max_message_size == 10 * 1024 * 1024
    assert config.delivery.nameservers == (("127.0.0.1", 5353),)
    assert dict(config.delivery.transport) == {
        "example.net": "smtp:[127.0.0.1]:2526",
        "example.org": "local",
    }
    assert config.log.format == "json"
    assert config.source == str(path)


@pytest.mark.parametrize(
    ("text", "prefix", "fragment"),
    [
        ("[server]\nhostnme = \"a\"\n", "server.hostnme", "unknown key (did you mean hostname?); expected one of: "),
        ("[bogus]\nx = 1\n", "bogus", "unknown section; expected one of: admin, auth,"),
        ("[sever]\nx = 1\n", "sever", "unknown section (did you mean server?); expected one of: admin, auth,"),
        ("[Delivery]\nx = 1\n", "Delivery", "unknown section (did you mean delivery?)"),
        # A key above the first [section] header is no section, misspelled or not.
        ("workers = 2\n[server]\n", "workers", "key before any [section] header; move it into [server]"),
        ("address = \"127.0.0.1:2525\"\n", "address", "move it into [admin] or [[listener]]"),
        ("workerz = 2\n", "workerz", "unknown key before any [section] header; expected a section: admin, auth,"),
        ("[policy]\nmax_recipients = \"many\"\n", "policy.max_recipients", "expected an integer"),
        ("[policy]\nallow_address_literals = 1\n", "policy.allow_address_literals", "true or false"),
        ("[[listener]]\naddress = \"127.0.0.1\"\n", "listener[0].address", "missing port"),
        ("[[listener]]\naddress = \"999.1.1.1:x\"\n", "listener[0].address", "invalid port"),
        ("[[listener]]\naddress = \"::1:25\"\n", "listener[0].address", "brackets"),
        ("[[listener]]\nrole = \"relay\"\n", "listener[0].role", "expected one of: mx, submission, sink"),
        ("[tls]\nmin_version = \"TLSv1.0\"\n", "tls.min_version",
         "invalid value 'TLSv1.0'; expected one of: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"),
        ("[delivery]\ntls_min_version = \"1.2\"\n", "delivery.tls_min_version",
         "invalid value '1.2'; expected one of: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"),
        ("[delivery]\ntls_mandatory_min_version = \"SSLv3\"\n", "delivery.tls_mandatory_min_version",
         "invalid value 'SSLv3'; expected one of: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"),
        ("[delivery]\nmaximal_queue_lifetime = \"5 days\"\n", "delivery.maximal_queue_lifetime", "invalid duration"),
        ("[policy]\nmax_message_size = \"10X\"\n", "policy.max_message_size", "invalid size"),
        ("[policy]\ntrusted_networks = [\"10.0.0.0/33\"]\n", "policy.trusted_networks", "invalid network"),
        ("[policy]\nlocal_domains = [\"bad domain\"]\n", "policy.local_domains", "invalid domain"),
        ("[tls]\ncert = \"missing.pem\"\nkey = \"missing.pem\"\n", "tls.cert", "not found"),
        ("[[listener]]\ntls = \"starttls\"\n", "listener[0].tls", "needs [tls] cert and key"),
        ("[delivery]\nsmtp_port = 70000\n", "delivery.smtp_port", "above the maximum"),
        ("[delivery]\nline_length_limit = 40\n", "delivery.line_length_limit", "below the minimum 78"),
        ("[delivery]\nreply_line_limit = 100\n", "delivery.reply_line_limit", "below the minimum 512"),
        ('[local]\nusers = ["a/b"]\n', "local.users", "invalid user name 'a/b'"),
        ('[spool]\npath = ""\n', "spool.path", "empty path; give a directory"),
        ('[local]\nmaildir_root = " "\n', "local.maildir_root", "empty path; give a directory"),
        ('[local]\nusers = ["alice\\n"]\n', "local.users", "invalid user name 'alice\\n'"),
        ('[[listener]]\naddress = "127.0.0.1:\u00b2"\n', "listener[0].address", "a number from 1 to 65535"),
        ('[[listener]]\naddress = "127.0.0.1:\uff12\uff15"\n', "listener[0].address", "a number from 1 to 65535"),
        ("[delivery.transport]\n\"example.net\" = \"uucp:host\"\n", "delivery.transport", "invalid route"),
        ("[delivery]\nrelayhost_username = \"u\"\n", "delivery.relayhost_password_file", "missing"),
        ("[admin]\naddress = \"localhost\"\n", "admin.address", "missing port"),
        ("[admin]\nmax_destination_labels = 0\n", "admin.max_destination_labels", "below the minimum 1"),
        ("[spool]\nbusy_timeout = \"4w\"\n", "spool.busy_timeout", "value '4w' is above the maximum 1d"),
        ("[spool]\ncommit_delay = \"200ms\"\n", "spool.commit_delay", "value '200ms' is above the maximum 100ms"),
        ("[spool]\ncommit_delay = \"-1ms\"\n", "spool.commit_delay", "is negative"),
        ("[server]\nworkers = 0\n", "server.workers", "below the minimum 1"),
        ("[server]\ncommand_timeout = 0\n", "server.command_timeout", "value 0 must be above 0"),
        ("[server]\ncommand_timeout = -1\n", "server.command_timeout", "value -1 must be above 0"),
        ('[delivery]\ndns_timeout = "-5s"\n', "delivery.dns_timeout", "value '-5s' must be above 0"),
        ("[policy]\nmax_message_size = -5\n", "policy.max_message_size", "value -5 is below the minimum 1"),
        ('[delivery]\nconnect_timeout = "0s"\n', "delivery.connect_timeout", "value '0s' must be above 0"),
        ("[delivery]\nqueue_scan_interval = 0\n", "delivery.queue_scan_interval", "must be above 0"),
        ('[spool]\nlease_time = "500ms"\n', "spool.lease_time", "below the minimum 1s"),
        ('[delivery]\nnameservers = ["localhost"]\n', "delivery.nameservers", "'localhost' is not an IP address"),
        ('[delivery]\nminimal_backoff_time = "2h"\nmaximal_backoff_time = "1m"\n',
         "delivery.maximal_backoff_time", "1m is below minimal_backoff_time (2h)"),
        ('[local]\naliases = "."\n', "local.aliases", "is a directory; give the path of a file"),
    ],
)
def test_error_has_exact_prefix(tmp_path: Path, text: str, prefix: str, fragment: str) -> None:
    path = write(tmp_path, text)

    errors = errors_of(path)

    assert any(line.startswith(f"{path}:{prefix}: ") for line in errors), errors
    matching = [line for line in errors if line.startswith(f"{path}:{prefix}: ")]
    assert fragment in matching[0]


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[server]\nworkers = \"two\"\n[policy]\nmax_message_size = \"big\"\n[[listener]]\nrole = \"x\"\n",
    )

    errors = errors_of(path)

    assert len(errors) == 3
    assert {line.split(": ")[0] for line in errors} == {
        f"{path}:server.workers",
        f"{path}:policy.max_message_size",
        f"{path}:listener[0].role",
    }


def test_duplicate_listener_address(tmp_path: Path) -> None:
    path = write(tmp_path, "[[listener]]\naddress = \"127.0.0.1:25\"\n[[listener]]\naddress = \"127.0.0.1:25\"\n")

    errors = errors_of(path)

    assert errors == [f"{path}:listener[1].address: 127.0.0.1:25 is already used by listener[0]"]


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\n")

    errors = errors_of(path)

    assert errors[0].startswith(f"{path}: invalid TOML")


def test_non_utf8_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b"[server]\n# M\xfcller\nworkers = 1\n")

    errors = errors_of(path)

    assert errors == [
        f"{path}: not valid UTF-8: byte 0xfc at offset 12 (line 2); TOML files must be UTF-8,"
        " so convert the file, for example with iconv -f latin1 -t utf-8"
    ]


def test_check_config_cli_non_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b"# M\xfcller\n")

    status = main(["check-config", str(path)])

    assert status == 1
    assert capsys.readouterr().err.startswith(f"{path}: not valid UTF-8: byte 0xfc at offset 3 (line 1);")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nmax_errors = \"lots\"\n", "server.max_errors: expected an integer, got string 'lots'"),
        (
            "[policy]\nlocal_domains = \"example.test\"\n",
            "policy.local_domains: expected an array of domain names, got string 'example.test'",
        ),
        (
            "[policy]\nlocal_domains = [\"example.test\", 3]\n",
            "policy.local_domains: expected an array of domain names, but item 1 is integer 3",
        ),
        ("[policy]\nmax_recipients = true\n", "policy.max_recipients: expected an integer, got boolean true"),
        (
            "[policy]\nallow_address_literals = 1\n",
            "policy.allow_address_literals: expected true or false, got integer 1",
        ),
        (
            "[policy]\nmax_message_size = 1.5\n",
            "policy.max_message_size: expected a size such as 10485760 or \"10M\", got float 1.5",
        ),
        (
            "[server]\ncommand_timeout = [5]\n",
            "server.command_timeout: expected a duration such as \"30s\" or \"5d\", got array [5]",
        ),
        ("[local]\nusers = \"bob\"\n", "local.users: expected an array of user names, got string 'bob'"),
        (
            "[delivery]\nnameservers = [53]\n",
            "delivery.nameservers: expected an array of \"HOST:PORT\" strings, but item 0 is integer 53",
        ),
        ("server = 1\n", "server: expected a table, got integer 1"),
        (
            "[delivery.transport]\n\"example.net\" = 5\n",
            "delivery.transport: route for 'example.net' must be a string such as \"smtp:[127.0.0.1]:2526\""
            " or \"local\", got integer 5",
        ),
    ],
)
def test_type_error_names_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)

    errors = errors_of(path)

    assert errors == [f"{path}:{expected}"]


def test_type_error_shortens_long_value(tmp_path: Path) -> None:
    path = write(tmp_path, f"[server]\nmax_errors = \"{'x' * 500}\"\n")

    errors = errors_of(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:server.max_errors: expected an integer, got string 'xxx")
    assert "..." in errors[0]
    assert len(errors[0]) < len(str(path)) + 120


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_duration_rejects_non_finite_float(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[server]\nshutdown_grace = {value}\n")

    errors = errors_of(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:server.shutdown_grace: ")
    assert "finite" in errors[0]


def test_duration_integer_beyond_float_range(tmp_path: Path) -> None:
    # float() raised OverflowError for such an integer, and check-config printed a traceback.
    path = write(tmp_path, "[server]\nshutdown_grace = 1" + "0" * 309 + "\n")

    errors = errors_of(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:server.shutdown_grace: ")
    assert "too large" in errors[0]


def test_invalid_listener_addresses_not_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path, "[[listener]]\naddress = \"127.0.0.1\"\n[[listener]]\naddress = \"[::1]:99999\"\n")

    errors = errors_of(path)

    assert [line.split(": ")[0] for line in errors] == [f"{path}:listener[0].address", f"{path}:listener[1].address"]
    assert "missing port" in errors[0]
    assert "invalid port 99999" in errors[1]


def test_invalid_listener_tables_not_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path, "listener = [1, 2]\n")

    errors = errors_of(path)

    assert errors == [
        f"{path}:listener[0]: expected a table, got integer 1",
        f"{path}:listener[1]: expected a table, got integer 2",
    ]


def test_invalid_relayhost_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("secret\n")
    path = write(
        tmp_path,
        "[delivery]\nrelayhost = \"[smtp.example.test\"\nrelayhost_username = \"u\"\n"
        "relayhost_password_file = \"password\"\n",
    )

    errors = errors_of(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:delivery.relayhost: invalid address '[smtp.example.test': missing ']'")


def test_missing_password_file_reported_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[delivery]\nrelayhost = \"[smtp.example.test]:587\"\nrelayhost_username = \"u\"\n"
        "relayhost_password_file = \"password\"\n",
    )

    errors = errors_of(path)

    assert errors == [
        f"{path}:delivery.relayhost_password_file: file {tmp_path / 'password'} not found; create it or fix the path"
    ]


def test_missing_tls_files_reported_once(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[[listener]]\ntls = \"starttls\"\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n"
    )

    errors = errors_of(path)

    assert errors == [
        f"{path}:tls.cert: file {tmp_path / 'cert.pem'} not found; create it or fix the path",
        f"{path}:tls.key: file {tmp_path / 'key.pem'} not found; create it or fix the path",
    ]


def test_missing_tls_cert_with_unset_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[tls]\ncert = \"cert.pem\"\n")

    errors = errors_of(path)

    assert errors == [
        f"{path}:tls.cert: file {tmp_path / 'cert.pem'} not found; create it or fix the path",
        f"{path}:tls.key: missing; [tls] needs both cert and key",
    ]


@pytest.mark.parametrize("name", ["relay-smarthost.toml", "relay-throughput.toml"])
def test_example_errors_only_not_found(name: str) -> None:
    # Each file that the examples name under /etc/relay is missing on a host without that folder.
    example = Path(__file__).resolve().parent.parent / "examples" / name
    if Path("/etc/relay").exists():
        pytest.skip("/etc/relay exists on this host, so the example files may be found")

    errors = errors_of(example)

    assert errors
    for line in errors:
        assert line.endswith("not found; create it or fix the path"), line


@pytest.mark.parametrize(
    ("fqdn", "hostname", "expected"),
    [
        ("mx.example.test", "vm", "mx.example.test"),
        ("localhost", "vm.example.test", "vm.example.test"),
        ("localhost.localdomain", "vm.example.test", "vm.example.test"),
        ("LOCALHOST", "vm.example.test", "vm.example.test"),
        ("vm", "vm.example.test", "vm.example.test"),
        ("localhost", "vm", "localhost"),
        ("vm", "vm", "vm"),
        ("localhost", "localhost.localdomain", "localhost"),
        ("vm", "bad_name.example.test", "vm"),
        ("bad_name", "bad_name", "localhost"),
    ],
)
def test_default_hostname_fallback(monkeypatch: pytest.MonkeyPatch, fqdn: str, hostname: str, expected: str) -> None:
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: fqdn)
    monkeypatch.setattr(config_module.socket, "gethostname", lambda: hostname)

    assert load_config(None).server.hostname == expected


def test_describe_defaults_lists_sections() -> None:
    defaults = describe_defaults()

    assert defaults["listener"]["address"] == ("127.0.0.1", 2525)
    assert defaults["policy"]["max_recipients"] == 1000
    assert "relayhost" in defaults["delivery"]


@pytest.mark.parametrize(
    ("text", "octets"),
    [
        (0, 0),
        ("512", 512),
        ("10K", 10240),
        ("10M", 10485760),
        ("1g", 1073741824),
        ("10m", 10485760),
        ("10MB", 10485760),
        ("10 mb", 10485760),
        ("512B", 512),
        (" 64K ", 65536),
    ],
)
def test_parse_size(text: int | str, octets: int) -> None:
    assert parse_size(text) == octets


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("4h", 14400), ("5d", 432000), (7, 7), ("0.5ms", 0.0005)]
)
def test_parse_duration(text: int | str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["1.5M", "-1K", "+1K", "10KiB", "10 M B", "\u0661\u0660M"])
def test_parse_size_rejects_invalid_forms(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "seconds"), [("5 s", 5), ("1.5h", 5400), (" 7 ", 7), ("5 ms", 0.005)])
def test_parse_duration_spaces_and_decimals(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5S", "5M", "5MS", ".5s", "5.s", "5sec", "\u0665s"])
def test_parse_duration_rejects_invalid_forms(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_host_port_forms() -> None:
    assert parse_host_port("127.0.0.1:25") == ("127.0.0.1", 25)
    assert parse_host_port("[::1]:2525") == ("::1", 2525)
    assert parse_host_port("mx.example.test", 25) == ("mx.example.test", 25)
    with pytest.raises(ValueError, match="invalid host"):
        parse_host_port("bad_host!:25")
    for dotted in ("999.1.1.1:25", "1.2.3:25", "10.0.0.0.1:25", "999.1.1.1.:25", "127.0.0.01:25"):
        with pytest.raises(ValueError, match="invalid IPv4 address"):
            parse_host_port(dotted)
    assert parse_host_port("1.2.3.example:25") == ("1.2.3.example", 25)


def test_check_config_cli_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[server]\nhostname = \"mx.example.test\"\n")

    status = main(["check-config", str(path)])

    assert status == 0
    assert "ok" in capsys.readouterr().out


def test_check_config_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[log]\nformat = \"xml\"\n[spool]\npath = 3\n")

    status = main(["check-config", str(path)])

    stderr = capsys.readouterr().err.splitlines()
    assert status == 1
    assert stderr == [
        f"{path}:log.format: invalid value 'xml'; expected one of: text, json",
        f"{path}:spool.path: expected a file or directory path, got integer 3",
    ]


def test_check_config_rejects_long_hostname(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = ["a" * 63, "b" * 63, "c" * 63]
    longest = ".".join([*labels, "d" * 56, "test"])
    assert len(longest) == 253
    path = write(tmp_path, f'[server]\nhostname = "{longest}"\n')
    assert main(["check-config", str(path)]) == 0
    capsys.readouterr()

    path.write_text(f'[server]\nhostname = "x{longest}"\n')
    status = main(["check-config", str(path)])

    assert status == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}:server.hostname: host name of 254 octets is too long; a DNS name has at most 253 octets"
    ]


@pytest.mark.parametrize(
    ("hostname", "problem"),
    [
        (f"{'a' * 64}.example.test", f"label {'a' * 16!r}... is 64 octets, over the maximum of 63"),
        ("mx..example.test", "it has an empty label (a leading dot or two dots in a row)"),
        (".example.test", "it has an empty label (a leading dot or two dots in a row)"),
        ("mx_1.example.test", "label 'mx_1' contains '_'; use only ASCII letters, digits and hyphens"),
        ("-mx.example.test", "label '-mx' starts or ends with a hyphen"),
        ("mx.example.test\n", "label 'test\\n' contains '\\n'; use only ASCII letters, digits and hyphens"),
    ],
)
def test_hostname_error_names_rule(tmp_path: Path, hostname: str, problem: str) -> None:
    # TOML writes a newline in a string as the escape \n.
    escaped = hostname.replace("\n", "\\n")
    path = write(tmp_path, f'[server]\nhostname = "{escaped}"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.errors == [
        f'{path}:server.hostname: invalid host name {hostname!r}: {problem}; expected a DNS name such as'
        ' "mx.example.test"'
    ]


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ('[delivery]\ntls_ca_file = "{dir}/pw"\n', "delivery.tls_ca_file"),
        ('[delivery]\nrelayhost = "[127.0.0.1]:25"\nrelayhost_username = "u"\nrelayhost_password_file = "{dir}/pw"\n',
         "delivery.relayhost_password_file"),
        ('[auth]\npassword_file = "{dir}/pw"\n', "invalid UTF-8 at byte 4"),
        ('[tls]\ncert = "{dir}/pw"\nkey = "{dir}/pw"\n[[listener]]\naddress = "127.0.0.1:25"\ntls = "starttls"\n',
         "contains no valid PEM certificate"),
    ],
)
def test_check_config_loads_files_like_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, fragment: str
) -> None:
    # What would stop relay serve before any worker starts fails check-config too.
    (tmp_path / "pw").write_bytes(b"bob:\xff\n")
    path = write(tmp_path, section.format(dir=tmp_path))

    status = main(["check-config", str(path)])

    assert status == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"{path}:")
    assert fragment in captured.err
    assert "Traceback" not in captured.err


def test_check_config_rejects_undeliverable_aliases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Targets relay cannot deliver and alias loops would pass RCPT and then bounce.
    aliases = tmp_path / "aliases"
    aliases.write_text("pipe: |/bin/touch x\nfile: /tmp/x\ninc: :include:/tmp/list\nok: alice\na1: a2\na2: a1\n")
    path = write(tmp_path, f'[local]\naliases = "{aliases}"\n')

    status = main(["check-config", str(path)])

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    prefix = f"{path}:local.aliases: {aliases}: "
    assert captured.err.splitlines() == [
        prefix + "line 1: alias pipe: target '|/bin/touch x' is a command, which relay does not run;"
        ' relay supports only "alias: user[, user@domain]" targets',
        prefix + "line 2: alias file: target '/tmp/x' is a file, which relay does not write;"
        ' relay supports only "alias: user[, user@domain]" targets',
        prefix + "line 3: alias inc: target ':include:/tmp/list' is an include file, which relay does not read;"
        ' relay supports only "alias: user[, user@domain]" targets',
        prefix + "line 5: aliases form a loop, a1 -> a2 -> a1; an alias must not lead back to itself",
    ]


@pytest.mark.parametrize(
    ("text", "key", "maximum"),
    [
        ("[policy]\nmax_message_size = 99999999999999999999\n", "policy.max_message_size", "1099511627776"),
        ('[policy]\nmax_message_size = "9999999999G"\n', "policy.max_message_size", "1099511627776"),
        ("[policy]\nmax_line_length = 99999999999999999999\n", "policy.max_line_length", "1048576"),
        ("[server]\nworkers = 1000\n", "server.workers", "256"),
        ("[server]\nmax_connections = 99999999999999999999\n", "server.max_connections", "4611686018427387903"),
    ],
)
def test_huge_integers_rejected(tmp_path: Path, text: str, key: str, maximum: str) -> None:
    # Larger values overflowed the compiled core's C integers at the first connection.
    path = write(tmp_path, text)

    errors = errors_of(path)

    assert any(line.startswith(f"{path}:{key}: ") and f"above the maximum {maximum}" in line for line in errors)


def test_integer_beyond_python_digit_limit(tmp_path: Path) -> None:
    # Python reads at most 4300 digits into an int by default; tomllib raised a bare ValueError.
    path = write(tmp_path, "[server]\nmax_errors = 5\n[policy]\nmax_message_size = " + "9" * 5000 + "\n")

    errors = errors_of(path)

    assert errors == [
        f"{path}: invalid TOML: integer at line 4 has more than 4300 digits; no key accepts more than 19 digits"
    ]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[policy]\nmax_message_size = "' + "9" * 5000 + '"\n', "policy.max_message_size", "size of 5000 digits"),
        ('[server]\ncommand_timeout = "' + "9" * 400 + 's"\n', "server.command_timeout", "duration of 400 characters"),
        ('[server]\nshutdown_grace = "' + "9" * 305 + 'w"\n', "server.shutdown_grace", "duration of 305 characters"),
    ],
)
def test_overlong_number_strings_rejected(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path, text)

    errors = errors_of(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:{key}: {problem} is too large; expected ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[server]\nmax_errors = 5\nmax_errors = 6\n",
            "Cannot overwrite a value (at line 3, column 15): 'max_errors = 6';"
            " a key may appear only once in a table, so remove one of them",
        ),
        (
            "[server]\nmax_errors = 5\n[server]\n",
            "Cannot declare ('server',) twice (at line 3, column 8): '[server]';"
            " a [section] may appear only once, so merge the two",
        ),
        ("[server\n", "Expected ']' at the end of a table declaration (at line 1, column 8): '[server'"),
        # U+2028 and U+2029 in a comment end no TOML line, so line 3 is the third LF-separated line.
        (
            "# a\u2028b\u2029c\n[server]\nhostname = \n",
            "Invalid value (at line 3, column 12): 'hostname ='",
        ),
    ],
)
def test_toml_error_quotes_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)

    errors = errors_of(path)

    assert errors == [f"{path}: invalid TOML: {expected}"]


def test_config_directory_rejected(tmp_path: Path) -> None:
    errors = errors_of(tmp_path)

    assert errors == [f"{tmp_path}: is a directory; pass the path of the config file"]


def test_unreadable_config_names_user(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nmax_errors = 5\n")
    path.chmod(0)
    # As root the check runs as nobody, whom tmp_path's mode 0700 keeps out.
    command, user = unprivileged_command([sys.executable, "-m", "relay", "check-config", str(path)])

    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)

    assert completed.stderr == f"{path}: cannot be read: permission denied; let user {user} read it\n"
    assert completed.returncode == 1


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check-config", str(tmp_path / "nope.toml")])

    assert status == 1
    assert "file not found" in capsys.readouterr().err


def test_version_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--version"], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0
    assert result.stdout.strip().startswith("relay 0.")


def test_reload_keeps_admin_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "[admin]\nmax_destination_labels = 5\n")
    running = load_config(path)
    path.write_text("[admin]\nmax_destination_labels = 7\n")

    result = reload_config(running)

    assert result.config is not None
    assert result.config.admin.max_destination_labels == 5
    assert result.needs_restart == ["admin.max_destination_labels"]


def test_reload_keeps_spool_settings(tmp_path: Path) -> None:
    # The spool is opened once at start with these, so a changed value cannot take effect before a restart.
    path = write(tmp_path, "[spool]\nbusy_timeout = \"10s\"\nlease_time = \"30m\"\n")
    running = load_config(path)
    path.write_text("[spool]\nbusy_timeout = \"20s\"\nlease_time = \"1h\"\ncommit_delay = 0\n")

    result = reload_config(running)

    assert result.config is not None
    assert result.config.spool == running.spool
    assert result.needs_restart == ["spool.busy_timeout", "spool.lease_time", "spool.commit_delay"]


def test_reload_reports_log_changes(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nlevel = \"info\"\n")
    running = load_config(path)
    path.write_text("[log]\nlevel = \"debug\"\nformat = \"json\"\n")

    result = reload_config(running)

    assert result.config is not None
    assert result.config.log == running.log
    assert result.needs_restart == ["log.format", "log.level"]


def test_reload_quiet_about_command_line_values(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nworkers = 2\n")
    loaded = load_config(path)
    running = loaded.replace(
        listeners=(ListenerConfig(address="127.0.0.1:2600"),),
        server=dataclasses.replace(loaded.server, workers=1),
        delivery=dataclasses.replace(loaded.delivery, enabled=False),
        overrides=frozenset({"listener", "server.workers", "delivery.enabled"}),
    )

    result = reload_config(running)

    assert result.config is not None
    assert result.needs_restart == []
    assert result.config.listeners == running.listeners
    assert result.config.server.workers == 1
    assert not result.config.delivery.enabled
    assert result.config.overrides == running.overrides


def test_reload_after_file_deleted(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nworkers = 2\n")
    running = load_config(path)
    path.unlink()

    result = reload_config(running)

    assert result.config is None
    assert result.errors == [
        f"{path}: file not found; the running config stays in force, so restore the file and reload again"
    ]


def test_reload_without_file_explained() -> None:
    result = reload_config(load_config(None))

    assert result.config is None
    assert result.errors == ["no config file was given at start; there is nothing to re-read"]


def test_reload_rejects_alias_loop_and_pipe(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("sales: alice\n")
    path = write(tmp_path, f'[local]\naliases = "{aliases}"\n')
    running = load_config(path)
    aliases.write_text("sales: alice\npipe: |/bin/true\nloop: pool\npool: loop\n")

    result = reload_config(running)

    assert result.config is None
    assert len(result.errors) == 2
    prefix = f"{path}:local.aliases: {aliases}: "
    assert result.errors[0].startswith(prefix + "line 2: alias pipe: target '|/bin/true' is a command")
    assert result.errors[1].startswith(prefix + "line 3: aliases form a loop, loop -> pool -> loop")


def test_check_config_and_reload_report_alias_over_expansion_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("team: alice, bob\n")
    path = write(tmp_path, f'[local]\naliases = "{aliases}"\nalias_expansion_limit = 3\n')
    running = load_config(path)
    aliases.write_text("team: alice, bob\nstaff: team, carol, dave@example.test\n")
    error = (
        f"local.aliases: {aliases}: line 2: alias staff expands to 4 users and addresses, more than the 3 that"
        " local.alias_expansion_limit allows; split the alias or raise the limit"
    )

    status = main(["check-config", str(path)])

    assert status == 1
    assert capsys.readouterr().err.splitlines() == [f"{path}:{error}"]
    result = reload_config(running)
    assert result.config is None
    assert result.errors == [f"{path}:{error}"]


def test_alias_expansion_limit_must_be_positive(tmp_path: Path) -> None:
    path = write(tmp_path, "[local]\nalias_expansion_limit = 0\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "local.alias_expansion_limit" in str(caught.value)


def test_byte_order_mark_ignored(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b"\xef\xbb\xbf[server]\nhostname = \"mx.example.test\"\n")

    assert load_config(path).server.hostname == "mx.example.test"


def test_default_workers_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A machine with more CPUs than the maximum gets the maximum, as an explicit value would.
    monkeypatch.setattr("os.cpu_count", lambda: 384)
    path = write(tmp_path, "[server]\nhostname = \"mx.example.test\"\n")

    assert load_config(path).server.workers == 256


def test_missing_config_from_environment_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.toml"
    monkeypatch.setenv("RELAY_CONFIG", str(missing))

    with pytest.raises(SystemExit) as exited:
        main(["status"])

    assert exited.value.code == 1
    stderr = capsys.readouterr().err.splitlines()
    assert stderr == [
        f"{missing}: file not found; pass an existing config file",
        f"{missing}: named by the RELAY_CONFIG environment variable; fix or unset it",
    ]


def test_every_bad_list_item_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[policy]\ntrusted_networks = ["10.0.0.0/33", "foo", "::1/128"]\n'
        'local_domains = ["bad domain", "also bad", "ok.test"]\n',
    )

    errors = errors_of(path)

    assert errors == [
        f"{path}:policy.trusted_networks: invalid networks '10.0.0.0/33', 'foo';"
        ' expected CIDR notation such as "192.0.2.0/24"',
        f"{path}:policy.local_domains: invalid domains 'bad domain', 'also bad';"
        ' expected a DNS name such as "example.test"',
    ]


def test_check_config_reports_every_file_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pw").write_text("a:x\n# comment\nb:scrypt$1\nc\n")
    (tmp_path / "aliases").write_text("p: |/bin/true\n")
    path = write(tmp_path, f'[auth]\npassword_file = "{tmp_path}/pw"\n[local]\naliases = "{tmp_path}/aliases"\n')

    assert main(["check-config", str(path)]) == 1

    stderr = capsys.readouterr().err.splitlines()
    assert stderr == [
        f"{path}:auth.password_file: {tmp_path}/pw: lines 1, 3, 4: expected USER:scrypt$N$r$p$SALT$KEY",
        f"{path}:local.aliases: {tmp_path}/aliases: line 1: alias p: target '|/bin/true' is a command,"
        " which relay does not run;"
        ' relay supports only "alias: user[, user@domain]" targets',
    ]


def test_check_config_rejects_malformed_hashes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hash that no password could match is a config error, not a user who can never log in."""
    good = hash_password("secret", n=2, r=1, p=1)
    salt_and_key = good.split("$", 4)[4]
    lines = [
        f"ok:{good}",
        "truncated:" + good[: good.rindex("$")],
        "bad_base64:scrypt$2$1$1$not-base64!$" + salt_and_key.split("$")[1],
        f"n_not_power_of_two:scrypt$3$1$1${salt_and_key}",
        f"n_too_large:scrypt$1048576$8$1${salt_and_key}",
        f"zero_p:scrypt$2$1$0${salt_and_key}",
        "empty_key:scrypt$2$1$1$" + salt_and_key.split("$")[0] + "$",
    ]
    (tmp_path / "pw").write_text("\n".join(lines) + "\n")
    path = write(tmp_path, f'[auth]\npassword_file = "{tmp_path}/pw"\n')

    assert main(["check-config", str(path)]) == 1

    stderr = capsys.readouterr().err.splitlines()
    assert stderr == [
        f"{path}:auth.password_file: {tmp_path}/pw: lines 2, 3, 4, 5, 6, 7: expected USER:scrypt$N$r$p$SALT$KEY",
    ]


def test_check_config_reports_both_delivery_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    (tmp_path / "password").write_text("")
    path = write(
        tmp_path,
        f'[delivery]\ntls_ca_file = "{tmp_path}/ca.pem"\nrelayhost = "[127.0.0.1]:2525"\n'
        f'relayhost_username = "u"\nrelayhost_password_file = "{tmp_path}/password"\n',
    )

    assert main(["check-config", str(path)]) == 1

    stderr = capsys.readouterr().err.splitlines()
    assert len(stderr) == 2
    assert stderr[0].startswith(f"{path}:delivery.tls_ca_file: {tmp_path}/ca.pem is not a bundle")
    assert stderr[1].startswith(f"{path}:delivery.relayhost_password_file: the first line of")


def tls_files(directory: Path) -> dict[str, Path]:
    """Create two certificate and key pairs, an EC key, a junk file and an encrypted key; return them by name."""
    from tests.server_helpers import make_certificate

    (directory / "other").mkdir()
    cert, key = make_certificate(directory)
    other_cert, other_key = make_certificate(directory / "other")
    junk = directory / "junk.pem"
    junk.write_text("not PEM at all\n")
    encrypted = directory / "encrypted.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
        check=True, capture_output=True,
    )
    ec_key = directory / "ec-key.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(ec_key)],
        check=True, capture_output=True,
    )
    return {"cert": cert, "key": key, "other_cert": other_cert, "other_key": other_key, "ec_key": ec_key,
            "junk": junk, "encrypted": encrypted, "proc_mem": Path("/proc/self/mem")}


@pytest.mark.parametrize(
    ("cert", "key", "config_key", "fragment"),
    [
        ("junk", "key", "tls.cert", "{junk} contains no valid PEM certificate"),
        ("key", "key", "tls.cert", "{key} contains no valid PEM certificate"),
        ("cert", "junk", "tls.key", "{junk} contains no valid PEM private key"),
        ("cert", "other_cert", "tls.key", "{other_cert} contains no valid PEM private key"),
        ("cert", "other_key", "tls.key", "{other_key} is not the private key of that certificate"),
        # An EC key with an RSA certificate: OpenSSL reports NO_CERTIFICATE_ASSIGNED, not a mismatch.
        ("cert", "ec_key", "tls.key", "{ec_key} is not the private key of that certificate"),
        ("cert", "encrypted", "tls.key", "{encrypted} is encrypted with a passphrase"),
        ("cert", "proc_mem", "tls.key", "cannot read {proc_mem}: Input/output error"),
    ],
)
def test_check_config_names_faulty_tls_file(
    tmp_path: Path, cert: str, key: str, config_key: str, fragment: str
) -> None:
    files = tls_files(tmp_path)
    path = write(
        tmp_path,
        f'[[listener]]\naddress = "127.0.0.1:2525"\ntls = "starttls"\n'
        f'[tls]\ncert = "{files[cert]}"\nkey = "{files[key]}"\n',
    )

    # A session of its own has no terminal, where OpenSSL would ask for a passphrase and wait.
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(path)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, start_new_session=True, timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:{config_key}: cannot load TLS certificate "), result.stderr
    assert fragment.format(**files) in result.stderr
    assert "pass phrase" not in result.stderr + result.stdout
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_tls_floor_defaults() -> None:
    config = load_config()

    assert config.tls.min_version == "TLSv1.2"
    # Opportunistic TLS accepts TLS 1.0 rather than fall back to plaintext, as Postfix 3.7 does.
    assert config.delivery.tls_min_version == "TLSv1"
    assert config.delivery.tls_mandatory_min_version == "TLSv1.2"


@pytest.mark.parametrize(("relayhost_tls", "warned"), [("opportunistic", True), ("required", False), ("none", False)])
def test_check_config_warns_unverified_auth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], relayhost_tls: str, warned: bool
) -> None:
    (tmp_path / "pw").write_text("secret\n")
    path = write(
        tmp_path,
        '[delivery]\nrelayhost = "[smtp.provider.test]:587"\nrelayhost_username = "relay"\n'
        f'relayhost_password_file = "{tmp_path}/pw"\nrelayhost_tls = "{relayhost_tls}"\n',
    )

    status = main(["check-config", str(path)])

    captured = capsys.readouterr()
    # A warning does not fail the check: the config works, but the password is exposed.
    assert status == 0
    assert "ok" in captured.out
    expected = [
        f'{path}:delivery.relayhost_tls: warning: "opportunistic" with relayhost_username sends the password'
        " over TLS without a verified certificate, so a man in the middle can collect it;"
        ' set relayhost_tls = "required" (and tls_ca_file for a private CA)'
    ]
    assert captured.err.splitlines() == (expected if warned else [])


def test_check_config_warns_unknown_alias_member(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # alice has a folder, carol is configured, postmaster always exists and
    # help and own are aliases, so only ghost is warned about.
    (tmp_path / "mail" / "alice").mkdir(parents=True)
    (tmp_path / "aliases").write_text(
        "team: alice, ghost, bob@remote.test\nhelp: team, carol, postmaster\nown: own\n"
    )
    path = write(tmp_path, '[local]\nmaildir_root = "mail"\nusers = ["carol"]\naliases = "aliases"\n')

    status = main(["check-config", str(path)])

    captured = capsys.readouterr()
    # The config works: mail for team reaches alice and bob, and ghost's copy bounces.
    assert status == 0
    assert "ok" in captured.out
    assert captured.err.splitlines() == [
        f"{path}:local.aliases: warning: alias team: member ghost has no folder in local.maildir_root and is not"
        " in local.users, so its copy of mail to team bounces with 5.1.1; create ghost's Maildir folder, add"
        " ghost to local.users, or remove ghost from the alias"
    ]


def test_relative_paths_follow_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every path key, found from the field metadata, so that a new one cannot resolve elsewhere.
    sections: dict[str, list[str]] = {}
    for name, cls in config_module._SECTIONS.items():
        for item in dataclasses.fields(cls):
            if item.metadata.get("kind") == "path":
                sections.setdefault(name, []).append(item.name)
    folder = tmp_path / "conf"
    folder.mkdir()
    text = ""
    for section, keys in sections.items():
        text += f"[{section}]\n"
        if section == "delivery":
            # relayhost_password_file is only valid with a relayhost and a user name.
            text += 'relayhost = "[127.0.0.1]:2526"\nrelayhost_username = "u"\n'
        for key in keys:
            (folder / f"{section}-{key}").write_text("x\n")
            text += f'{key} = "{section}-{key}"\n'
    write(folder, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("..") / "conf" / "relay.toml")

    assert sum(len(keys) for keys in sections.values()) >= 8
    for section, keys in sections.items():
        for key in keys:
            assert getattr(getattr(config, section), key) == str(folder / f"{section}-{key}"), (section, key)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("relay.toml", "{folder}/relay.toml is not a directory; give a directory"),
        ("relay.toml/spool", "{folder}/relay.toml is not a directory, so {folder}/relay.toml/spool cannot be created"),
    ],
)
def test_check_config_rejects_file_as_spool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, problem: str
) -> None:
    # Found without creating the spool, which relay serve opens before its workers start.
    path = write(tmp_path, f'[spool]\npath = "{value}"\n')

    status = main(["check-config", str(path)])

    assert status == 1
    assert capsys.readouterr().err.startswith(f"{path}:spool.path: {problem.format(folder=tmp_path)}")


def test_check_config_accepts_missing_spool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[spool]\npath = "new/spool"\n')

    status = main(["check-config", str(path)])

    assert status == 0
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "new").exists()


def test_check_config_rejects_spool_under_proc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Linux lets no one create a directory in /proc, root included, so relay serve would reject it.
    path = write(tmp_path, '[spool]\npath = "/proc/nonexistent/x"\n')

    status = main(["check-config", str(path)])

    assert status == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}:spool.path: /proc is on a proc filesystem, which allows no new directories,"
        " so /proc/nonexistent/x cannot be created; give a directory on a disk filesystem"
    ]


def check_config_as_unprivileged_user(config: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``relay check-config`` as a user that file modes apply to; return the result and the user's name."""
    command, user = unprivileged_command([sys.executable, "-m", "relay", "check-config", str(config)])
    result = subprocess.run(
        command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        cwd=config.parent, check=False, timeout=60,
    )
    return result, user


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("locked", "permission denied on {folder}/locked; let user {user} write it, or give another directory"),
        (
            "locked/spool",
            "permission denied on {folder}/locked, so {folder}/locked/spool cannot be created;"
            " let user {user} write {folder}/locked, or give another directory",
        ),
    ],
)
def test_check_config_rejects_unwritable_spool(value: str, problem: str) -> None:
    # pytest's tmp_path sits in a folder of mode 0700, which the other user cannot enter.
    folder = Path(tempfile.mkdtemp(prefix="relay-check-spool-"))
    try:
        folder.chmod(0o755)
        (folder / "locked").mkdir(mode=0o555)
        config = write(folder, f'[spool]\npath = "{value}"\n')
        config.chmod(0o644)

        result, user = check_config_as_unprivileged_user(config)

        assert result.returncode == 1
        assert result.stderr.splitlines() == [f"{config}:spool.path: {problem.format(folder=folder, user=user)}"]
        assert list((folder / "locked").iterdir()) == []
    finally:
        shutil.rmtree(folder)


def test_check_config_rejects_non_utf8_relayhost_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without relayhost_username the password is never sent, but the scheduler's
    # router still reads the file whenever a relayhost is set.
    (tmp_path / "pw").write_bytes(b"\xff\xfe secret\n")
    path = write(
        tmp_path, f'[delivery]\nrelayhost = "[127.0.0.1]:2526"\nrelayhost_password_file = "{tmp_path}/pw"\n'
    )

    status = main(["check-config", str(path)])

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}:delivery.relayhost_password_file: {tmp_path}/pw is not valid UTF-8: byte 0xff at offset 0;"
        " save the password as UTF-8 text"
    ]


def path_keys() -> list[str]:
    """Return every ``section.key`` whose value is a path, from the field metadata."""
    keys = []
    for name, cls in [*config_module._SECTIONS.items(), ("listener", ListenerConfig)]:
        keys.extend(f"{name}.{item.name}" for item in dataclasses.fields(cls) if item.metadata.get("kind") == "path")
    return keys


@pytest.mark.parametrize("key", path_keys())
def test_nul_in_path_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    section, name = key.split(".")
    # A file named like the part before the NUL exists, so only the NUL can be the error.
    (tmp_path / "file").write_text("x\n")
    text = f'[{section}]\n{name} = "file\\u0000.bak"\n'
    if section == "tls":
        # [tls] needs both files; the other one is valid.
        text += f'{"key" if name == "cert" else "cert"} = "file"\n'
    path = write(tmp_path, text)

    status = main(["check-config", str(path)])

    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.splitlines() == [f"{path}:{key}: path 'file\\x00.bak' contains a NUL character; remove it"]


def test_path_keys_cover_every_file_setting() -> None:
    # The NUL check sits in the "path" kind, so each key naming a file or folder must use it.
    assert set(path_keys()) == {
        "tls.cert", "tls.key", "spool.path", "auth.password_file", "delivery.relayhost_password_file",
        "delivery.tls_ca_file", "local.maildir_root", "local.aliases",
    }


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("relay.toml", "{folder}/relay.toml is not a directory; give a directory"),
        ("relay.toml/mail", "{folder}/relay.toml is not a directory, so {folder}/relay.toml/mail cannot be created"),
    ],
)
def test_check_config_rejects_file_as_maildir_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, problem: str
) -> None:
    path = write(tmp_path, f'[local]\nmaildir_root = "{value}"\n')

    status = main(["check-config", str(path)])

    assert status == 1
    assert capsys.readouterr().err.startswith(f"{path}:local.maildir_root: {problem.format(folder=tmp_path)}")


def test_reload_rejects_file_as_maildir_root(tmp_path: Path) -> None:
    path = write(tmp_path, '[local]\nmaildir_root = "mail"\n')
    running = load_config(path)
    (tmp_path / "mail").write_text("not a folder\n")

    result = reload_config(running)

    assert result.config is None
    # The same "FILE:section.key: problem" form as relay check-config and relay serve.
    assert result.errors == [f"{path}:local.maildir_root: {tmp_path / 'mail'} is not a directory; give a directory"]
