#!/usr/bin/env python3
"""dstack-vpn status service: a small read-only HTTP page about a spoke's tunnel.

Runs on every spoke (systemd unit on hosts, a plain process in a container).
Standard library only, Python 3.9+: the hosts and containers it lands on have
python3 and nothing else.

Endpoints (GET or HEAD; JSON unless said otherwise):
  /status   node, interface, peers with handshake ages and byte counts, free
            disk space, PostgreSQL role where PostgreSQL runs, the time (UTC)
  /health   200 {"ok": true} while the interface is up and the hub handshake
            is recent, else 503 {"ok": false, "reason": "..."}
  /metrics  the same figures in the Prometheus text exposition format

Every option can also be given as an environment variable
DSTACK_VPN_STATUS_<OPTION> (e.g. DSTACK_VPN_STATUS_LISTEN_PORT=8000); the
command line wins over the environment.

No secret ever leaves `wg show <if> dump`: the interface private key and the
preshared keys are dropped by parse_dump() itself, so nothing after it holds
them.

Two processes where it is deployed (privilege separation):
  --dump-helper  root, with CAP_NET_ADMIN alone (what `wg show` needs); reads
                 nothing from anyone: for each connection to its UNIX socket
                 (--wg-dump-socket, or the one systemd passes it) it runs
                 `wg show <if> dump` and writes back the dump as parse_dump()
                 keeps it, re-written with "(hidden)" where the keys were.
  the HTTP page  no capability at all, an unprivileged user; with
                 --wg-dump-socket it reads that filtered dump from the helper
                 instead of running wg (without it, it runs wg itself: for
                 development and tests).
"""

import sys


def _asks_patroni(argv, environ) -> bool:
    """Whether this run reads Patroni's REST API (over TLS): --patroni-url, or its variable, set."""
    for i, arg in enumerate(argv):
        if arg == "--patroni-url" and i + 1 < len(argv) and argv[i + 1]:
            return True
        if arg.startswith("--patroni-url=") and arg.split("=", 1)[1]:
            return True
    return bool(environ.get("DSTACK_VPN_STATUS_PATRONI_URL"))


if __name__ == "__main__" and "ssl" not in sys.modules:
    import os as _os
    if not _asks_patroni(sys.argv[1:], _os.environ):
        # Plain HTTP only: stop asyncio from loading OpenSSL for TLS it will
        # never do (about 5 MB resident). Only when run as a program, never in
        # a process that imports this module, and not on a PostgreSQL member,
        # where the page asks Patroni over TLS.
        sys.modules["ssl"] = None  # type: ignore[assignment]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import email.utils  # noqa: E402
import errno  # noqa: E402
import http  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple

ENV_PREFIX = "DSTACK_VPN_STATUS_"

# One reading of the node is shared by every request for this long, so `wg`
# runs at most once per second however many clients ask. A reading up to
# STALE_SECONDS old is still served while the next one is taken, so that
# under load nobody waits for wg; older than that, a request waits for it.
CACHE_SECONDS = 1.0
STALE_SECONDS = 2.0

# Request limits: a status page needs a few hundred bytes of request; these
# bound what one connection can make the process hold.
MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 16 * 1024
MAX_HEADERS = 64
# Input read and thrown away while closing a connection gently (see close()).
MAX_DRAIN = 1024 * 1024

# wg's own output for a spoke is a few hundred bytes; a hub with many peers a
# few hundred kilobytes. More than this is not a dump.
MAX_WG_OUTPUT = 4 * 1024 * 1024

# Connections. Each holds a file descriptor: the cap on all of them stays this
# many descriptors below the open-files limit (RLIMIT_NOFILE), which leaves room
# for the listening socket, the event loop, wg's pipes and /proc reads, so
# accept() never fails for want of one. IPv6 clients count per /64, the block
# one host usually gets.
FD_RESERVE = 64
IPV6_SOURCE_PREFIX = 64
# Connections accepted per wake-up of the listening socket, so that a flood of
# them cannot hold the loop for long.
ACCEPT_BATCH = 64
# After a last answer (an error, a timeout), what the client still sends is
# read and dropped for at most this long, so that its answer is not destroyed
# by a reset (see Connection.close); then the connection is cut.
CLOSE_GRACE = 1.0
# One log line at most this often for each kind of trouble (refused
# connections, accept errors, errors inside asyncio): a flood shows as a count.
LOG_INTERVAL = 10.0

# The dump helper's answer: "ok\n" and the dump without keys, or "error
# <message>\n" (a message that is safe to show to clients). A reading is
# reused by the helper for this long, however often it is asked.
HELPER_OK = "ok"
HELPER_ERROR = "error "
HELPER_MIN_INTERVAL = 0.5
HIDDEN = "(hidden)"

SERVER_NAME = "dstack-vpn-status"
ALLOWED_METHODS = ("GET", "HEAD")

_KEY_RE = re.compile(r"[A-Za-z0-9+/]{43}=")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.=+-]{1,15}")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_END_OF_HEAD_RE = re.compile(rb"\r?\n\r?\n")


# --------------------------------------------------------------------------
# `wg show <if> dump`


class WgError(Exception):
    """Reading the interface failed; the message is safe to show to clients."""


class Peer(NamedTuple):
    public_key: str
    endpoint: Optional[str]  # None for "(none)"
    allowed_ips: Tuple[str, ...]
    latest_handshake: int  # Unix time; 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: Optional[int]  # None for "off"


class Interface(NamedTuple):
    public_key: Optional[str]
    listen_port: int
    fwmark: Optional[int]
    peers: Tuple[Peer, ...]


