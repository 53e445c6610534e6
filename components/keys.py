"""Keys made by the program: WireGuard X25519 pairs, preshared keys, SSH ed25519 pairs, passwords,
and a TLS certificate authority with the certificates it signs (the PostgreSQL cluster's).

The key material is made with `cryptography` inside a small Pulumi dynamic
provider, so it is created once, stored encrypted in the stack as a secret, and
stays the same from one `up` to the next.  Changing `rotation` (a stack
setting) or `pulumi up --replace` on the resource makes a new key.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import secrets as _secrets
from typing import Any

import pulumi
import pulumi.dynamic as dynamic
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

KINDS = ("wireguard", "preshared", "ssh-ed25519", "password", "tls-ca", "tls-cert")
# A certificate's life: ten years (README, PostgreSQL: how to renew one sooner).
CERT_DAYS = 3650
# SCRAM-SHA-256's iteration count: PostgreSQL's default (scram_iterations).
SCRAM_ITERATIONS = 4096


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


def password() -> str:
    """32 random characters of [A-Za-z0-9-_] (192 bits): nothing a URI, a shell or SQL must quote."""
    return _secrets.token_urlsafe(24)


def scram_sha256(user: str, secret: str) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of a password (what `\\password` sends): the server keeps
    this, never the password. The salt comes from the user and the password, so the same password
    gives the same verifier (the step that sets it changes nothing when nothing changed)."""
    salt = hashlib.sha256(f"dstack-vpn:{user}:{secret}".encode()).digest()[:16]
    salted = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, SCRAM_ITERATIONS)

    def mac(key: bytes, msg: bytes) -> bytes:
        h = hmac.HMAC(key, hashes.SHA256())
        h.update(msg)
        return h.finalize()

    stored = hashlib.sha256(mac(salted, b"Client Key")).digest()
    server = mac(salted, b"Server Key")
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored)}:{b64(server)}"


def _pem_key(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def tls_ca(comment: str, key=None, serial: int | None = None, now: datetime.datetime | None = None
           ) -> dict[str, str]:
    """A certificate authority: an EC P-256 key and its self-signed certificate (CN = comment).
    (key, serial, now: new, random and the present time unless given, as tests give them; the
    signatures are RFC 6979's deterministic ECDSA, so given all three the certificate is too.)"""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, comment)])
    now = now or datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256(), ecdsa_deterministic=True))
    return {"private_key": _pem_key(key), "public_key": cert.public_bytes(serialization.Encoding.PEM).decode()}


def tls_cert(comment: str, names: list[str], issuer_key: str, issuer_cert: str, key=None, serial: int | None = None,
             now: datetime.datetime | None = None) -> dict[str, str]:
    """A certificate for a server that is also a client (PostgreSQL, Patroni's API, etcd's peers):
    CN = comment, each of `names` as an IP address or DNS name ("dns:" first: a DNS name whatever
    it looks like), signed by the issuer."""
    ca_key = serialization.load_pem_private_key(issuer_key.encode(), password=None)
    ca_cert = x509.load_pem_x509_certificate(issuer_cert.encode())
    key = key or ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        if n.startswith("dns:"):
            sans.append(x509.DNSName(n[len("dns:"):]))
            continue
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, comment)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_agreement=True,
                                         content_commitment=False, data_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True))
    return {"private_key": _pem_key(key), "public_key": cert.public_bytes(serialization.Encoding.PEM).decode()}


def make(kind: str, comment: str = "", names: list[str] | None = None, issuer_key: str | None = None,
         issuer_cert: str | None = None) -> dict[str, str]:
    """Outputs of a key resource of `kind`: private (secret) and public (plain: empty for preshared
    keys and passwords; the certificate for tls-*)."""
    if kind == "wireguard":
        private = wireguard_private_key()
        return {"private_key": private, "public_key": wireguard_public_key(private)}
    if kind == "preshared":
        return {"private_key": preshared_key(), "public_key": ""}
    if kind == "ssh-ed25519":
        private, public = ssh_key_pair(comment)
        return {"private_key": private, "public_key": public}
    if kind == "password":
        return {"private_key": password(), "public_key": ""}
    if kind == "tls-ca":
        return tls_ca(comment)
    if kind == "tls-cert":
        return tls_cert(comment, list(names or ()), issuer_key or "", issuer_cert or "")
    raise ValueError(f"unknown key kind {kind!r}; allowed: {', '.join(KINDS)}")


class KeyProvider(dynamic.ResourceProvider):
    """Creates a key once; any change of its inputs makes a new one (replace)."""

    def create(self, props: dict[str, Any]) -> dynamic.CreateResult:
        outs = {**props, **make(props["kind"], props.get("comment", ""), props.get("names"),
                                props.get("issuer_key"), props.get("issuer_cert"))}
        return dynamic.CreateResult(id_=_secrets.token_hex(8), outs=outs)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> dynamic.DiffResult:
        # names and issuer_cert exist on certificates only (older keys' states have neither): a new
        # name, or a new authority, is a new certificate
        changed = [k for k in ("kind", "comment", "rotation", "names", "issuer_cert") if olds.get(k) != news.get(k)]
        return dynamic.DiffResult(changes=bool(changed), replaces=changed, delete_before_replace=False)


class Key(dynamic.Resource):
    """A key pair kept in the stack; `private_key` is a secret output."""

    private_key: pulumi.Output[str]
    public_key: pulumi.Output[str]

    def __init__(self, name: str, kind: str, rotation: int = 0, comment: str = "",
                 opts: pulumi.ResourceOptions | None = None, names: list[str] | None = None,
                 issuer: "Key | None" = None):
        if kind not in KINDS:
            raise ValueError(f"unknown key kind {kind!r}; allowed: {', '.join(KINDS)}")
        if (kind == "tls-cert") != (issuer is not None):
            raise ValueError("a tls-cert needs its issuer (a tls-ca Key), and only a tls-cert has one")
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(
            additional_secret_outputs=["private_key", "issuer_key"]))
        props: dict[str, Any] = {"kind": kind, "rotation": rotation, "comment": comment,
                                 "private_key": None, "public_key": None}
        if issuer is not None:  # only certificates carry these (older keys' inputs stay as they were)
            props.update(names=list(names or ()), issuer_key=pulumi.Output.secret(issuer.private_key),
                         issuer_cert=issuer.public_key)
        super().__init__(KeyProvider(), name, props, opts)


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
