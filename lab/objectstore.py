"""The lab's stand-in for DigitalOcean Spaces: an S3 endpoint over TLS on the underlay.

moto's server (PyPI: moto, the S3 API that boto3's and many projects' tests run against) behind
stunnel (Debian's stunnel4) for TLS, in a namespace of its own on the wan bridge, at
OBJECT_STORE_ADDRESS:443, with a certificate from a CA of the lab's: the members reach it over the
underlay as they would reach Spaces over the Internet, and check its certificate (the stack's
repository.caCertificate). Why moto: the package registries offer no MinIO, Ceph's RADOS gateway
needs a Ceph cluster, and Debian's rclone (1.60) predates `rclone serve s3`. Why stunnel: moto's own
TLS (werkzeug's) closes kept-alive connections without TLS's close_notify, and pgBackRest (OpenSSL
3) fails the next request on one ("unexpected eof while reading"); stunnel closes them properly.
moto keeps the objects in its process: they last as long as the lab. It does not check
signatures, so any access key passes (the program's refusal of a missing key is tested in the
unit tests).

Both processes are recorded by PID and start time in the lab's state, and killed by close() (the
lab's teardown), as the namespace is removed with the others the lab recorded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .machine import _alive, _start_time, _write_json
from .packages import run

OBJECT_STORE_ADDRESS = "198.51.100.90"
ENDPOINT = f"https://{OBJECT_STORE_ADDRESS}"
MOTO_PORT = 9000  # on the namespace's own loopback: only stunnel reaches it
REGION = "us-east-1"  # (DigitalOcean's own provider signs Spaces requests for us-east-1 too)


class ObjectStore:
    def __init__(self, lab):
        self.lab = lab
        self.ns = f"{lab.prefix}s3"
        self.dir = lab.state_dir / "objectstore"
        self.record = self.dir / "server.json"

    @property
    def ca_certificate(self) -> str:
        return (self.dir / "ca.crt").read_text()

    def credentials(self) -> tuple[str, str]:
        """The access key the lab stack's members use (moto takes any; made once per lab)."""
        path = self.dir / "key.json"
        if not path.exists():
            _write_json(path, {"id": "LAB" + os.urandom(8).hex().upper(), "secret": os.urandom(24).hex()})
            path.chmod(0o600)
        data = json.loads(path.read_text())
        return data["id"], data["secret"]

    def _certificates(self) -> None:
        from components import keys
        if (self.dir / "server.key").exists():
            return
        ca = keys.tls_ca("dstack-vpn lab object store CA")
        # the address as a DNS name too: pgBackRest (2.45) matches the host it dials against the DNS
        # names (and common name), not an IP address entry
        server = keys.tls_cert(OBJECT_STORE_ADDRESS, [OBJECT_STORE_ADDRESS, f"dns:{OBJECT_STORE_ADDRESS}"],
                               ca["private_key"], ca["public_key"])
        for name, text in (("ca.crt", ca["public_key"]), ("server.crt", server["public_key"]),
                           ("server.key", server["private_key"])):
            fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)

    def running(self) -> bool:
        if not self.record.exists():
            return False
        data = json.loads(self.record.read_text())
        return all(_alive(p["pid"], p["start_time"]) for p in data["processes"])

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.dir / log_name, "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
        log.close()
        return proc

    def start(self) -> None:
        """The endpoint, up and answering (started once; a no-op while it runs)."""
        with self.lab._lock:
            self.lab._ensure_underlay()
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._certificates()
            if self.running():
                return
            record = self.lab.state_dir / "lab.json"
            data = json.loads(record.read_text())
            if self.ns not in data["namespaces"]:
                data["namespaces"].append(self.ns)
                _write_json(record, data)
            if not Path(f"/run/netns/{self.ns}").exists():
                self.lab._add_netns(self.ns)
                self.lab._plug(self.ns, "v-s3", OBJECT_STORE_ADDRESS)
            self.stop()  # what is left of an earlier start
            (self.dir / "stunnel.conf").write_text(
                "foreground = yes\npid =\n[s3]\n"
                f"accept = {OBJECT_STORE_ADDRESS}:443\nconnect = 127.0.0.1:{MOTO_PORT}\n"
                f"cert = {self.dir / 'server.crt'}\nkey = {self.dir / 'server.key'}\n")
            procs = [self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
                                 "moto.log"),
                     self._spawn(["stunnel4", str(self.dir / "stunnel.conf")], "stunnel.log")]
            _write_json(self.record, {"processes": [{"pid": p.pid, "start_time": _start_time(p.pid)} for p in procs]})
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if self.client_ok():
                return
            if any(p.poll() is not None for p in procs):
                logs = "".join((self.dir / n).read_text()[-1000:] for n in ("moto.log", "stunnel.log"))
                raise RuntimeError(f"the lab object store stopped: {logs}")
            time.sleep(0.3)
        raise RuntimeError("the lab object store does not answer on " + ENDPOINT)

    def client_ok(self) -> bool:
        return self.exec_python("import sys; sys.exit(0)", check_store=True).returncode == 0

    def exec_python(self, code: str, check_store: bool = False, stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run Python code with boto3 in the operator's namespace (where the store is reachable):
        STORE is an S3 client for the endpoint. The access key goes in the environment (boto3 reads
        it there), never in the command's text."""
        key_id, secret = self.credentials()
        prelude = (
            "import boto3, json, sys\n"
            "from botocore.config import Config\n"
            f"STORE = boto3.client('s3', endpoint_url={ENDPOINT!r}, region_name={REGION!r}, "
            f"verify={str(self.dir / 'ca.crt')!r}, "
            "config=Config(s3={'addressing_style': 'path'}, retries={'max_attempts': 2}, connect_timeout=3))\n"
            + ("STORE.list_buckets()\n" if check_store else ""))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
        return run(["ip", "netns", "exec", self.lab.op_ns, sys.executable, "-c", prelude + code], check=False, env=env,
                   input=stdin)

    def create_bucket(self, name: str) -> None:
        """What a user does in their provider's console before naming the bucket."""
        proc = self.exec_python(f"STORE.create_bucket(Bucket={name!r})")
        if proc.returncode != 0 and "BucketAlreadyOwnedByYou" not in proc.stderr:
            raise RuntimeError(f"bucket {name}: {proc.stderr[-1000:]}")

    def _python(self, code: str, stdin: str | None = None) -> str:
        """exec_python's output; its error raised."""
        proc = self.exec_python(code, stdin=stdin)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return proc.stdout

    def keys(self, bucket: str) -> list[str]:
        return json.loads(self._python(
            "keys = []\n"
            f"for page in STORE.get_paginator('list_objects_v2').paginate(Bucket={bucket!r}):\n"
            "    keys += [o['Key'] for o in page.get('Contents', [])]\n"
            "print(json.dumps(keys))\n"))

    def download_all(self, bucket: str, into: Path) -> int:
        """Every object of the bucket, as stored (encrypted), into a folder; how many."""
        return int(self._python(
            "import os\n"
            "keys = json.load(sys.stdin)\n"  # (thousands of names: more than one argument may hold)
            "for key in keys:\n"
            f"    STORE.download_file({bucket!r}, key, os.path.join({str(into)!r}, key.strip('/').replace('/', '__')))\n"
            "print(len(keys))\n", stdin=json.dumps(self.keys(bucket))))

    def stop(self) -> None:
        """Both processes gone (by the PIDs and start times recorded)."""
        if not self.record.exists():
            return
        for p in json.loads(self.record.read_text()).get("processes", []):
            if not _alive(p["pid"], p["start_time"]):
                continue
            try:
                os.killpg(p["pid"], signal.SIGTERM)
            except ProcessLookupError:
                continue
            end = time.monotonic() + 10
            while _alive(p["pid"], p["start_time"]) and time.monotonic() < end:
                time.sleep(0.1)
            if _alive(p["pid"], p["start_time"]):
                os.killpg(p["pid"], signal.SIGKILL)
        self.record.unlink()