def parse_dump(text: str) -> Interface:
    """Parse `wg show <if> dump`, keeping no private or preshared key.

    Errors name the line and the field, never the content: a malformed line
    may well be the one holding the private key.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise WgError("wg printed nothing")
    fields = lines[0].split("\t")
    if len(fields) != 4:
        raise WgError(
            "cannot parse wg output: line 1 has %d tab-separated fields, "
            "expected 4 (private key, public key, listen port, fwmark)" % len(fields))
    # fields[0] is the interface private key: deliberately never read.
    public_key = _key_or_none(fields[1], 1, "interface public key")
    listen_port = _number(fields[2], 1, "listen port")
    fwmark = None if fields[3] == "off" else _number(fields[3], 1, "fwmark", base=0)
    peers = []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 8:
            raise WgError(
                "cannot parse wg output: line %d has %d tab-separated fields, "
                "expected 8 (a peer)" % (n, len(fields)))
        # fields[1] is the preshared key: deliberately never read.
        key, _, endpoint, allowed, handshake, rx, tx, keepalive = fields
        if not _KEY_RE.fullmatch(key):
            raise WgError("cannot parse wg output: line %d: peer public key is not a WireGuard key" % n)
        peers.append(Peer(
            public_key=key,
            endpoint=None if endpoint == "(none)" else _endpoint(endpoint, n),
            allowed_ips=() if allowed == "(none)" else _networks(allowed, n),
            latest_handshake=_number(handshake, n, "latest handshake"),
            rx_bytes=_number(rx, n, "transfer rx"),
            tx_bytes=_number(tx, n, "transfer tx"),
            persistent_keepalive=None if keepalive == "off" else _number(keepalive, n, "persistent keepalive"),
        ))
    return Interface(public_key, listen_port, fwmark, tuple(peers))


def _key_or_none(value: str, line: int, what: str) -> Optional[str]:
    if value == "(none)":
        return None
    if not _KEY_RE.fullmatch(value):
        raise WgError("cannot parse wg output: line %d: %s is not a WireGuard key" % (line, what))
    return value


def _number(value: str, line: int, what: str, base: int = 10) -> int:
    try:
        number = int(value, base)
    except ValueError:
        number = -1
    if number < 0:
        raise WgError("cannot parse wg output: line %d: %s is not a number" % (line, what))
    return number


def _endpoint(value: str, line: int) -> str:
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise WgError("cannot parse wg output: line %d: endpoint is not address:port" % line)
    return value


def _networks(value: str, line: int) -> Tuple[str, ...]:
    networks = tuple(value.split(","))
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise WgError("cannot parse wg output: line %d: allowed ips are not networks" % line) from None
    return networks


async def read_interface(wg: str, interface: str, timeout: float) -> Interface:
    """Run `wg show <interface> dump` once and parse it; WgError on any failure."""
    command = "%s show %s dump" % (wg, interface)
    try:
        # A session of its own, so that a hung wg and anything it started can
        # be killed as one group.
        proc = await asyncio.create_subprocess_exec(
            wg, "show", interface, "dump", stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except OSError as e:
        raise WgError("cannot run `%s`: %s" % (command, e.strerror or e)) from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        raise WgError("`%s` timed out after %g s" % (command, timeout)) from None
    except asyncio.CancelledError:
        _kill_group(proc.pid)  # shutting down: leave no wg behind
        raise
    if proc.returncode != 0:
        message = _last_line(err) or "no message"
        raise WgError("`%s` exited %d: %s%s" % (command, proc.returncode, message, _socket_hint(interface)))
    if len(out) > MAX_WG_OUTPUT:
        raise WgError("`%s` printed more than %d bytes" % (command, MAX_WG_OUTPUT))
    try:
        text = out.decode("ascii")
    except UnicodeDecodeError:
        raise WgError("cannot parse wg output: it is not ASCII text") from None
    return parse_dump(text)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass  # already gone


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return ""
    return "".join(c if c.isprintable() else "?" for c in lines[-1][:200])


def _socket_hint(interface: str) -> str:
    # wireguard-go (userspace WireGuard) answers on a root-only UNIX socket
    # (0700); without CAP_DAC_OVERRIDE wg reports "Permission denied", or
    # "Protocol not supported" where the directory is 0700 too.
    path = "/run/wireguard/%s.sock" % interface
    try:
        os.stat(path)
    except PermissionError:
        pass  # the directory itself is closed to us
    except OSError:
        return ""  # no socket: a kernel interface, or none at all
    else:
        if os.access(path, os.W_OK):
            return ""
    return (" (a userspace WireGuard interface: reaching %s needs CAP_DAC_OVERRIDE, "
            "see the dstack-vpn-status unit)" % path)


def format_dump(iface: Interface) -> str:
    """`wg show <if> dump` again, from what parse_dump() kept: "(hidden)" where
    the private and preshared keys were (Interface holds neither)."""
    lines = ["\t".join((HIDDEN, iface.public_key or "(none)", str(iface.listen_port),
                        "off" if iface.fwmark is None else "0x%x" % iface.fwmark))]
    for p in iface.peers:
        lines.append("\t".join((
            p.public_key, HIDDEN, p.endpoint or "(none)", ",".join(p.allowed_ips) or "(none)",
            str(p.latest_handshake), str(p.rx_bytes), str(p.tx_bytes),
            "off" if p.persistent_keepalive is None else str(p.persistent_keepalive))))
    return "\n".join(lines) + "\n"


async def read_interface_from_helper(path: str, timeout: float) -> Interface:
    """Ask the dump helper at `path` (see serve_dumps) once; WgError on any failure."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)

    async def ask() -> bytes:
        await loop.sock_connect(sock, path)
        data = b""
        while len(data) <= MAX_WG_OUTPUT:
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                return data
            data += chunk
        raise WgError("the dump helper at %s sent more than %d bytes" % (path, MAX_WG_OUTPUT))

    try:
        data = await asyncio.wait_for(ask(), timeout)
    except asyncio.TimeoutError:
        raise WgError("the dump helper at %s did not answer within %g s" % (path, timeout)) from None
    except OSError as e:
        raise WgError("cannot reach the dump helper at %s: %s" % (path, e.strerror or e)) from None
    finally:
        sock.close()
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise WgError("the dump helper's answer is not ASCII text") from None
    status, _, dump = text.partition("\n")
    if status == HELPER_OK:
        return parse_dump(dump)
    if status.startswith(HELPER_ERROR):
        raise WgError(_printable(status[len(HELPER_ERROR):]) or "the dump helper failed")
    raise WgError("the dump helper's answer is not understood" if data else "the dump helper closed without answering")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:300])


# --------------------------------------------------------------------------
# The dump helper (root)


def dump_reply(opts: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> bytes:
    """One answer of the helper: the dump without keys, or the reason there is none."""
    try:
        iface = loop.run_until_complete(read_interface(opts.wg, opts.interface, opts.wg_timeout))
    except WgError as e:
        return ("%s%s\n" % (HELPER_ERROR, _printable(str(e)))).encode("ascii", "replace")
    except Exception as e:  # a bug; say where, never what (see Monitor._read)
        log("dump helper: internal error: %s" % type(e).__name__)
        return ("%sinternal error in the dump helper: %s\n" % (HELPER_ERROR, type(e).__name__)).encode()
    return ("%s\n%s" % (HELPER_OK, format_dump(iface))).encode("ascii")


def helper_listener(path: str) -> Tuple[socket.socket, bool]:
    """(listening socket, whether it is ours to remove): systemd's (socket
    activation) where it passed one, else a new one at `path`.

    A socket of our own is 0666: who may connect is decided by the folder it
    is in, which whoever starts the helper makes (e.g. root:nogroup 0710).
    """
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS", "0") != "0":
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)  # not for wg
        sock = socket.socket(fileno=3)  # SD_LISTEN_FDS_START
        os.set_inheritable(sock.fileno(), False)
        return sock, False
    if not path:
        raise OSError(errno.EINVAL, "no socket: give --wg-dump-socket")
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by a helper that was killed
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock, True


