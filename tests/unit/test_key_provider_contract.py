"""The key provider's contract with every stack already deployed.

Pulumi's Python SDK pickles a dynamic provider with dill, and a class in an importable module
goes by reference: the state of every key holds `components.keys` + `KeyProvider`, no code.
Diff and delete of those keys later run in Pulumi's provider host (`python -m pulumi.dynamic`,
started by the engine in the project directory), which imports that reference. Moving or
renaming the module or the class would leave every deployed key undeletable and undiffable.

So: a recorded state blob is driven through the real provider host over real gRPC, and the
reference the program pickles today must equal the recorded one. Change either only with an
alias plan (STYLE.md, Upgrades)."""
import base64
import json
import os
import pickletools
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from components import keys

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((Path(__file__).parent / "fixtures/keys/wg-key-state.json").read_text())
BLOB = RECORD["outputs"]["__provider"]


def struct(values: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def test_the_program_pickles_the_recorded_reference():
    from lab.sdk import serialize_provider

    assert serialize_provider(keys.KeyProvider()) == BLOB, (
        "the key provider's pickled reference changed: every key in every deployed stack names the old one")
    names = [arg for op, arg, _ in pickletools.genops(base64.b64decode(BLOB)) if op.name == "SHORT_BINUNICODE"]
    assert names == ["components.keys", "KeyProvider"]


class ProviderHost:
    """Pulumi's dynamic provider host in a process of its own, as the engine starts it."""

    def __init__(self, cwd: Path):
        import grpc
        from pulumi.runtime.proto import provider_pb2_grpc

        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "pulumi.dynamic", "127.0.0.1:0"], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**env, "PULUMI_PROJECT": "dstack-vpn"})
        port = int(self.proc.stdout.readline().decode().strip())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(self.channel).result(timeout=20)
        self.stub = provider_pb2_grpc.ResourceProviderStub(self.channel)

    def close(self):
        self.channel.close()
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def host():
    h = ProviderHost(ROOT)
    yield h
    h.close()


def test_create_diff_and_delete_of_a_recorded_key_through_the_provider_host(host):
    from pulumi.runtime.proto import provider_pb2

    urn, olds = RECORD["urn"], RECORD["outputs"]
    inputs = {"__provider": BLOB, "kind": "wireguard", "rotation": 0, "comment": "",
              "private_key": None, "public_key": None}
    same = host.stub.Diff(provider_pb2.DiffRequest(id=RECORD["id"], urn=urn, olds=struct(olds), news=struct(inputs)))
    assert same.changes == provider_pb2.DiffResponse.DIFF_NONE
    rotated = host.stub.Diff(provider_pb2.DiffRequest(id=RECORD["id"], urn=urn, olds=struct(olds),
                                                      news=struct({**inputs, "rotation": 1})))
    assert rotated.changes == provider_pb2.DiffResponse.DIFF_SOME and list(rotated.replaces) == ["rotation"]
    host.stub.Delete(provider_pb2.DeleteRequest(id=RECORD["id"], urn=urn, properties=struct(olds)))
    made = host.stub.Create(provider_pb2.CreateRequest(urn=urn, properties=struct(inputs)))
    outs = dict(made.properties)
    assert outs["__provider"] == BLOB and outs["kind"] == "wireguard"
    assert keys.wireguard_public_key(outs["private_key"]) == outs["public_key"]


def test_the_reference_needs_the_project_directory():
    """Why the engine's choice of working directory matters: elsewhere the reference does not load."""
    from pulumi.runtime.proto import provider_pb2
    import grpc

    h = ProviderHost(Path("/"))
    try:
        with pytest.raises(grpc.RpcError) as err:
            h.stub.Diff(provider_pb2.DiffRequest(id=RECORD["id"], urn=RECORD["urn"], olds=struct(RECORD["outputs"]),
                                                 news=struct(RECORD["outputs"])))
        assert "No module named 'components'" in err.value.details()
    finally:
        h.close()
