"""Keys made by the program: WireGuard X25519 pairs, preshared keys, SSH ed25519 pairs.

The key material is made with `cryptography` inside a small Pulumi dynamic
provider, so it is created once, stored encrypted in the stack as a secret, and
stays the same from one `up` to the next.  Changing `rotation` (a stack
setting) or `pulumi up --replace` on the resource makes a new key.
"""
from __future__ import annotations

import base64
import secrets as _secrets
from typing import Any

import pulumi
import pulumi.dynamic as dynamic
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

KINDS = ("wireguard", "preshared", "ssh-ed25519")


def wireguard_private_key() -> str:
    """A new WireGuard private key, base64 as `wg genkey` prints it."""
    raw = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return base64.b64encode(raw).decode()


def wireguard_public_key(private_key: str) -> str:
    """The public key of a base64 private key, as `wg pubkey` prints it."""
    private = x25519.X25519PrivateKey.from_private_bytes(base64.b64decode(private_key))
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def preshared_key() -> str:
    """32 random bytes, base64, as `wg genpsk` prints them."""
    return base64.b64encode(_secrets.token_bytes(32)).decode()


def ssh_key_pair(comment: str) -> tuple[str, str]:
    """A new ed25519 pair: (OpenSSH private key text, 'ssh-ed25519 AAAA... comment')."""
    private = ed25519.Ed25519PrivateKey.generate()
    private_text = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
    public_text = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private_text, f"{public_text} {comment}"


def ssh_public_key(private_text: str, comment: str) -> str:
    """The public line of an OpenSSH private key (for a configured deploy key)."""
    private = serialization.load_ssh_private_key(private_text.encode(), password=None)
    public_text = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{public_text} {comment}"


def make(kind: str, comment: str = "") -> dict[str, str]:
    """Outputs of a key resource of `kind`: private (secret) and public (plain, empty for preshared)."""
    if kind == "wireguard":
        private = wireguard_private_key()
        return {"private_key": private, "public_key": wireguard_public_key(private)}
    if kind == "preshared":
        return {"private_key": preshared_key(), "public_key": ""}
    if kind == "ssh-ed25519":
        private, public = ssh_key_pair(comment)
        return {"private_key": private, "public_key": public}
    raise ValueError(f"unknown key kind {kind!r}; allowed: {', '.join(KINDS)}")


class KeyProvider(dynamic.ResourceProvider):
    """Creates a key once; any change of its inputs makes a new one (replace)."""

    def create(self, props: dict[str, Any]) -> dynamic.CreateResult:
        outs = {**props, **make(props["kind"], props.get("comment", ""))}
        return dynamic.CreateResult(id_=_secrets.token_hex(8), outs=outs)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> dynamic.DiffResult:
        changed = [k for k in ("kind", "comment", "rotation") if olds.get(k) != news.get(k)]
        return dynamic.DiffResult(changes=bool(changed), replaces=changed, delete_before_replace=False)


class Key(dynamic.Resource):
    """A key pair kept in the stack; `private_key` is a secret output."""

    private_key: pulumi.Output[str]
    public_key: pulumi.Output[str]

    def __init__(self, name: str, kind: str, rotation: int = 0, comment: str = "",
                 opts: pulumi.ResourceOptions | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown key kind {kind!r}; allowed: {', '.join(KINDS)}")
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(additional_secret_outputs=["private_key"]))
        super().__init__(KeyProvider(), name, {
            "kind": kind, "rotation": rotation, "comment": comment,
            "private_key": None, "public_key": None}, opts)


class NodeKey:
    """A node's WireGuard key: made by the program, or pinned in config (`nodeSecrets`)."""

    def __init__(self, name: str, pinned: str | None, rotation: int, parent: pulumi.Resource):
        if pinned is not None:
            self.resource = None
            self.private_key: pulumi.Output[str] = pulumi.Output.secret(pinned)
            self.public_key: pulumi.Output[str] = pulumi.Output.from_input(wireguard_public_key(pinned))
        else:
            self.resource = Key(f"{name}-wg-key", "wireguard", rotation=rotation,
                                opts=pulumi.ResourceOptions(parent=parent))
            self.private_key = pulumi.Output.secret(self.resource.private_key)
            self.public_key = self.resource.public_key