def serve_dumps(opts: argparse.Namespace) -> int:
    """The helper: one connection at a time, each answered with dump_reply()
    (reused for HELPER_MIN_INTERVAL), then closed. Reads nothing it is sent."""
    try:
        listener, own = helper_listener(opts.wg_dump_socket)
    except OSError as e:
        log("dump helper: cannot listen on %s: %s" % (opts.wg_dump_socket, e.strerror or e))
        return 1
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        if not busy:
            raise SystemExit(0)

    busy = False
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    loop = asyncio.new_event_loop()
    reply, taken = b"", -HELPER_MIN_INTERVAL
    log("dump helper: `%s show %s dump` without keys on %s" % (opts.wg, opts.interface,
                                                                listener.getsockname() or opts.wg_dump_socket))
    try:
        while not stopping:
            conn, _ = listener.accept()
            busy = True
            with conn:
                if time.monotonic() - taken >= HELPER_MIN_INTERVAL:
                    reply = dump_reply(opts, loop)
                    taken = time.monotonic()
                conn.settimeout(opts.wg_timeout)  # a client that does not read is not waited for
                try:
                    conn.sendall(reply)
                except OSError:
                    pass
            busy = False
    except SystemExit:
        pass
    finally:
        loop.close()
        listener.close()
        if own:
            try:
                os.unlink(opts.wg_dump_socket)
            except OSError:
                pass
    return 0


# --------------------------------------------------------------------------
# The rest of the node


def interface_is_down(interface: str) -> bool:
    """True when sysfs says the link is administratively down.

    Where sysfs has no entry for it (another network namespace's sysfs), wg
    answering is all we know, so the link counts as up.
    """
    try:
        with open("/sys/class/net/%s/flags" % interface) as f:
            return not int(f.read().strip(), 16) & 0x1  # IFF_UP
    except (OSError, ValueError):
        return False


def disk_free_bytes(path: str = "/") -> Optional[int]:
    # f_bavail, not f_bfree: the space an unprivileged writer can still use.
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_size_bytes(path: str = "/") -> Optional[int]:
    # f_blocks less what only root may use: the size an unprivileged writer's free space is of
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return (st.f_blocks - st.f_bfree + st.f_bavail) * st.f_frsize


def postgres_role(proc: str = "/proc") -> Optional[Dict[str, Optional[str]]]:
    """{"role": "primary"|"replica"|None} where a postmaster runs, else None.

    The postmaster is a process called postgres (or postmaster) whose parent
    is not one. Its role comes from standby.signal/recovery.signal in its
    data directory (-D or --pgdata= on its command line) where that directory
    can be searched; PostgreSQL keeps it 0700, so an unprivileged reader
    falls back on the process titles, which anyone may read: a standby runs
    a "startup ... recovering" or a "walreceiver" process. The role is None
    where neither answers (e.g. update_process_title = off). PostgreSQL 12+;
    a PostgreSQL in another PID namespace (another container) is not seen.
    """
    procs = {}  # pid -> (comm, ppid)
    try:
        entries = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return None
    for pid in entries:
        try:
            with open("%s/%s/stat" % (proc, pid), "rb") as f:
                stat = f.read().decode("utf-8", "replace")
        except OSError:
            continue  # the process has gone
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) > 1 and rest[1].isdigit():
            procs[int(pid)] = (comm, int(rest[1]))
    names = ("postgres", "postmaster")
    postmasters = sorted(pid for pid, (comm, ppid) in procs.items()
                         if comm in names and procs.get(ppid, ("",))[0] not in names)
    if not postmasters:
        return None
    postmaster = postmasters[0]
    role = _role_from_signal_files(_cmdline(proc, postmaster))
    if role is None:
        titles = [_cmdline(proc, pid) for pid, (_, ppid) in procs.items() if ppid == postmaster]
        titles = [" ".join(t) for t in titles if t and t[0].startswith("postgres: ")]
        if any("walreceiver" in t or "startup recovering" in t or "startup waiting" in t for t in titles):
            role = "replica"
        elif titles:
            role = "primary"
    return {"role": role}


# Patroni's names for a member's role, as the status page says them (Patroni 3 says "master",
# Patroni 4 "primary").
PATRONI_ROLES = {"master": "primary", "primary": "primary", "replica": "replica",
                 "standby_leader": "standby_leader", "sync_standby": "replica"}


async def patroni_role(url: str, cafile: str, timeout: float) -> Dict[str, Optional[str]]:
    """{"role", "state", "source": "patroni"} from GET <url>/patroni (Patroni's REST API, TLS,
    the server's certificate checked against cafile); role None when Patroni does not answer."""
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 8008
    answer: Dict[str, Optional[str]] = {"role": None, "state": None, "source": "patroni"}
    writer = None
    try:
        context = ssl.create_default_context(cafile=cafile) if parts.scheme == "https" else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host if context else None), timeout)
        writer.write(("GET /patroni HTTP/1.0\r\nHost: %s:%d\r\nAccept: application/json\r\n\r\n"
                      % (host, port)).encode())
        raw = await asyncio.wait_for(reader.read(65536), timeout)
        head, _, body = raw.partition(b"\r\n\r\n")
        # Patroni answers 200 on a primary and 503 elsewhere; the body says which, either way
        doc = json.loads(body.decode("utf-8", "replace"))
        if isinstance(doc, dict):
            role = doc.get("role")
            answer["role"] = PATRONI_ROLES.get(role, role if isinstance(role, str) else None)
            state = doc.get("state")
            answer["state"] = state if isinstance(state, str) else None
    except (OSError, ValueError, asyncio.TimeoutError):
        pass
    finally:
        if writer is not None:
            writer.close()
    return answer


