"""The status service's systemd units, rendered as the program renders them.

Rendered by the project's own rendering module (components/render.py:
StrictUndefined, its own comment delimiters, trim_blocks) and checked by the
real tools: `systemd-analyze verify` on the rendered units, and the rendered
ExecStart command lines run against (or parsed by) the real program.

Two units and a socket: the page (dstack-vpn-status.service, no capability)
and its root helper (dstack-vpn-status-helper.socket and .service), which
hands the page the peer dump without keys.
"""

import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import jinja2
import jinja2.meta
import pytest

from components import render as renderer
from conftest import need_tool

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates" / "systemd"
TEMPLATE = "dstack-vpn-status.service"
HELPER_SOCKET = "dstack-vpn-status-helper.socket"
HELPER_SERVICE = "dstack-vpn-status-helper.service"
DUMP_SOCKET = "/run/dstack-vpn-status/wg-dump.sock"
SCRIPT = ROOT / "status" / "dstack_vpn_status.py"
PYTHON3 = "/usr/bin/python3"  # the interpreter the unit names

VARIABLES = {
    "install_dir": "/usr/local/lib/dstack-vpn",
    "node_name": "node-a",
    "overlay_ip": "10.88.0.11",
    "interface": "wg0",
    "listen_address": "0.0.0.0",
    "listen_port": 8000,
    "hub_public_key": "srhWIN5T+BTQx1LV1XJDrZdCeAA6V0kqz7fUIVkXyUw=",
    # a PostgreSQL member's (elsewhere patroni_url is "" and neither option is passed)
    "patroni_url": "https://10.88.0.11:8008",
    "patroni_ca": "/usr/local/share/dstack-vpn/postgres-ca.crt",
    # a member with backups (elsewhere "": no option)
    "backup_status": "/var/lib/dstack-vpn-backup/status.json",
}


def render(**overrides) -> str:
    return renderer.render("systemd/" + TEMPLATE, **dict(VARIABLES, **overrides))


def parse_unit(text: str) -> dict:
    """{section: {key: [values...]}}, joining backslash-continued lines as systemd does."""
    sections, current = {}, None
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, "not a unit line: %r" % line
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exec_start_argv(unit: dict) -> list:
    """ExecStart as the program will receive it: unquoted, %% and $$ undone."""
    (line,) = unit["Service"]["ExecStart"]
    return [word.replace("%%", "%").replace("$$", "$") for word in shlex.split(line)]


def test_template_uses_exactly_the_documented_variables():
    source = (TEMPLATES / TEMPLATE).read_text()
    assert jinja2.meta.find_undeclared_variables(renderer.environment().parse(source)) == set(VARIABLES)


@pytest.mark.parametrize("missing", sorted(VARIABLES))
def test_every_variable_is_required(missing):
    values = dict(VARIABLES)
    del values[missing]
    with pytest.raises(jinja2.UndefinedError):
        renderer.render("systemd/" + TEMPLATE, **values)


def test_same_unit_under_plain_jinja_settings():
    # No Jinja comments and no layout that trim_blocks would change: the unit
    # reads the same whichever environment renders or includes it.
    plain = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                               undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    assert plain.get_template(TEMPLATE).render(**VARIABLES) == render()
    assert render().startswith("# Managed by dstack-vpn")


def test_hardening_and_ordering_directives():
    unit = parse_unit(render(interface="wg7"))
    service = unit["Service"]

    def one(key):
        assert len(service.get(key, [])) == 1, key
        return service[key][0]

    assert "wg-quick@wg7.service" in " ".join(unit["Unit"]["After"]).split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert one("DynamicUser") == "yes"
    # no capability at all: empty assignments, so that nothing is inherited or added elsewhere
    assert one("AmbientCapabilities") == ""
    assert one("CapabilityBoundingSet") == ""
    assert one("NoNewPrivileges") == "yes"
    assert one("SupplementaryGroups") == "dstack-vpn-wg-dump"  # may open the helper's socket
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}  # no netlink
    assert set(one("InaccessiblePaths").split()) == {"-/etc/wireguard", "-/run/wireguard"}
    assert one("LimitNOFILE") == "4096"
    assert one("Restart") == "on-failure"
    assert "User" not in service and "PrivateUsers" not in service and "PrivateNetwork" not in service
    assert service.get("ProtectProc", ["default"]) == ["default"]  # "invisible" would hide PostgreSQL
    assert "dstack-vpn-status-helper.socket" in " ".join(unit["Unit"]["Wants"]).split()
    assert "dstack-vpn-status-helper.socket" in " ".join(unit["Unit"]["After"]).split()


