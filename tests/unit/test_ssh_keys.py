"""SSH keys as pulumi-command takes them: every unencrypted deploy key form it reads works, an
encrypted one is refused with a clear message, and a host key it could never check is refused.

The forms are made by ssh-keygen itself (the tool users make their keys with), and the public
line the program derives is compared with what `ssh-keygen -y` prints.
"""
import subprocess

import pytest

import program
from components import config, keys
from components.config import ConfigError
from conftest import need_tool

HOST_KEY = keys.ssh_key_pair("host")[1]
# (ssh-keygen -t, -b, -m): the forms Go's ssh.ParsePrivateKey reads, as users make them
FORMS = {
    "openssh-ed25519": ("ed25519", None, None),
    "openssh-rsa": ("rsa", "3072", None),
    "openssh-ecdsa": ("ecdsa", "256", None),
    "pem-rsa": ("rsa", "2048", "PEM"),          # -----BEGIN RSA PRIVATE KEY----- (PKCS#1)
    "pem-ecdsa": ("ecdsa", "384", "PEM"),       # -----BEGIN EC PRIVATE KEY----- (SEC1)
    "pkcs8-ed25519": ("ed25519", None, "PKCS8"),  # -----BEGIN PRIVATE KEY-----
    "pkcs8-rsa": ("rsa", "2048", "PKCS8"),
}


def keygen(tmp_path, name, kind, bits=None, fmt=None, passphrase=""):
    need_tool("ssh-keygen")
    path = tmp_path / name
    argv = ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "", "-f", str(path)]
    if bits:
        argv += ["-b", bits]
    if fmt:
        argv += ["-m", fmt]
    subprocess.run(argv, check=True, capture_output=True)
    return path


def raw_config(**overrides):
    raw = {"adminCidrs": '["203.0.113.10/32"]',
           "spokes": '[{"name": "node-b", "kind": "ssh", "host": "198.51.100.21", "hostKey": "%s"}]' % HOST_KEY}
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_unencrypted_form_is_taken_with_the_public_key_ssh_keygen_derives(tmp_path, form):
    path = keygen(tmp_path, form, *FORMS[form])
    text = path.read_text()
    cfg = config.parse(raw_config(sshPrivateKey=text))
    assert cfg.ssh_private_key.strip() == text.strip()
    expected = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], check=True, capture_output=True,
                              text=True).stdout.split()[:2]
    assert keys.ssh_public_key(text, "c").split()[:2] == expected


@pytest.mark.parametrize("form", ["pem-rsa", "pkcs8-ed25519"])
def test_the_program_runs_with_a_pem_deploy_key(tmp_path, form):
    """The crash this guards against was in the program (the deploy key's public half), after config."""
    text = keygen(tmp_path, form, *FORMS[form]).read_text()
    run = program.run(program.stack_config(sshPrivateKey=text))
    (ssh_key,) = run.of_type("digitalocean:index/sshKey:SshKey")
    assert program.unwrap(ssh_key.inputs["publicKey"]).split()[:2] == keys.ssh_public_key(text, "").split()[:2]


@pytest.mark.parametrize("fmt", [None, "PEM", "PKCS8"])
def test_an_encrypted_key_is_refused_naming_the_setting_and_not_quoting_it(tmp_path, fmt):
    text = keygen(tmp_path, "enc", "rsa" if fmt else "ed25519", "2048" if fmt else None, fmt,
                  passphrase="correct horse").read_text()
    with pytest.raises(ConfigError) as err:
        config.parse(raw_config(sshPrivateKey=text))
    message = str(err.value)
    assert message.startswith("sshPrivateKey: the key is encrypted"), message
    assert "ssh-keygen -p" in message
    assert not any(line in message for line in text.splitlines()[1:-1] if len(line) > 20)
    with pytest.raises(ConfigError, match=r"^nodeSecrets\.node-b\.sshPrivateKey: the key is encrypted"):
        config.parse(raw_config(nodeSecrets='{"node-b": {"sshPrivateKey": %s}}' % __import__("json").dumps(text)))


def test_keys_ssh_servers_refuse_are_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, rsa

    def pem(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption()).decode()
    with pytest.raises(ConfigError, match="sshPrivateKey: a DSA key"):
        config.parse(raw_config(sshPrivateKey=pem(dsa.generate_private_key(2048))))
    with pytest.raises(ConfigError, match="sshPrivateKey: an RSA key of 1024 bits"):
        config.parse(raw_config(sshPrivateKey=pem(rsa.generate_private_key(65537, 1024))))
    with pytest.raises(ConfigError, match="sshPrivateKey: not a readable private key"):
        config.parse(raw_config(sshPrivateKey="-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"))


def test_an_rsa_host_key_is_refused_saying_what_to_give_instead(tmp_path):
    rsa_line = " ".join(keygen(tmp_path, "host_rsa", "rsa", "3072").with_suffix(".pub").read_text().split()[:2])
    with pytest.raises(ConfigError) as err:
        config.parse(raw_config(sshPrivateKey=keys.ssh_key_pair("d")[0],
                                spokes='[{"name": "node-b", "kind": "ssh", "host": "h", "hostKey": "%s"}]' % rsa_line))
    message = str(err.value)
    assert message.startswith("spokes[0].hostKey: an ssh-rsa host key cannot be used"), message
    assert "ssh-keyscan -t ed25519 HOST" in message and "8.8" in message


@pytest.mark.parametrize("kind,bits", [("ed25519", None), ("ecdsa", "256"), ("ecdsa", "521")])
def test_ed25519_and_ecdsa_host_keys_are_taken(tmp_path, kind, bits):
    line = keygen(tmp_path, f"host_{kind}{bits}", kind, bits).with_suffix(".pub").read_text().strip()
    raw = raw_config(sshPrivateKey=keys.ssh_key_pair("d")[0],
                     spokes='[{"name": "node-b", "kind": "ssh", "host": "h", "hostKey": "%s"}]' % line)
    assert config.parse(raw).spokes[0].host_key == line


def test_a_host_key_whose_blob_is_another_type_is_refused():
    blob = HOST_KEY.split()[1]  # an ed25519 blob under an ECDSA name
    raw = raw_config(sshPrivateKey=keys.ssh_key_pair("d")[0],
                     spokes='[{"name": "node-b", "kind": "ssh", "host": "h", "hostKey": "ecdsa-sha2-nistp256 %s"}]' % blob)
    with pytest.raises(ConfigError, match=r"spokes\[0\]\.hostKey: not an SSH host public key"):
        config.parse(raw)


def test_digitalocean_fingerprint_is_md5_of_the_blob_as_ssh_keygen_prints_it(tmp_path):
    path = keygen(tmp_path, "fp", "ed25519")
    printed = subprocess.run(["ssh-keygen", "-l", "-E", "md5", "-f", str(path.with_suffix(".pub"))],
                             check=True, capture_output=True, text=True).stdout.split()[1]
    assert printed == "MD5:" + keys.ssh_fingerprint_md5(path.with_suffix(".pub").read_text())