def _cmdline(proc: str, pid: int) -> List[str]:
    try:
        with open("%s/%d/cmdline" % (proc, pid), "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return raw.decode("utf-8", "replace").rstrip("\0").split("\0")


def _role_from_signal_files(argv: List[str]) -> Optional[str]:
    data_dir = None
    for i, arg in enumerate(argv):
        if arg == "-D" and i + 1 < len(argv):
            data_dir = argv[i + 1]
        elif arg.startswith("--pgdata="):
            data_dir = arg.split("=", 1)[1]
    # A relative -D is relative to where the postmaster started: unknowable.
    if not data_dir or not os.path.isabs(data_dir) or not os.path.isdir(data_dir):
        return None
    for name in ("standby.signal", "recovery.signal"):
        try:
            os.stat(os.path.join(data_dir, name))
            return "replica"
        except FileNotFoundError:
            continue
        except OSError:
            return None  # cannot look inside: unknown, not "primary"
    return "primary"


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------
# Documents built from one reading


def handshake_age(peer: Peer, now: float) -> Optional[int]:
    if peer.latest_handshake == 0:
        return None
    return max(0, int(now - peer.latest_handshake))  # clocks may disagree a little


def backup_status(path: str, now: float) -> Dict[str, Any]:
    """The backups as this member's status timer last saw them (the file it writes every minute;
    no secret in it): the newest backup's age, how far this member's WAL is past the newest
    archived segment, and how old that reading is."""
    out: Dict[str, Any] = {"last_backup_type": None, "last_backup_age_sec": None, "archive_lag_bytes": None,
                           "archive_max_wal": None, "checked_age_sec": None, "error": None}
    try:
        with open(path) as f:
            raw = json.load(f)
        last = raw.get("last_backup") or {}
        if isinstance(last.get("stop"), (int, float)):
            out["last_backup_type"] = last.get("type") if isinstance(last.get("type"), str) else None
            out["last_backup_age_sec"] = max(0, int(now - last["stop"]))
        lag = raw.get("archive_lag_bytes")
        out["archive_lag_bytes"] = lag if isinstance(lag, int) and not isinstance(lag, bool) else None
        wal = raw.get("archive_max_wal")
        out["archive_max_wal"] = wal if isinstance(wal, str) and len(wal) == 24 else None
        if isinstance(raw.get("checked"), (int, float)):
            out["checked_age_sec"] = max(0, int(now - raw["checked"]))
        error = raw.get("error")
        out["error"] = error[:300] if isinstance(error, str) else None
    except FileNotFoundError:
        out["error"] = "no reading yet"
    except (OSError, ValueError, AttributeError):
        out["error"] = "unreadable reading"
    return out


def status_document(opts: argparse.Namespace, iface: Interface, now: float,
                    disk_bytes: Optional[int], postgres: Optional[dict]) -> dict:
    ages = [handshake_age(p, now) for p in iface.peers]
    known = [a for a in ages if a is not None]
    doc = {
        "node": opts.node_name,
        "overlay_ip": opts.overlay_ip or None,
        "interface": opts.interface,
        "peer_count": len(iface.peers),
        "peers_up": sum(1 for a in known if a <= opts.handshake_recent),
        # The oldest of the latest handshakes; unknown while any peer has none.
        "max_last_handshake_sec": max(known) if known and len(known) == len(ages) else None,
        "peers": [{
            "public_key": p.public_key,
            "endpoint": p.endpoint,
            "allowed_ips": list(p.allowed_ips),
            "last_handshake_sec": age,
            "rx_bytes": p.rx_bytes,
            "tx_bytes": p.tx_bytes,
        } for p, age in zip(iface.peers, ages)],
        "disk_free_gb": None if disk_bytes is None else round(disk_bytes / 2 ** 30, 1),
    }
    if postgres is not None:
        doc["postgres"] = postgres
    if getattr(opts, "backup_status", ""):
        doc["backup"] = backup_status(opts.backup_status, now)
    doc["time"] = rfc3339(now)
    return doc


def health_problem(opts: argparse.Namespace, iface: Interface, now: float) -> Optional[str]:
    """Why the tunnel is not healthy, or None when it is."""
    if interface_is_down(opts.interface):
        return "interface %s is down" % opts.interface
    if opts.hub_public_key:
        hubs = [p for p in iface.peers if p.public_key == opts.hub_public_key]
        if not hubs:
            return "the hub (peer %s) is not configured on %s" % (opts.hub_public_key, opts.interface)
        what = "the hub"
    else:
        hubs = list(iface.peers)
        if not hubs:
            return "no peer is configured on %s" % opts.interface
        what = "the hub" if len(hubs) == 1 else "any peer"
    ages = [a for a in (handshake_age(p, now) for p in hubs) if a is not None]
    if not ages:
        return "no handshake with %s yet" % what
    if min(ages) > opts.handshake_recent:
        return "last handshake with %s was %d s ago (limit %d s)" % (what, min(ages), opts.handshake_recent)
    return None


def metrics_text(opts: argparse.Namespace, iface: Interface, now: float,
                 disk_bytes: Optional[int], doc: dict, disk_size: Optional[int] = None) -> str:
    itf = 'interface="%s"' % _label(opts.interface)
    out = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append("# HELP %s %s" % (name, help_text.replace("\\", "\\\\").replace("\n", "\\n")))
        out.append("# TYPE %s %s" % (name, kind))

    family("dstack_vpn_status_info", "gauge", "The node this status page describes.")
    out.append('dstack_vpn_status_info{node="%s",%s,overlay_ip="%s"} 1'
               % (_label(opts.node_name), itf, _label(opts.overlay_ip)))
    family("dstack_vpn_peers", "gauge", "Configured WireGuard peers.")
    out.append("dstack_vpn_peers{%s} %d" % (itf, doc["peer_count"]))
    family("dstack_vpn_peers_up", "gauge",
           "Peers whose latest handshake is at most %d s old." % opts.handshake_recent)
    out.append("dstack_vpn_peers_up{%s} %d" % (itf, doc["peers_up"]))
    peer_labels = ['%s,public_key="%s"' % (itf, _label(p.public_key)) for p in iface.peers]
    family("dstack_vpn_peer_last_handshake_age_seconds", "gauge",
           "Seconds since the peer's latest handshake; +Inf if it never completed one.")
    for labels, p in zip(peer_labels, iface.peers):
        age = handshake_age(p, now)
        out.append("dstack_vpn_peer_last_handshake_age_seconds{%s} %s"
                   % (labels, "+Inf" if age is None else age))
    family("dstack_vpn_peer_receive_bytes_total", "counter", "Bytes received from the peer.")
    for labels, p in zip(peer_labels, iface.peers):
        out.append("dstack_vpn_peer_receive_bytes_total{%s} %d" % (labels, p.rx_bytes))
    family("dstack_vpn_peer_transmit_bytes_total", "counter", "Bytes sent to the peer.")
    for labels, p in zip(peer_labels, iface.peers):
        out.append("dstack_vpn_peer_transmit_bytes_total{%s} %d" % (labels, p.tx_bytes))
    if disk_bytes is not None:
        family("dstack_vpn_disk_free_bytes", "gauge", "Bytes free for unprivileged use on /.")
        out.append('dstack_vpn_disk_free_bytes{path="/"} %d' % disk_bytes)
    if disk_size is not None:
        family("dstack_vpn_disk_size_bytes", "gauge", "Bytes of / an unprivileged writer can fill (used and free).")
        out.append('dstack_vpn_disk_size_bytes{path="/"} %d' % disk_size)
    backup = doc.get("backup")
    if backup is not None:
        family("dstack_vpn_backup_last_age_seconds", "gauge",
               "Seconds since the newest backup in the repository finished; +Inf if there is none.")
        age = backup["last_backup_age_sec"]
        out.append("dstack_vpn_backup_last_age_seconds %s" % ("+Inf" if age is None else age))
        family("dstack_vpn_backup_archive_lag_bytes", "gauge",
               "Bytes of this member's WAL past the newest segment in the repository's archive.")
        lag = backup["archive_lag_bytes"]
        out.append("dstack_vpn_backup_archive_lag_bytes %s" % ("NaN" if lag is None else lag))
        family("dstack_vpn_backup_reading_age_seconds", "gauge",
               "Seconds since the backup figures were read from the repository; +Inf if never.")
        checked = backup["checked_age_sec"]
        out.append("dstack_vpn_backup_reading_age_seconds %s" % ("+Inf" if checked is None else checked))
    return "\n".join(out) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --------------------------------------------------------------------------
# The cached reading


class Response(NamedTuple):
    status: int
    head: bytes  # status line and the headers that never change
    body: bytes


def make_response(status: int, body: bytes, content_type: str = "application/json",
                  extra: Tuple[Tuple[str, str], ...] = ()) -> Response:
    lines = ["HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase),
             "Server: " + SERVER_NAME,
             "Content-Type: " + content_type,
             "Content-Length: %d" % len(body),
             "Cache-Control: no-store"]
    lines.extend("%s: %s" % h for h in extra)
    return Response(status, ("\r\n".join(lines) + "\r\n").encode("latin-1"), body)


def json_response(status: int, doc: dict, extra: Tuple[Tuple[str, str], ...] = ()) -> Response:
    return make_response(status, json.dumps(doc).encode() + b"\n", extra=extra)


class Snapshot(NamedTuple):
    taken: float  # time.monotonic() when the reading finished
    routes: Dict[str, Response]
    problem: Optional[str]  # for the log: None when healthy


class Monitor:
    """Reads the node at most once per CACHE_SECONDS; requests share the reading.

    The event loop goes on serving while wg runs (it may take up to
    --wg-timeout); the rest of a reading (parsing, /proc, building the
    answers) takes a millisecond or two and runs on the loop itself, where it
    competes with no other thread for the GIL.
    """

    def __init__(self, opts: argparse.Namespace, loop: asyncio.AbstractEventLoop):
        self.opts = opts
        self.loop = loop
        self.snapshot: Optional[Snapshot] = None
        self._reading: Optional[asyncio.Future] = None

    def usable(self) -> Optional[Snapshot]:
        """The reading to answer from now, or None: wait for reading()."""
        snap = self.snapshot
        age = time.monotonic() - snap.taken if snap else STALE_SECONDS
        if age >= CACHE_SECONDS:
            self.reading()
        return snap if age < STALE_SECONDS else None

    def reading(self) -> asyncio.Future:
        """The reading in progress, started if none is: one wg call for all who wait."""
        if self._reading is None:
            self._reading = self.loop.create_task(self._read())
            # Registered first, so it runs before any waiter's callback.
            self._reading.add_done_callback(self._store)
        return self._reading

    def _store(self, reading: asyncio.Future) -> None:
        self._reading = None
        if reading.cancelled():
            return  # shutting down
        previous = self.snapshot
        self.snapshot = reading.result()  # _read catches every Exception
        if (previous.problem if previous else None) != self.snapshot.problem:
            log("health: %s" % (self.snapshot.problem or "ok"))

    async def _read(self) -> Snapshot:
        try:
            return await self._read_node()
        except WgError as e:
            reason = str(e)
            failed = json_response(503, {"error": "cannot read WireGuard interface %s" % self.opts.interface,
                                         "reason": reason})
        except Exception as e:  # a bug: still cached, so wg keeps its once-a-second pace
            # Where, not what: the message of an exception raised while the
            # dump was at hand could quote it, private key and all.
            tb = e.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            reason = "internal error: %s" % type(e).__name__
            log("%s at line %s" % (reason, tb.tb_lineno if tb else "?"))
            failed = error_response(500, "internal error")
        return Snapshot(time.monotonic(), {
            "/status": failed, "/metrics": failed,
            "/health": json_response(503, {"ok": False, "reason": reason}),
        }, reason)

    async def _read_node(self) -> Snapshot:
        opts = self.opts
        if opts.wg_dump_socket:
            # The helper runs wg with the same timeout: a second more to hear it say so.
            iface = await read_interface_from_helper(opts.wg_dump_socket, opts.wg_timeout + 1)
        else:
            iface = await read_interface(opts.wg, opts.interface, opts.wg_timeout)
        now = time.time()
        disk_bytes = disk_free_bytes()
        if opts.patroni_url:  # a member of the cluster: Patroni knows its role, not the process titles
            postgres = await patroni_role(opts.patroni_url, opts.patroni_ca, opts.wg_timeout)
        else:
            postgres = postgres_role()
        doc = status_document(opts, iface, now, disk_bytes, postgres)
        problem = health_problem(opts, iface, now)
        health = ({"ok": True} if problem is None else {"ok": False, "reason": problem})
        return Snapshot(time.monotonic(), {
            "/status": json_response(200, doc),
            "/health": json_response(200 if problem is None else 503, health),
            "/metrics": make_response(200, metrics_text(opts, iface, now, disk_bytes, doc, disk_size_bytes()).encode(),
                                      content_type="text/plain; version=0.0.4; charset=utf-8"),
        }, problem)


# --------------------------------------------------------------------------
# HTTP
#
# A small HTTP/1.1 server on asyncio's protocol layer rather than
# http.server's thread per connection: one thread serves every connection, so
# a hundred busy clients cost a hundred small buffers rather than a hundred
# threads taking turns at the GIL (measured with benchmarks/status_load.py,
# 100 clients: 18 us of CPU per request instead of 30-70, p99 8 ms instead of
# about 30). Also: every
# answer (malformed, too large, timed out) is JSON, the limits are ours
# (http.server allows 64 KiB lines and 100 headers), and one deadline covers
# a whole request head, which a client trickling a byte at a time cannot
# stretch.


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> Response:
    extra = (("Allow", ", ".join(ALLOWED_METHODS)),) if status == 405 else ()
    return json_response(status, {"error": message}, extra)


BUSY = error_response(503, "too many connections")
BUSY_SOURCE = error_response(503, "too many connections from your address")
TIMED_OUT = error_response(408, "request timed out")


class Request(NamedTuple):
    method: str
    path: str
    target: str
    version: str
    keep_alive: bool
    has_body: bool


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers (the bytes before the blank line)."""
    lines = head.decode("latin-1").split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.fullmatch(method):
        raise HttpError(400, "malformed method")
    if not re.fullmatch(r"HTTP/\d\.\d", version):
        raise HttpError(400, "malformed HTTP version")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN_RE.fullmatch(name):
            raise HttpError(400, "malformed header field")
        name = name.lower()
        value = value.strip(" \t")
        headers[name] = headers[name] + "," + value if name in headers else value
    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(400, "HTTP/1.1 request without Host")
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    has_body = "transfer-encoding" in headers or headers.get("content-length", "0").strip() != "0"
    # Absolute-form ("GET http://host/status") names the same resource.
    path = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*", "", target) or "/"
    path = path.split("?", 1)[0].split("#", 1)[0]
    return Request(method, path, target, version, keep_alive, has_body)


class Connection(asyncio.Protocol):
    """One client connection: requests answered in order, keep-alive, deadlines."""

    def __init__(self, server: "StatusServer", client: str, source: str):
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.client = client
        self.source = source  # what the per-source cap counts: the address, or its /64
        self.evicted = False
        self.buffer = b""
        self.scanned = 0  # bytes of buffer already searched for the end of a head
        self.waiting = False  # for a reading of the node
        self.write_paused = False  # the client is not reading its answers
        self.client_done = False  # the client has shut down its sending side
        self.closing = False
        self.drained = 0
        # The time by which the client must have sent a whole request head
        # (or, once we close, read our answer); None while we keep it waiting.
        self.deadline: Optional[float] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.evicted:  # made room for another while its transport was being set up
            transport.abort()
            return
        self.deadline = time.monotonic() + self.server.opts.request_timeout

    def connection_lost(self, exc) -> None:
        self.server.forget(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            self.drained += len(data)
            if self.drained > MAX_DRAIN:
                self.transport.abort()
            return
        self.buffer += data
        self.serve()

    def eof_received(self) -> bool:
        # A client may shut down its side once it has sent its request; one
        # still waiting for its answer gets it before the connection closes.
        self.client_done = True
        return self.waiting

    def pause_writing(self) -> None:
        self.write_paused = True
        self.flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.flow()
        self.serve()

    def flow(self) -> None:
        """Read only while answers can be made and sent: what a client sends
        meanwhile waits in its socket, not in our memory."""
        if self.closing:
            return  # draining: keep reading (and dropping) until the client closes
        if self.waiting or self.write_paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def serve(self) -> None:
        """Answer every complete request in the buffer, in order."""
        while not (self.waiting or self.write_paused or self.closing):
            try:
                head = self.next_head()
                if head is None:
                    return
                request = parse_head(head)
            except HttpError as e:
                self.close(error_response(e.status, str(e)))
                return
            started = time.monotonic()
            response = self.route(request)
            if response is None:  # the reading is old: wait for the next one
                self.waiting, self.deadline = True, None
                self.flow()
                self.server.monitor.reading().add_done_callback(
                    lambda _: self.answer_after_reading(request, started))
                return
            self.answer(request, response, started)

    def answer_after_reading(self, request: Request, started: float) -> None:
        self.waiting = False
        if self.closing or self.transport.is_closing():
            return
        self.flow()
        self.answer(request, self.server.monitor.snapshot.routes[request.path], started)
        self.serve()
        if self.client_done and not (self.waiting or self.closing):
            self.close()

    def next_head(self) -> Optional[bytes]:
        """The next request head, or None until it has all arrived."""
        while True:
            end = _END_OF_HEAD_RE.search(self.buffer, max(0, self.scanned - 3))
            head = self.buffer[:end.start()] if end else self.buffer
            line_length = head.find(b"\n")
            if (line_length if line_length >= 0 else len(head)) > MAX_REQUEST_LINE:
                raise HttpError(414, "request line too long")
            if len(head) > MAX_HEAD:
                raise HttpError(431, "request header fields too large")
            if not end:
                self.scanned = len(self.buffer)
                return None
            self.buffer, self.scanned = self.buffer[end.end():], 0
            head = head.lstrip(b"\r\n")  # blank lines may precede a request
            if head:
                return head

    def route(self, request: Request) -> Optional[Response]:
        if request.path not in ("/status", "/health", "/metrics"):
            return error_response(404, "not found; try /status, /health or /metrics")
        if request.method not in ALLOWED_METHODS:
            return error_response(405, "method not allowed")
        if request.has_body:
            return error_response(400, "a %s request takes no body" % request.method)
        snap = self.server.monitor.usable()
        return snap.routes[request.path] if snap else None

    def answer(self, request: Request, response: Response, started: float) -> None:
        close = not request.keep_alive or request.has_body
        keep = b"Connection: close\r\n" if close else (
            b"Connection: keep-alive\r\n" if request.version == "HTTP/1.0" else b"")
        body = b"" if request.method == "HEAD" else response.body
        self.server.log_request(self.client, request, response, time.monotonic() - started)
        self.transport.write(response.head + http_date() + keep + b"\r\n" + body)
        if close:
            self.close()
        else:
            self.deadline = time.monotonic() + self.server.opts.request_timeout

    def close(self, response: Optional[Response] = None) -> None:
        """Send a last answer (if any), then close gently.

        Closing a socket that still holds unread input makes the kernel send
        a reset, which can destroy the answer before the client reads it. So
        only our sending side is shut down; the client's input is drained
        until it closes too or the deadline passes.
        """
        if response is not None:
            self.transport.write(response.head + http_date() + b"Connection: close\r\n\r\n" + response.body)
        self.closing = True
        self.buffer = b""
        if self.client_done:
            self.transport.close()  # nothing unread is left: an ordinary close
            return
        self.transport.resume_reading()
        self.transport.write_eof()
        self.deadline = time.monotonic() + min(CLOSE_GRACE, self.server.opts.request_timeout)

    def evict(self) -> None:
        """Cut at once, to make room for a client from an address with fewer connections."""
        self.evicted = True
        self.server.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def expire(self) -> None:
        if self.closing:
            self.transport.abort()  # had its time to read our last answer
        elif self.buffer.strip(b"\r\n"):
            self.close(TIMED_OUT)
        else:
            self.close()  # idle: nothing to say


_date_cache = (0, b"")


def http_date() -> bytes:
    """The Date header line, formatted once per second."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, ("Date: %s\r\n" % email.utils.formatdate(second, usegmt=True)).encode())
    return _date_cache[1]


class RateLimitedLog:
    """One kind of trouble, logged at once the first time, then at most one
    line (a count and the latest) every LOG_INTERVAL seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, what: str):
        self.loop, self.what = loop, what
        self.count, self.latest = 0, ""
        self.handle: Optional[asyncio.TimerHandle] = None

    def note(self, detail: str) -> None:
        if self.handle is None:
            log("%s: %s" % (self.what, detail))
            self.handle = self.loop.call_later(LOG_INTERVAL, self.flush)
        else:
            self.count += 1
            self.latest = detail

    def flush(self) -> None:
        self.handle = None
        if self.count:
            log("%s: %d more in the last %g s, the latest: %s" % (self.what, self.count, LOG_INTERVAL, self.latest))
            self.count = 0
            self.handle = self.loop.call_later(LOG_INTERVAL, self.flush)


def source_of(address: str) -> str:
    """What the per-source cap counts: an IPv4 address, or an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network("%s/%d" % (ip, IPV6_SOURCE_PREFIX), strict=False))
    return str(ip)


