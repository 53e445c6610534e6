"""The lab engine: runs the unchanged Pulumi program under Pulumi's mocks and
makes every registration real, with the lifecycle the Pulumi engine and the
real providers give it.

- state is kept between runs (a JSON file, 0600: like Pulumi's state it holds
  the secrets that deletes need);
- a new resource is created; an unchanged one runs nothing; a changed one is
  updated in place or replaced, as its provider's diff says (deleted first
  where `deleteBeforeReplace`, otherwise the old one is deleted at the end);
- a resource the program no longer declares is deleted with its old inputs,
  dependents first; `destroy` deletes everything that way.

Providers are plain objects keyed by type token (see lab/cloud.py for the
real ones and tests/unit/test_lab_engine.py for recording ones).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pulumi
import yaml
from pulumi.runtime import mocks as pmocks
from pulumi.runtime import rpc
from pulumi.runtime.proto import resource_pb2

from . import sdk
from .runner import ROOT, SECRET_KEYS, run_program


class Provider(Protocol):
    def create(self, urn: str, inputs: dict) -> tuple[str, dict]: ...
    def diff(self, old: "Record", inputs: dict) -> str:
        """'none', 'update' or 'replace'."""
    def update(self, urn: str, old: "Record", inputs: dict) -> dict: ...
    def delete(self, old: "Record") -> None: ...
    def read(self, old: "Record") -> "Record | None":
        """Refresh: the resource as the cloud has it now; None when it is gone."""


@dataclass
class Record:
    urn: str
    type: str
    id: str
    inputs: dict
    outputs: dict
    dependencies: list[str]
    parent: str
    delete_before_replace: bool

    def to_json(self) -> dict:
        return self.__dict__


@dataclass
class Action:
    """What the engine did, for reports and tests: op is create/update/replace/delete."""
    op: str
    urn: str
    type: str

    @property
    def name(self) -> str:
        return self.urn.split("::")[-1]


@dataclass
class Result:
    actions: list[Action] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)


class EngineError(RuntimeError):
    pass


class State:
    """Resource records by URN, written to disk after every change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.records: dict[str, Record] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self.records = {u: Record(**r) for u, r in data["resources"].items()}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state.")  # 0600
        with os.fdopen(fd, "w") as f:
            json.dump({"resources": {u: r.to_json() for u, r in self.records.items()}}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def put(self, record: Record, save: bool = True) -> None:
        """save=False for a record that changed nothing on any host (saved with the rest at the end
        of the run): saving the whole file for each of them made a run quadratic in its size."""
        with self.lock:
            self.records[record.urn] = record
            if save:
                self.save()

    def drop(self, urn: str) -> None:
        with self.lock:
            self.records.pop(urn, None)
            self.save()


def deletion_order(records: list[Record]) -> list[Record]:
    """Dependents before what they depend on (and children before parents)."""
    by_urn = {r.urn: r for r in records}
    needs: dict[str, set[str]] = {r.urn: {d for d in r.dependencies + [r.parent] if d in by_urn} for r in records}
    order: list[Record] = []
    done: set[str] = set()
    # reverse topological order: repeatedly take what nothing left depends on
    while len(done) < len(records):
        free = [u for u in by_urn if u not in done and not any(u in needs[o] for o in by_urn if o not in done)]
        if not free:
            raise EngineError("dependency cycle in state")
        for u in sorted(free):
            done.add(u)
            order.append(by_urn[u])
    return order


class Engine:
    def __init__(self, state_path: Path, providers: dict[str, Provider], log: Callable[[str], None] = print):
        self.state = State(state_path)
        self.providers = providers
        self.log = log
        self.lock = threading.Lock()
        self.result = Result()
        self.registered: set[str] = set()
        self.pending_deletes: list[Record] = []
        self.errors: list[str] = []
        # Registrations still running: a failed run waits for them before it returns.
        self.in_flight = 0
        self.idle = threading.Condition(self.lock)

    def provider(self, typ: str) -> Provider:
        for prefix, provider in self.providers.items():
            if typ == prefix or typ.startswith(prefix):
                return provider
        raise EngineError(f"the lab has no provider for {typ}")

    def _act(self, op: str, record_or_urn, typ: str) -> None:
        urn = record_or_urn if isinstance(record_or_urn, str) else record_or_urn.urn
        action = Action(op, urn, typ)
        with self.lock:
            self.result.actions.append(action)
        self.log(f"  {op:<8} {typ.split(':')[-1]:<22} {action.name}")

    # -- called on Pulumi's worker threads, once per resource --------------
    def register(self, urn: str, request, inputs: dict) -> tuple[str, dict]:
        with self.lock:
            self.registered.add(urn)
            self.in_flight += 1
        try:
            return self._register(urn, request, inputs)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.idle.notify_all()

    def _register(self, urn: str, request, inputs: dict) -> tuple[str, dict]:
        typ = request.type
        old = self.state.records.get(urn)
        provider = self.provider(typ)
        new = Record(urn=urn, type=typ, id="", inputs=inputs, outputs={},
                     dependencies=sorted(set(request.dependencies)), parent=request.parent,
                     delete_before_replace=bool(request.deleteBeforeReplace))
        try:
            if old is None:
                new.id, new.outputs = provider.create(urn, inputs)
                self._act("create", urn, typ)
            else:
                change = "none" if old.inputs == inputs else provider.diff(old, inputs)
                if change == "none":
                    old.dependencies, old.parent = new.dependencies, new.parent
                    old.inputs = inputs
                    self.state.put(old, save=False)
                    return old.id, old.outputs
                if change == "update":
                    new.id = old.id
                    new.outputs = provider.update(urn, old, inputs)
                    self._act("update", urn, typ)
                else:
                    if new.delete_before_replace:
                        provider.delete(old)
                        self.state.drop(urn)
                    else:
                        with self.lock:
                            self.pending_deletes.append(old)
                    new.id, new.outputs = provider.create(urn, inputs)
                    self._act("replace", urn, typ)
        except Exception as err:  # reported after the run, like Pulumi's diagnostics
            with self.lock:
                self.errors.append(f"{urn.split('::')[-1]} ({typ}): {err}")
            raise
        self.state.put(new)
        return new.id, new.outputs

    def _delete(self, records: list[Record]) -> None:
        for record in deletion_order(records):
            try:
                self.provider(record.type).delete(record)
            except Exception as err:
                self.errors.append(f"delete {record.urn.split('::')[-1]}: {err}")
                raise EngineError("; ".join(self.errors)) from err
            if self.state.records.get(record.urn) is record:
                self.state.drop(record.urn)
            self._act("delete", record, record.type)

    # -- the commands ----------------------------------------------------------
    def refresh(self) -> Result:
        """`pulumi refresh`: each resource read back from the cloud; one that is gone leaves the state.
        (pulumi-command's Command has no read: its record stays as it was.)"""
        result = Result()
        for urn, record in list(self.state.records.items()):
            read = getattr(self.provider(record.type), "read", None)
            current = record if read is None else read(record)
            if current is None:
                self.state.drop(urn)
                result.actions.append(Action("gone", urn, record.type))
                self.log(f"  {'gone':<8} {record.type.split(':')[-1]:<22} {urn.split('::')[-1]}")
            elif current is not record:
                self.state.put(current)
                result.actions.append(Action("refresh", urn, record.type))
        return result

    def up(self, settings: dict[str, Any], secret_keys: tuple[str, ...] = SECRET_KEYS,
           stack: str = "lab", program: Path = ROOT / "__main__.py", continue_on_error: bool = False,
           refresh: bool | None = None) -> Result:
        """refresh: None reads the project's own `options.refresh` (Pulumi.yaml), as the CLI does."""
        refreshed = self.refresh() if (refresh_always(program) if refresh is None else refresh) else Result()
        self.result, self.registered, self.pending_deletes, self.errors = Result(), set(), [], []
        self.result.actions.extend(refreshed.actions)
        try:
            self.result.outputs = run_program(_Monitor(self), _NoMocks(), settings, stack, secret_keys=secret_keys,
                                              program=program, continue_on_error=continue_on_error)
        except Exception as err:
            with self.lock:
                self.idle.wait_for(lambda: self.in_flight == 0)
            self.state.save()
            message = "; ".join(self.errors) or str(err)
            raise EngineError(message) from err
        self.state.save()
        gone = [r for u, r in self.state.records.items() if u not in self.registered]
        self._delete(gone + self.pending_deletes)
        return self.result

    def destroy(self, refresh: bool | None = None, program: Path = ROOT / "__main__.py") -> Result:
        refreshed = self.refresh() if (refresh_always(program) if refresh is None else refresh) else Result()
        self.result, self.errors = Result(), []
        self.result.actions.extend(refreshed.actions)
        self._delete(list(self.state.records.values()))
        return self.result


def refresh_always(program: Path) -> bool:
    """The project's `options: refresh: always` (Pulumi.yaml beside the program)."""
    project = Path(program).parent / "Pulumi.yaml"
    if not project.exists():
        return False
    data = yaml.safe_load(project.read_text()) or {}
    return (data.get("options") or {}).get("refresh") == "always"


class _NoMocks(pulumi.runtime.Mocks):
    def new_resource(self, args):  # never called: the monitor below answers
        raise AssertionError("unreachable")

    def call(self, args):
        return {}


class _Monitor(pmocks.MockMonitor):
    """Pulumi's mock monitor, answering each registration through the engine."""

    def __init__(self, engine: Engine):
        super().__init__(_NoMocks())
        self.engine = engine

    def RegisterResource(self, request):
        urn = self.make_urn(request.parent, request.type, request.name)
        if request.type == "pulumi:pulumi:Stack" or not request.custom:
            return resource_pb2.RegisterResourceResponse(urn=urn)
        sdk.ensure_event_loop()
        inputs = rpc.deserialize_properties(request.object)
        id_, outputs = self.engine.register(urn, request, _plain(inputs))
        obj = sdk.wait(rpc.serialize_properties(outputs, {}))
        return resource_pb2.RegisterResourceResponse(urn=urn, id=id_, object=obj)


def _plain(value: Any) -> Any:
    """Inputs as JSON-able values, secret markers taken off (the state file stores them)."""
    if sdk.is_secret(value):
        return _plain(value.get("value"))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
