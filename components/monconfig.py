"""The `monitor` setting -> MonitorConfig (pure, like config.py, which calls it last).

    monitor:
      node: node-a                 # the spoke that runs Prometheus and Alertmanager (ssh or droplet)
      hubMetrics: true             # the hub's status service, for the monitor's address only
      scrapeInterval: 15           # seconds
      alerts: {handshakeAge: 300, diskFree: 10, replicationLag: 64, backupAge: 48}
      receivers:
        - {name: ops, webhook: {url: "https://hooks.example.com/dstack-vpn"}}
        - {name: oncall, email: {to: oncall@example.com, from: alerts@example.com,
                                 smarthost: "smtp.example.com:587", username: alerts}}
    monitorSecrets (secret): {oncall: {password: ...}, ops: {url: "https://...token..."}}
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config import HUB_NAME, ConfigError, SpokeConfig, _unknown, _want

KEYS = {"node", "hubMetrics", "scrapeInterval", "alerts", "receivers"}
ALERT_KEYS = {"handshakeAge", "diskFree", "replicationLag", "backupAge"}
RECEIVER_KEYS = {"name", "webhook", "email"}
WEBHOOK_KEYS = {"url"}
EMAIL_KEYS = {"to", "from", "smarthost", "username", "requireTls"}
# The top-level secret with the receivers' credentials: receiver name -> {url} or {password}.
SECRETS = "monitorSecrets"
RECEIVER_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
URL_RE = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[!-~]*)?")
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
SMARTHOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}:[0-9]{1,5}")


@dataclass(frozen=True)
class Alerts:
    """The bounds the alert rules use."""
    handshake_age: int = 300
    """seconds without a WireGuard handshake between a spoke and the hub"""
    disk_free: int = 10
    """percent of / left"""
    replication_lag: int = 64
    """MB a replica may be behind the primary"""
    backup_age: int = 48
    """hours since the newest backup finished"""


@dataclass(frozen=True)
class Receiver:
    """Where Alertmanager sends alerts: a webhook or an email address."""
    name: str
    kind: str
    """webhook or email"""
    url: str | None = field(default=None, repr=False)
    """webhook: its URL (a secret when given in monitorSecrets)"""
    to: str | None = None
    sender: str | None = None
    smarthost: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    require_tls: bool = True


@dataclass(frozen=True)
class MonitorConfig:
    node: str
    hub_metrics: bool = False
    scrape_interval: int = 15
    alerts: Alerts = Alerts()
    receivers: tuple[Receiver, ...] = ()


def _number(setting: str, value: Any, default: int, low: int, high: int, what: str) -> int:
    if value is None:
        return default
    _want(setting, value, int, f"a whole number of {what}")
    if not low <= value <= high:
        raise ConfigError(f"{setting}: {value} {what}; from {low} to {high}")
    return value


def parse(raw: Any, spokes: Mapping[str, SpokeConfig], secrets: Any = None) -> MonitorConfig | None:
    """The `monitor` setting (decoded JSON), checked against the spokes; None when absent.
    secrets: the decoded `monitorSecrets`."""
    if raw is None:
        if secrets is not None:
            raise ConfigError(f"{SECRETS}: set, but there is no monitor to use it; remove it")
        return None
    _want("monitor", raw, dict, "an object (node, receivers, ...)")
    _unknown("monitor", raw, KEYS)
    node = raw.get("node")
    if node is None:
        raise ConfigError("monitor.node: required; the spoke that runs Prometheus and Alertmanager")
    _want("monitor.node", node, str, "a spoke's name")
    if node == HUB_NAME:
        raise ConfigError("monitor.node: the hub is a plain router; name a spoke (hubMetrics: true shows the "
                          "hub's view to it)")
    if node not in spokes:
        raise ConfigError(f"monitor.node: {node!r} is not a node; spokes: {', '.join(spokes) or 'none'}")
    if spokes[node].kind == "dstack":
        raise ConfigError(f"monitor.node: {node!r} is a dstack spoke; the monitor runs on an `ssh` or `droplet` "
                          "spoke (a dstack spoke is watched like any other)")
    if spokes[node].kind == "client":
        raise ConfigError(f"monitor.node: {node!r} is a client (a person's device); the monitor runs on an `ssh` or "
                          "`droplet` spoke (a client may reach its page: spokes[].allow)")
    hub_metrics = raw.get("hubMetrics", False)
    _want("monitor.hubMetrics", hub_metrics, bool, "true or false")
    interval = _number("monitor.scrapeInterval", raw.get("scrapeInterval"), 15, 5, 300, "seconds")
    alerts_raw = raw.get("alerts", {})
    _want("monitor.alerts", alerts_raw, dict, "an object of bounds")
    _unknown("monitor.alerts", alerts_raw, ALERT_KEYS)
    alerts = Alerts(
        handshake_age=_number("monitor.alerts.handshakeAge", alerts_raw.get("handshakeAge"), 300, 150, 86400,
                              "seconds (WireGuard renews a live tunnel's handshake every 120 s)"),
        disk_free=_number("monitor.alerts.diskFree", alerts_raw.get("diskFree"), 10, 1, 50, "percent"),
        replication_lag=_number("monitor.alerts.replicationLag", alerts_raw.get("replicationLag"), 64, 1, 100000,
                                "MB"),
        backup_age=_number("monitor.alerts.backupAge", alerts_raw.get("backupAge"), 48, 1, 8760, "hours"))
    secrets = {} if secrets is None else secrets
    _want(SECRETS, secrets, dict, "an object of receiver name -> {url} or {password}")
    receivers = _receivers(raw.get("receivers", []), secrets)
    return MonitorConfig(node, hub_metrics, interval, alerts, receivers)


def _receivers(raw: Any, secrets: Mapping[str, Any]) -> tuple[Receiver, ...]:
    _want("monitor.receivers", raw, list, "a list of {name, webhook | email}")
    out: list[Receiver] = []
    for i, item in enumerate(raw):
        setting = f"monitor.receivers[{i}]"
        _want(setting, item, dict, "an object {name, webhook | email}")
        _unknown(setting, item, RECEIVER_KEYS)
        name = item.get("name")
        _want(f"{setting}.name", name, str, "a name")
        if not RECEIVER_RE.fullmatch(name):
            raise ConfigError(f"{setting}.name: {name!r}; lowercase letters, digits and '-', starting with a letter")
        if name in (r.name for r in out):
            raise ConfigError(f"{setting}.name: {name!r} is used twice")
        kinds = [k for k in ("webhook", "email") if k in item]
        if len(kinds) != 1:
            raise ConfigError(f"{setting}: give exactly one of webhook or email")
        secret = secrets.get(name, {})
        _want(f"{SECRETS}.{name}", secret, dict, "an object {url} or {password}")
        out.append(_webhook(setting, name, item["webhook"], secret) if kinds == ["webhook"]
                   else _email(setting, name, item["email"], secret))
    for name in secrets:
        if name not in (r.name for r in out):
            raise ConfigError(f"{SECRETS}.{name}: no receiver is called {name!r}; receivers: "
                              f"{', '.join(r.name for r in out) or 'none'}")
    return tuple(out)


def _webhook(setting: str, name: str, raw: Any, secret: Mapping[str, Any]) -> Receiver:
    _want(f"{setting}.webhook", raw, dict, "an object {url}")
    _unknown(f"{setting}.webhook", raw, WEBHOOK_KEYS)
    _unknown(f"{SECRETS}.{name}", secret, {"url"})
    if ("url" in raw) == ("url" in secret):
        raise ConfigError(f"{setting}.webhook.url: give the URL here, or (when it holds a token) in "
                          f"{SECRETS}.{name}.url; exactly one of them")
    where = f"{setting}.webhook.url" if "url" in raw else f"{SECRETS}.{name}.url"
    url = raw.get("url", secret.get("url"))
    _want(where, url, str, "an http(s) URL")
    if not URL_RE.fullmatch(url):
        # the value itself is not repeated: it may be a secret
        raise ConfigError(f"{where}: not an http(s) URL (http[s]://host[:port]/path, printable characters)")
    return Receiver(name, "webhook", url=url)


def _email(setting: str, name: str, raw: Any, secret: Mapping[str, Any]) -> Receiver:
    _want(f"{setting}.email", raw, dict, "an object {to, from, smarthost, username}")
    _unknown(f"{setting}.email", raw, EMAIL_KEYS)
    _unknown(f"{SECRETS}.{name}", secret, {"password"})
    for key in ("to", "from"):
        value = raw.get(key)
        _want(f"{setting}.email.{key}", value, str, "an email address")
        if not EMAIL_RE.fullmatch(value):
            raise ConfigError(f"{setting}.email.{key}: {value!r} is not an email address")
    smarthost = raw.get("smarthost")
    _want(f"{setting}.email.smarthost", smarthost, str, "host:port of the mail server")
    if not SMARTHOST_RE.fullmatch(smarthost):
        raise ConfigError(f"{setting}.email.smarthost: {smarthost!r} is not host:port (smtp.example.com:587)")
    username = raw.get("username")
    password = secret.get("password")
    if username is not None:
        _want(f"{setting}.email.username", username, str, "the mail server's user name")
        if password is None:
            raise ConfigError(f"{SECRETS}.{name}.password: required with {setting}.email.username "
                              f"(pulumi config set --secret --path '{SECRETS}.{name}.password' ...)")
        _want(f"{SECRETS}.{name}.password", password, str, "a password")
    elif password is not None:
        raise ConfigError(f"{SECRETS}.{name}.password: set, but {setting}.email.username is not")
    require_tls = raw.get("requireTls", True)
    _want(f"{setting}.email.requireTls", require_tls, bool, "true or false")
    return Receiver(name, "email", to=raw["to"], sender=raw["from"], smarthost=smarthost, username=username,
                    password=password, require_tls=require_tls)
