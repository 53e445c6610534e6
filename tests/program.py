"""Runs the unchanged Pulumi program (__main__.py) under Pulumi's mocks.

One shared Mocks class for every program test: it records each registration
whole (type, name, parent, dependencies, options and the inputs with their
secret markers still on), and answers like the real providers would.
"""
from __future__ import annotations

import json
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from google.protobuf import json_format
from pulumi.runtime import mocks as pmocks

from lab import sdk
from lab.runner import PROJECT, ROOT, SECRET_KEYS, run_program

DYNAMIC = "pulumi-python:dynamic:Resource"
# A dstack spoke's image in the tests' stacks: a reference by digest, as config requires.
SPOKE_IMAGE = "ghcr.io/example/dstack-vpn-spoke@sha256:" + "5e" * 32


@dataclass
class Registration:
    type: str
    name: str
    parent: str
    urn: str
    dependencies: list[str]
    delete_before_replace: bool
    additional_secret_outputs: list[str]
    inputs: dict[str, Any]
    """Inputs as sent to the engine: secrets still wrapped in their marker."""
    outputs: dict[str, Any] = field(default_factory=dict)


def is_secret_marker(value: Any) -> bool:
    return sdk.is_secret(value)


def secret_leaks(run: "Run", secrets: dict[str, str]) -> list[tuple]:
    """Where any of `secrets` (name -> text) shows outside a secret: a plain input of any
    resource, a command's text (create, update, delete), an output that is not secret."""
    found: list[tuple] = []
    for reg in run.registrations:
        for text in plain_strings(reg.inputs):
            found += [(reg.name, name) for name, s in secrets.items() if s in text]
        if reg.type == "command:remote:Command":
            for what in ("create", "update", "delete"):
                command = json.dumps(unwrap(reg.inputs.get(what)))
                found += [(reg.name, what, name) for name, s in secrets.items() if s in command]
    for output, value in run.outputs.items():
        if output not in run.secret_outputs:
            found += [(output, name) for name, s in secrets.items() if s in json.dumps(value)]
    return found


def plain_strings(value: Any):
    """Every string in `value` that is not inside a secret marker."""
    if is_secret_marker(value):
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from plain_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from plain_strings(v)


def unwrap(value: Any) -> Any:
    if is_secret_marker(value):
        return unwrap(value.get("value"))
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


_SEEDED: dict[str, dict[str, str]] = {}


def seeded_key(seed: str, inputs: dict) -> dict[str, str]:
    """The same key for the same seed: lets two runs be compared input for input."""
    if seed not in _SEEDED:
        _SEEDED[seed] = _seeded_key(seed, inputs)
    return _SEEDED[seed]


def _seeded_key(seed: str, inputs: dict) -> dict[str, str]:
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from components import keys

    raw = hashlib.sha256(seed.encode()).digest()
    if inputs["kind"] == "ssh-ed25519":
        private = ed25519.Ed25519PrivateKey.from_private_bytes(raw)
        # PKCS#8, a form the program takes: OpenSSH's carries a random check number, this is the
        # same text in every process (the recorded resource graph hashes it)
        text = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
        public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH).decode()
        return {"private_key": text, "public_key": f"{public} {inputs.get('comment', '')}"}
    if inputs["kind"].startswith("tls-"):  # the same certificate in every run: key, serial and time from the seed
        import datetime

        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.derive_private_key(int.from_bytes(raw, "big") % (2 ** 255) + 1, ec.SECP256R1())
        when = dict(key=key, serial=int.from_bytes(raw[:8], "big") + 1,
                    now=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))
        if inputs["kind"] == "tls-ca":
            return keys.tls_ca(inputs.get("comment", ""), **when)
        issuer_key = inputs["issuer_key"]
        issuer_key = issuer_key["value"] if isinstance(issuer_key, dict) else issuer_key
        return keys.tls_cert(inputs.get("comment", ""), inputs.get("names") or [], issuer_key, inputs["issuer_cert"],
                             **when)
    private_b64 = base64.b64encode(raw).decode()
    if inputs["kind"] == "password":
        return {"private_key": base64.urlsafe_b64encode(raw[:24]).decode(), "public_key": ""}
    if inputs["kind"] == "preshared":
        return {"private_key": private_b64, "public_key": ""}
    return {"private_key": private_b64, "public_key": keys.wireguard_public_key(private_b64)}


