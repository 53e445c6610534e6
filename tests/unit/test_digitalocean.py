"""What a real DigitalOcean account answers, and how the program meets it: a deploy key that is
already on the account, the stand-in that refuses it as DigitalOcean does, and resizes."""
import json

import pytest

import program
from components import config, keys
from components.config import ConfigError
from lab.cloud import Account, CommandError, md5_fingerprint

SSH_KEY, SSH_PUBLIC = keys.ssh_key_pair("deploy")
FINGERPRINT = keys.ssh_fingerprint_md5(SSH_PUBLIC)
DROPLET = "digitalocean:index/droplet:Droplet"
SSH_KEY_TYPE = "digitalocean:index/sshKey:SshKey"


def raw(**overrides):
    out = {"adminCidrs": '["203.0.113.10/32"]', "sshPrivateKey": SSH_KEY}
    out.update({k: v if isinstance(v, str) or v is None else json.dumps(v) for k, v in overrides.items()})
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("given,kept", [(FINGERPRINT, FINGERPRINT), ("MD5:" + FINGERPRINT.upper(), FINGERPRINT),
                                        (41234567, "41234567"), ("41234567", "41234567")])
def test_an_existing_key_by_fingerprint_or_id(given, kept):
    assert config.parse(raw(digitaloceanSshKey=given)).digitalocean_ssh_key == kept


def test_a_fingerprint_of_another_key_is_refused_naming_both():
    other = keys.ssh_fingerprint_md5(keys.ssh_key_pair("other")[1])
    with pytest.raises(ConfigError) as err:
        config.parse(raw(digitaloceanSshKey=other))
    assert str(err.value).startswith(f"digitaloceanSshKey: {other} is not the fingerprint") and FINGERPRINT in str(err.value)


@pytest.mark.parametrize("bad", ["abc", "0", "-3", "aa:bb", True, 1.5, "4123 4567"])
def test_neither_id_nor_fingerprint_is_refused(bad):
    with pytest.raises(ConfigError, match="^digitaloceanSshKey: .* neither a DigitalOcean SSH key id"):
        config.parse(raw(digitaloceanSshKey=bad))


def test_an_existing_key_needs_its_private_half():
    with pytest.raises(ConfigError, match="^digitaloceanSshKey: .* set sshPrivateKey"):
        config.parse(raw(sshPrivateKey=None, digitaloceanSshKey=FINGERPRINT))


def test_with_an_existing_key_nothing_is_uploaded_and_droplets_name_it():
    run = program.run(program.stack_config(sshPrivateKey=SSH_KEY, digitaloceanSshKey=FINGERPRINT))
    assert run.of_type(SSH_KEY_TYPE) == []
    droplets = run.of_type(DROPLET)
    assert len(droplets) == 2 and all(program.unwrap(d.inputs["sshKeys"]) == [FINGERPRINT] for d in droplets)


def test_by_default_the_key_is_uploaded_and_two_stacks_make_two_keys():
    """The default path: a deploy key made per stack, so two stacks on one account never collide."""
    droplets_only = [{"name": "node-a", "kind": "droplet"}]
    first, second = (program.run(program.stack_config(spokes=droplets_only, postgres=None, monitor=None)) for _ in range(2))
    (a,), (b,) = first.of_type(SSH_KEY_TYPE), second.of_type(SSH_KEY_TYPE)
    assert program.unwrap(a.inputs["publicKey"]).split()[1] != program.unwrap(b.inputs["publicKey"]).split()[1]


def test_droplets_keep_their_disk_on_a_resize():
    for droplet in program.run(program.stack_config(sshPrivateKey=SSH_KEY)).of_type(DROPLET):
        assert droplet.inputs["resizeDisk"] is False


def test_the_lab_account_refuses_a_key_twice_as_digitalocean_does(tmp_path):
    account = Account(tmp_path / "account.json")
    key_id, fingerprint = account.add_key("dev-deploy", SSH_PUBLIC)
    assert fingerprint == FINGERPRINT == md5_fingerprint(SSH_PUBLIC)
    with pytest.raises(CommandError, match="422 SSH Key is already in use on your account"):
        account.add_key("prod-deploy", SSH_PUBLIC.replace("deploy", "other comment"))
    account.add_key("prod-deploy", keys.ssh_key_pair("prod")[1])  # another stack's own key: fine
    assert account.public_key(key_id) == account.public_key(fingerprint) == SSH_PUBLIC
    with pytest.raises(CommandError, match="not a key on your account"):
        account.public_key("12345")
    account.remove_key(key_id)
    account.add_key("dev-deploy", SSH_PUBLIC)  # gone from the account: it can be uploaded again