def open_files_limit() -> int:
    """RLIMIT_NOFILE, its soft limit raised to the hard one (LimitNOFILE= in
    the unit sets both); what this process may have open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return min(soft, hard)


class StatusServer:
    """Accepts connections itself, so that it decides before a connection costs
    more than its descriptor: a connection over a cap is closed at once.

    Caps: --max-connections-per-source for one address (an IPv6 /64), and
    --max-connections in all, kept FD_RESERVE below the open-files limit. A
    client from an address holding fewer connections than the busiest one is
    not turned away when all are taken: the busiest address's oldest
    connection makes room. So however many connections one address (or a
    few) holds, idle or trickling, a new client still gets in.
    """

    def __init__(self, opts: argparse.Namespace, loop: asyncio.AbstractEventLoop, fd_limit: Optional[int] = None):
        self.opts = opts
        self.loop = loop
        self.monitor = Monitor(opts, loop)
        self.connections: Set[Connection] = set()
        self.by_source: Dict[str, Dict[Connection, None]] = {}  # oldest first
        self.fd_limit = fd_limit if fd_limit is not None else open_files_limit()
        self.max_connections = max(1, min(opts.max_connections, self.fd_limit - FD_RESERVE))
        self.listener: Optional[socket.socket] = None
        self.spare: Optional[int] = None  # a descriptor kept to give back if accept() ever runs out
        self.refused = RateLimitedLog(loop, "refusing connections")
        self.accept_errors = RateLimitedLog(loop, "accept failed")
        self.loop_errors = RateLimitedLog(loop, "error")

    def start(self, sock: socket.socket) -> None:
        sock.listen(1024)  # a backlog big enough that a hundred clients connecting at once see no SYN drops
        sock.setblocking(False)
        self.listener = sock
        self.spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.loop.set_exception_handler(self.loop_exception)
        self.loop.add_reader(sock.fileno(), self.accept)

    def stop(self) -> None:
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None
        for conn in list(self.connections):
            conn.evict()

    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self.shed()
                    return
                self.accept_errors.note(e.strerror or str(e))
                if e.errno in (errno.ECONNABORTED, errno.EPERM, errno.EPROTO):
                    continue  # that connection only
                return
            if self.admit(sock, address[0] if address else "?"):
                # A connection was cut to make room; its descriptor is closed on the
                # loop's next turn. Accept more only then, so that no more than one
                # descriptor is ever over the cap.
                return

    def shed(self) -> None:
        """accept() found no free descriptor (which the cap should prevent):
        take one connection off the queue with the spare and close it, so the
        queue keeps moving rather than the loop spinning on it."""
        self.accept_errors.note("no free file descriptor (%d connections open)" % len(self.connections))
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None
            try:
                sock, _ = self.listener.accept()
                sock.close()
            except OSError:
                pass
            try:
                self.spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
        if self.spare is None:
            # Not even that: rest a moment instead of spinning.
            self.loop.remove_reader(self.listener.fileno())
            self.loop.call_later(0.1, self.loop.add_reader, self.listener.fileno(), self.accept)

    def admit(self, sock: socket.socket, client: str) -> bool:
        """Serve the connection, or refuse it at once; True where another was cut for it."""
        source = source_of(client)
        mine = self.by_source.get(source)
        held = len(mine) if mine else 0
        evicted = False
        if held >= self.opts.max_connections_per_source:
            self.refuse(sock, BUSY_SOURCE, "%s holds %d connections (the limit per address)" % (source, held))
            return False
        if len(self.connections) >= self.max_connections:
            busiest = max(self.by_source.values(), key=len)
            # Only where that makes the shares more even: otherwise two
            # addresses would take a slot from each other in turn.
            if len(busiest) <= held + 1:
                self.refuse(sock, BUSY, "%d connections open (the limit); %s holds %d" % (
                    len(self.connections), source, held))
                return False
            next(iter(busiest)).evict()
            evicted = True
        conn = Connection(self, client, source)
        self.connections.add(conn)
        self.by_source.setdefault(source, {})[conn] = None
        self.loop.create_task(self.connect(conn, sock))
        return evicted

    async def connect(self, conn: Connection, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: conn, sock)
        except Exception as e:  # e.g. the client reset the connection already
            self.forget(conn)
            sock.close()
            self.accept_errors.note("%s: %s" % (conn.client, type(e).__name__))

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        mine = self.by_source.get(conn.source)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.by_source[conn.source]

    def refuse(self, sock: socket.socket, response: Response, why: str) -> None:
        """A connection over a cap: a last answer, if the client can take it
        now, and closed at once. What it already sent is read first, so that
        the close does not become a reset that destroys the answer."""
        try:
            sock.setblocking(False)
            try:
                sock.recv(MAX_HEAD)
            except OSError:
                pass
            sock.send(response.head + http_date() + b"Connection: close\r\n\r\n" + response.body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()
        self.refused.note(why)

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio's own errors (a failed write, a callback that raised): one
        line, rate-limited; no traceback in the log for every one of them."""
        exc = context.get("exception")
        where = ""
        if exc is not None:
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = ": %s%s" % (type(exc).__name__, " at line %d" % tb.tb_lineno if tb else "")
        self.loop_errors.note("%s%s" % (context.get("message", "unexpected error"), where))

    def listening_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ipaddress.ip_address(self.opts.listen_address).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "::" takes IPv4 clients too, whatever net.ipv6.bindv6only says.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                # Binding the overlay address works even before wg-quick has
                # added it, so boot order cannot make the service fail.
                sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
            except OSError:
                pass
            sock.bind((self.opts.listen_address, self.opts.listen_port))
        except BaseException:
            sock.close()
            raise
        return sock

    def expire_connections(self) -> None:
        """Close connections past their deadline; runs four times a second."""
        now = time.monotonic()
        for conn in [c for c in self.connections if c.deadline is not None and c.deadline < now]:
            conn.expire()
        self.loop.call_later(0.25, self.expire_connections)

    def log_request(self, client: str, request: Request, response: Response, seconds: float) -> None:
        if self.opts.log_requests:
            target = "".join(c if " " < c < "\x7f" else "?" for c in request.target[:200])
            log('%s "%s %s %s" %d %d %.1fms' % (client, request.method, target, request.version,
                                               response.status, len(response.body), seconds * 1000))


