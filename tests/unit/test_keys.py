"""Key derivation against known vectors and the real `wg` tool."""
import base64
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from components import keys
from conftest import need_tool

# RFC 7748, section 6.1 (Alice)
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_public_key_matches_rfc7748_vector():
    assert keys.wireguard_public_key(base64.b64encode(ALICE_PRIVATE).decode()) == base64.b64encode(ALICE_PUBLIC).decode()


def test_public_key_matches_wg_pubkey():
    wg = need_tool("wg")
    for _ in range(5):
        private = keys.wireguard_private_key()
        expected = subprocess.run([wg, "pubkey"], input=private, capture_output=True, text=True, check=True).stdout.strip()
        assert keys.wireguard_public_key(private) == expected


def test_wg_genkey_output_is_accepted():
    wg = need_tool("wg")
    private = subprocess.run([wg, "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    assert len(base64.b64decode(keys.wireguard_public_key(private))) == 32


def test_new_keys_differ_and_have_the_right_shape():
    made = [keys.make("wireguard") for _ in range(3)]
    assert len({m["private_key"] for m in made}) == 3
    for m in made:
        assert len(base64.b64decode(m["private_key"])) == 32
        assert keys.wireguard_public_key(m["private_key"]) == m["public_key"]
    psk = keys.make("preshared")
    assert len(base64.b64decode(psk["private_key"])) == 32 and psk["public_key"] == ""


def test_ssh_pair_is_openssh_and_consistent():
    made = keys.make("ssh-ed25519", "deploy")
    assert made["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert made["public_key"].startswith("ssh-ed25519 ") and made["public_key"].endswith(" deploy")
    assert keys.ssh_public_key(made["private_key"], "deploy") == made["public_key"]
    serialization.load_ssh_public_key(made["public_key"].encode())


def test_ssh_key_is_accepted_by_ssh_keygen(tmp_path):
    keygen = need_tool("ssh-keygen")
    made = keys.make("ssh-ed25519", "x")
    path = tmp_path / "id"
    path.write_text(made["private_key"])
    path.chmod(0o600)
    out = subprocess.run([keygen, "-y", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == made["public_key"].split()[:2]


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown key kind"):
        keys.make("rsa")


def test_provider_replaces_on_rotation_only():
    provider = keys.KeyProvider()
    same = {"kind": "wireguard", "rotation": 0, "comment": ""}
    assert provider.diff("id", same, dict(same)).replaces == []
    assert provider.diff("id", same, {**same, "rotation": 1}).replaces == ["rotation"]
    created = provider.create(dict(same))
    assert keys.wireguard_public_key(created.outs["private_key"]) == created.outs["public_key"]