class Mocks(pulumi.runtime.Mocks):
    """Answers as the providers would; keys are real (made by the program's own provider code)."""

    def __init__(self, preview: bool = False, seed: str | None = None):
        self.preview = preview
        self.seed = seed
        self.lock = threading.Lock()
        self.made_secrets: list[str] = []
        self.calls: list[str] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        from components import keys

        # Values from the name, not from arrival order: registrations run on threads.
        n = zlib.crc32(args.name.encode()) % 200
        outs = dict(args.inputs)
        if self.preview:
            # A preview of a new stack: the providers know nothing computed yet (ids included).
            return "", outs
        if args.typ == DYNAMIC:
            if self.seed is None:
                issuer_key = args.inputs.get("issuer_key")
                if isinstance(issuer_key, dict):  # a secret input, as the mocks see it
                    issuer_key = issuer_key["value"]
                made = keys.make(args.inputs["kind"], args.inputs.get("comment", ""), args.inputs.get("names"),
                                 issuer_key, args.inputs.get("issuer_cert"))
            else:
                made = seeded_key(f"{self.seed}/{args.name}/{args.inputs.get('rotation')}", args.inputs)
            with self.lock:
                self.made_secrets.append(made["private_key"])
            outs.update(made)
        elif args.typ == "digitalocean:index/droplet:Droplet":
            outs.update(ipv4_address=f"198.51.100.{10 + n}", status="active")
            return str(100000 + n), outs
        elif args.typ == "digitalocean:index/reservedIp:ReservedIp":
            outs.update(ip_address=f"203.0.113.{n % 250 + 1}")
        elif args.typ == "digitalocean:index/sshKey:SshKey":
            outs.update(fingerprint=f"fp-{n}")
            return str(500 + n), outs
        elif args.typ == "digitalocean:index/spacesKey:SpacesKey":  # the secret half: only when made
            outs.update(access_key=f"DO00MOCK{n:012d}", secret_key=f"mock-spaces-secret-{zlib.crc32(args.name.encode())}")
            with self.lock:
                self.made_secrets.append(outs["secret_key"])
        elif args.typ == "digitalocean:index/spacesBucket:SpacesBucket":
            outs.update(endpoint=f"{args.inputs.get('region')}.digitaloceanspaces.com")
        elif args.typ.startswith("command:remote:Command"):
            outs.update(stdout="", stderr="")
        return f"{args.name}-id", outs

    def call(self, args: pulumi.runtime.MockCallArgs):
        # a provider function (data source) would need the cloud even in a preview
        self.calls.append(args.token)
        return {}


class RecordingMonitor(pmocks.MockMonitor):
    def __init__(self, mocks: Mocks):
        super().__init__(mocks)
        self.registrations: list[Registration] = []
        self.reg_lock = threading.Lock()

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            raw = json_format.MessageToDict(request.object, preserving_proto_field_name=True)
            reg = Registration(
                type=request.type, name=request.name, parent=request.parent, urn=response.urn,
                dependencies=list(request.dependencies), delete_before_replace=request.deleteBeforeReplace,
                additional_secret_outputs=list(request.additionalSecretOutputs), inputs=raw)
            with self.reg_lock:
                self.registrations.append(reg)
        return response


def stack_config(stack_file: Path | str = ROOT / "Pulumi.dev.yaml", **overrides: Any) -> dict[str, Any]:
    """The project's settings from a stack file (without namespace), with overrides."""
    data = yaml.safe_load(Path(stack_file).read_text())["config"]
    out = {k.split(":", 1)[1]: v for k, v in data.items() if k.startswith(PROJECT + ":")}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def host_spokes(stack_file: Path | str = ROOT / "Pulumi.dev.yaml") -> list[dict]:
    """The stack file's spokes that run roles: its clients (people's devices) left out, as the tests
    of the network alone run it (tests/unit/test_client.py has the clients)."""
    return [s for s in stack_config(stack_file)["spokes"] if s.get("kind") != "client"]


@dataclass
class Run:
    registrations: list[Registration]
    outputs: dict[str, Any]
    made_secrets: list[str]

    def of_type(self, typ: str) -> list[Registration]:
        return [r for r in self.registrations if r.type == typ]

    def named(self, name: str, typ: str | None = None) -> Registration:
        """The one custom resource called `name` (components share names with their droplet)."""
        (reg,) = [r for r in self.registrations if r.name == name
                  and (r.type == typ if typ else not r.type.startswith("dstack-vpn:index:"))]
        return reg


def run(settings: dict[str, Any], secret_keys: tuple[str, ...] = SECRET_KEYS,
        preview: bool = False, seed: str | None = None) -> Run:
    """Run __main__.py with `settings` as stack config; return what it registered and exported."""
    mocks = Mocks(preview=preview, seed=seed)
    monitor = RecordingMonitor(mocks)
    secret_outputs: set[str] = set()
    outputs = run_program(monitor, mocks, settings, stack="test", preview=preview, secret_keys=secret_keys,
                          secret_outputs=secret_outputs)
    run = Run(monitor.registrations, outputs, mocks.made_secrets)
    run.calls = mocks.calls
    run.secret_outputs = secret_outputs
    return run