def log(message: str) -> None:
    print("%s %s: %s" % (rfc3339(time.time()), SERVER_NAME, message), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Command line


def _interface_name(value: str) -> str:
    if not _IFNAME_RE.fullmatch(value) or value in (".", ".."):
        raise argparse.ArgumentTypeError("%r is not a network interface name" % value)
    return value


def _hub_key(value: str) -> str:
    if value and not _KEY_RE.fullmatch(value):
        raise argparse.ArgumentTypeError("not a WireGuard public key (44 base64 characters)")
    return value


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an IP address" % value) from None


def _optional_ip(value: str) -> str:
    return _ip(value) if value else ""


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError("%r is not a TCP port (0-65535)" % value)
    return int(value)


def _positive(kind):
    def convert(value: str):
        try:
            number = kind(value)
        except ValueError:
            number = 0
        if not number > 0:
            raise argparse.ArgumentTypeError("%r is not a positive number" % value)
        return number
    return convert


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("%r is not a boolean" % value)


def parse_args(argv: Optional[List[str]] = None, environ: Optional[Dict[str, str]] = None) -> argparse.Namespace:
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="dstack_vpn_status.py",
        description="Read-only HTTP status of a dstack-vpn spoke's WireGuard tunnel.",
        epilog="Each option may also be set as the environment variable %s<OPTION>, e.g. "
               "%sLISTEN_PORT=8000." % (ENV_PREFIX, ENV_PREFIX))

    def option(name: str, convert, default: str, help_text: str, **kwargs) -> None:
        dest = name.replace("-", "_")
        # argparse runs string defaults through `type`, so a bad environment
        # value is reported like a bad option.
        parser.add_argument("--" + name, dest=dest, type=convert,
                            default=env.get(ENV_PREFIX + dest.upper(), default),
                            help="%s (env %s%s; default %r)" % (help_text, ENV_PREFIX, dest.upper(), default),
                            **kwargs)

    option("node-name", str, socket.gethostname(), "name of this node")
    option("overlay-ip", _optional_ip, "", "this node's address on the overlay")
    option("interface", _interface_name, "wg0", "WireGuard interface")
    option("listen-address", _ip, "0.0.0.0", "address to listen on ('::' for IPv6 and IPv4)")
    option("listen-port", _port, "8000", "TCP port to listen on (0: any free port)")
    option("hub-public-key", _hub_key, "",
           "public key of the hub peer; empty: /health accepts a recent handshake with any peer")
    option("handshake-recent", _positive(int), "180", "seconds within which a handshake counts as recent")
    option("wg", str, "wg", "the wg program")
    option("wg-timeout", _positive(float), "2", "seconds a wg call may take")
    option("request-timeout", _positive(float), "5",
           "seconds a client has to send a request head (also the keep-alive idle time)")
    option("max-connections", _positive(int), "1024",
           "connections open at once, at most (and at most the open-files limit less %d)" % FD_RESERVE)
    option("max-connections-per-source", _positive(int), "32",
           "connections open at once from one address (IPv6: one /%d)" % IPV6_SOURCE_PREFIX)
    option("wg-dump-socket", str, "",
           "UNIX socket of the dump helper: read the dump (without keys) there instead of running wg")
    option("patroni-url", str, "",
           "Patroni's REST API on this node (https://ADDRESS:8008): the postgres field from Patroni")
    option("patroni-ca", str, "", "the CA certificate that signed Patroni's (with an https --patroni-url)")
    option("backup-status", str, "",
           "the file the backup status timer writes (a PostgreSQL member with backups): the backup field")
    option("log-requests", _flag, "false", "log one line per request to stderr",
           nargs="?", const=True, metavar="BOOL")
    parser.add_argument("--dump-helper", action="store_true",
                        help="be the dump helper (as root, with CAP_NET_ADMIN): answer each connection to "
                             "--wg-dump-socket (or the socket systemd passes) with `wg show <interface> dump`, "
                             "the private and preshared keys replaced by %s" % HIDDEN)
    parser.add_argument("--probe", action="store_true",
                        help="ask a running service's /health and exit 0 if healthy (for container health checks)")
    return parser.parse_args(argv)


