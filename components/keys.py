"""Keys made by the program: WireGuard X25519 pairs, preshared keys, SSH ed25519 pairs.

The key material is made with `cryptography` inside a small Pulumi dynamic
provider, so it is created once, stored encrypted in the stack as a secret, and
stays the same from one `up` to the next.  Changing `rotation` (a stack
setting) or `pulumi up --replace` on the resource makes a new key.
"""
from __future__ import annotations

import base64
import hashlib
import secrets as _secrets
from typing import Any

import pulumi
import pulumi.dynamic as dynamic
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

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


class SshKeyError(ValueError):
    """A private key the program's SSH client (pulumi-command: Go's ssh.ParsePrivateKey) cannot use."""


def load_ssh_private_key(private_text: str):
    """A deploy key in any unencrypted form pulumi-command reads: OpenSSH, or PEM (PKCS#1 RSA,
    SEC1 EC, PKCS#8) of an RSA, ECDSA or ed25519 key. Raises SshKeyError, never quoting the key."""
    data = private_text.strip().encode() + b"\n"
    encrypted = b"ENCRYPTED" in data or b"Proc-Type: 4,ENCRYPTED" in data
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        encrypted = True
        key = None
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if encrypted or (key is None and b"bcrypt" in data):
        raise SshKeyError("the key is encrypted with a passphrase; the program's SSH client takes an unencrypted "
                          "key: make an unencrypted copy (cp KEY KEY.plain; ssh-keygen -p -N '' -f KEY.plain) "
                          "or a new deploy key, and keep it only as a secret (pulumi config set --secret)")
    if key is None:
        raise SshKeyError("not a readable private key; give an OpenSSH key (-----BEGIN OPENSSH PRIVATE KEY-----) or "
                          "a PEM RSA, ECDSA or ed25519 key, unencrypted")
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise SshKeyError(f"an RSA key of {key.key_size} bits; OpenSSH servers want 2048 or more (ed25519 is best)")
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise SshKeyError(f"an ECDSA key on {key.curve.name}; SSH takes only P-256, P-384 and P-521")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SshKeyError(f"a {type(key).__name__.replace('PrivateKey', '').lstrip('_')} key; SSH servers take "
                          "ed25519, ECDSA or RSA keys (DSA is refused by OpenSSH)")
    return key


def ssh_public_key(private_text: str, comment: str) -> str:
    """The public line ('ssh-ed25519 AAAA... comment') of a deploy key in any form load_ssh_private_key takes."""
    public_text = load_ssh_private_key(private_text).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{public_text} {comment}"


def ssh_fingerprint_md5(public_line: str) -> str:
    """DigitalOcean's fingerprint of a public key: MD5 of the key blob, colon-separated hex."""
    digest = hashlib.md5(base64.b64decode(public_line.split()[1]), usedforsecurity=False).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, 32, 2))


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