def test_exec_start_passes_every_value():
    argv = exec_start_argv(parse_unit(render(listen_address="::", listen_port=8123)))
    assert argv[:3] == [PYTHON3, "-I", "/usr/local/lib/dstack-vpn/dstack_vpn_status.py"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert options == {
        "--node-name": "node-a", "--overlay-ip": "10.88.0.11", "--interface": "wg0",
        "--listen-address": "::", "--listen-port": "8123",
        "--hub-public-key": "srhWIN5T+BTQx1LV1XJDrZdCeAA6V0kqz7fUIVkXyUw=",
        "--patroni-url": "https://10.88.0.11:8008", "--patroni-ca": "/usr/local/share/dstack-vpn/postgres-ca.crt",
        "--backup-status": "/var/lib/dstack-vpn-backup/status.json", "--wg-dump-socket": DUMP_SOCKET}


def test_a_spoke_outside_the_cluster_passes_no_patroni_option():
    argv = exec_start_argv(parse_unit(render(patroni_url="", patroni_ca="", backup_status="")))
    assert not [a for a in argv if a.startswith("--patroni") or a.startswith("--backup")]
    assert argv[-2:] == ["--wg-dump-socket", DUMP_SOCKET]


def test_values_systemd_would_interpret_are_escaped():
    awkward = 'node "a" 100% $HOME \\x'
    argv = exec_start_argv(parse_unit(render(node_name=awkward)))
    assert argv[argv.index("--node-name") + 1] == awkward


def _rendered_install(tmp_path, **overrides) -> Path:
    install_dir = tmp_path / "lib" / "dstack-vpn"
    install_dir.mkdir(parents=True)
    shutil.copy(SCRIPT, install_dir / "dstack_vpn_status.py")
    unit = tmp_path / TEMPLATE
    unit.write_text(render(install_dir=str(install_dir), **overrides))
    return unit


def test_systemd_analyze_verify(tmp_path):
    analyze = need_tool("systemd-analyze")
    unit = _rendered_install(tmp_path, node_name='odd "name" 50%')
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on settings it merely ignores: any word from it is a finding.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    # Proves the test above can fail: the same check on a damaged rendering.
    analyze = need_tool("systemd-analyze")
    unit = _rendered_install(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=sometimes"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Failed to parse protect system value" in result.stdout + result.stderr


def test_rendered_command_line_is_accepted_by_the_program(tmp_path):
    # Runs the unit's own command line (in --probe mode, against a port where
    # nothing listens): argparse would exit 2 on any option it does not take.
    if not os.access(PYTHON3, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("%s is missing (CI=true)" % PYTHON3)
        pytest.skip("SKIPPED CHECK: %s is missing" % PYTHON3)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    unit = _rendered_install(tmp_path, listen_address="127.0.0.1", listen_port=port, node_name='odd "name" 50%')
    argv = exec_start_argv(parse_unit(unit.read_text()))
    assert Path(argv[2]).is_file()
    result = subprocess.run(argv + ["--probe", "--request-timeout", "2"], capture_output=True, text=True,
                            timeout=30, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 1, result.stderr
    assert "cannot reach 127.0.0.1 port %d" % port in result.stdout


# ---------------------------------------------------------------- the helper


HELPER_VARIABLES = {"install_dir", "interface"}


def render_helper(name: str, **overrides) -> str:
    values = {k: VARIABLES[k] for k in HELPER_VARIABLES}
    return renderer.render("systemd/" + name, **dict(values, **overrides))


def test_helper_templates_use_only_the_install_dir_and_interface():
    for name in (HELPER_SOCKET, HELPER_SERVICE):
        source = (TEMPLATES / name).read_text()
        assert jinja2.meta.find_undeclared_variables(renderer.environment().parse(source)) <= HELPER_VARIABLES
    with pytest.raises(jinja2.UndefinedError):
        renderer.render("systemd/" + HELPER_SERVICE, install_dir="/x")


def test_helper_socket_lets_in_root_and_the_page_only():
    socket_unit = parse_unit(render_helper(HELPER_SOCKET))["Socket"]
    page = parse_unit(render())["Service"]
    assert socket_unit["ListenStream"] == [DUMP_SOCKET]
    assert (socket_unit["SocketUser"], socket_unit["SocketGroup"], socket_unit["SocketMode"]) == (
        ["root"], page["SupplementaryGroups"], ["0660"])
    assert socket_unit["Accept"] == ["no"]  # one helper process, not one per request
    assert socket_unit["RemoveOnStop"] == ["yes"]


def test_helper_service_is_root_with_net_admin_only():
    unit = parse_unit(render_helper(HELPER_SERVICE, interface="wg7"))
    service = unit["Service"]
    assert "User" not in service and "DynamicUser" not in service  # root: wireguard-go's socket is root's own
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert service["AmbientCapabilities"] == [""]
    assert service["NoNewPrivileges"] == ["yes"]
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_NETLINK"}
    assert service["IPAddressDeny"] == ["any"]
    assert service["InaccessiblePaths"] == ["-/etc/wireguard"]
    assert service["ProtectSystem"] == ["strict"]
    assert unit["Unit"]["Requires"] == [HELPER_SOCKET]
    assert "Install" not in unit  # started by its socket only


def test_helper_command_line_is_the_programs_dump_helper(tmp_path):
    argv = exec_start_argv(parse_unit(render_helper(HELPER_SERVICE, interface='wg"7')))
    assert argv[:3] == [PYTHON3, "-I", "/usr/local/lib/dstack-vpn/dstack_vpn_status.py"]
    import importlib.util
    spec = importlib.util.spec_from_file_location("dstack_vpn_status_unit", SCRIPT)
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    with pytest.raises(SystemExit):  # not an interface name: refused, not passed on to wg
        program.parse_args(argv[3:], environ={})
    opts = program.parse_args(exec_start_argv(parse_unit(render_helper(HELPER_SERVICE)))[3:], environ={})
    assert (opts.dump_helper, opts.interface, opts.wg_dump_socket) == (True, "wg0", DUMP_SOCKET)


def test_systemd_analyze_verify_helper_units(tmp_path):
    analyze = need_tool("systemd-analyze")
    install_dir = tmp_path / "lib" / "dstack-vpn"
    install_dir.mkdir(parents=True)
    shutil.copy(SCRIPT, install_dir / "dstack_vpn_status.py")
    paths = []
    for name in (HELPER_SOCKET, HELPER_SERVICE):
        path = tmp_path / name
        path.write_text(render_helper(name, install_dir=str(install_dir)))
        paths.append(str(path))
    result = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