def probe(opts: argparse.Namespace) -> int:
    import http.client  # only here: the service itself does not need it

    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(opts.listen_address, opts.listen_address)
    try:
        conn = http.client.HTTPConnection(host, opts.listen_port, timeout=opts.request_timeout)
        conn.request("GET", "/health")
        response = conn.getresponse()
        print(response.read().decode("utf-8", "replace").strip())
        return 0 if response.status == 200 else 1
    except (OSError, http.client.HTTPException) as e:
        print("cannot reach %s port %d: %s" % (host, opts.listen_port, e))
        return 1


def serve(opts: argparse.Namespace) -> int:
    loop = asyncio.new_event_loop()
    server = StatusServer(opts, loop)
    try:
        sock = server.listening_socket()
        server.start(sock)
    except OSError as e:
        log("cannot listen on %s port %d: %s" % (opts.listen_address, opts.listen_port, e.strerror or e))
        return 1
    host, port = sock.getsockname()[:2]
    log("listening on %s port %d, interface %s, %s; at most %d connections, %d per address "
        "(open files limit %d)" % (host, port, opts.interface,
                                   "dump from " + opts.wg_dump_socket if opts.wg_dump_socket else "running " + opts.wg,
                                   server.max_connections, opts.max_connections_per_source, server.fd_limit))
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    loop.call_soon(server.expire_connections)
    try:
        loop.run_until_complete(stop)
    finally:
        server.stop()
        pending = asyncio.all_tasks(loop)  # a reading of the node, connections being set up
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    opts = parse_args(argv)
    if opts.probe:
        return probe(opts)
    return serve_dumps(opts) if opts.dump_helper else serve(opts)


if __name__ == "__main__":
    sys.exit(main())
