"""The GitHub workflows (.github/workflows): checked against GitHub's workflow schema, then held to this project's rules.

Each rule is a check_* function that raises AssertionError. Every rule runs on
the real files, and test_each_rule_catches_a_broken_copy runs it again on
copies broken on purpose: a rule that could never fail shows up there.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from conftest import IN_CI, ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
PREVIEW = WORKFLOWS / "preview.yml"
DEPLOY = WORKFLOWS / "deploy.yml"
IMAGE = WORKFLOWS / "image.yml"

# Exactly these jobs, each with exactly these permissions; nothing at workflow level.
PERMISSIONS = {
    "preview.yml": {"unit-tests": {"contents": "read"},
                    "preview": {"contents": "read", "pull-requests": "write"}},
    "deploy.yml": {"deploy": {"contents": "read"}},
    "image.yml": {"publish": {"contents": "read", "packages": "write"}},
}

# The `with:` inputs a step may give each action. The workflow schema cannot
# know an action's inputs, so this does. pulumi/actions: every input of its action.yml (v6.x, and v7.0.0, which
# changed the runtime to Node 24 only). The others: only the inputs in use,
# checked against the actions' README/action.yml; add one after checking it.
ACTION_INPUTS = {
    "actions/checkout": {"persist-credentials", "fetch-depth", "ref"},
    "actions/setup-python": {"python-version", "python-version-file", "cache", "cache-dependency-path"},
    "pulumi/actions": {
        "command", "stack-name", "pulumi-version", "pulumi-version-file", "work-dir", "comment-on-pr",
        "comment-on-pr-number", "comment-on-summary", "github-token", "cloud-url", "secrets-provider",
        "parallel", "message", "config-map", "expect-no-changes", "diff", "replace", "target",
        "target-dependents", "policyPacks", "policyPackConfigs", "refresh", "upsert", "remove",
        "edit-pr-comment", "color", "exclude-protected", "plan", "suppress-outputs", "suppress-progress",
        "always-include-summary"},
}

PULUMI_ACTION = "pulumi/actions"
STACK_VAR = "${{ vars.PULUMI_STACK }}"
README = ROOT / "README.md"

# The jobs that may use secrets (other than GITHUB_TOKEN), each behind its environment: a
# secret is handed out only after that environment's required reviewers approve the run.
ENVIRONMENTS = {
    "preview.yml": {"preview": "preview"},
    "deploy.yml": {"deploy": "production"},
}

# A runner that is not GitHub-hosted (a self-hosted label, a label from a variable, a
# group, a list of labels) may serve exactly one job: deploy.yml's deploy, on push to main
# in the production environment, with this runs-on.
GITHUB_HOSTED = re.compile(r"(?:ubuntu|windows|macos)-(?:latest|\d+(?:\.\d+)?)(?:-arm)?")
DEPLOY_RUNS_ON = "${{ vars.PULUMI_DEPLOY_RUNNER || 'ubuntu-24.04' }}"
PR_EVENTS = {"pull_request", "pull_request_target", "pull_request_review", "pull_request_review_comment",
             "issue_comment", "merge_group"}


# --- reading -----------------------------------------------------------------

def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def triggers(wf: dict[str, Any]) -> dict[str, Any]:
    """`on:` as a mapping (PyYAML reads the bare key `on` as the boolean True)."""
    on = wf["on"] if "on" in wf else wf.get(True)
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    return dict(on or {})


def steps(wf: dict[str, Any]):
    for job_id, job in wf["jobs"].items():
        for step in job.get("steps") or []:
            yield job_id, step


def action(step: dict[str, Any]) -> str | None:
    """`owner/repo` of a step's `uses:`, without the ref."""
    uses = step.get("uses")
    return uses.split("@", 1)[0] if uses else None


def pulumi_steps(wf: dict[str, Any], job_id: str) -> list[dict[str, Any]]:
    return [s for j, s in steps(wf) if j == job_id and action(s) == PULUMI_ACTION]


def strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def pulumi_pin() -> str:
    (pin,) = re.findall(r"^pulumi==(\S+)\s*$", (ROOT / "requirements.txt").read_text(), re.M)
    return pin


def environment_name(job: dict[str, Any]) -> str | None:
    env = job.get("environment")
    return env.get("name") if isinstance(env, dict) else env


def uses_secrets(job: dict[str, Any]) -> bool:
    """The job names the secrets context (`secrets.X`, `secrets[...]`, `toJSON(secrets)`, a
    reusable workflow's `secrets:`) for anything but the run's own GITHUB_TOKEN."""
    return any(re.search(r"\bsecrets\b", re.sub(r"\bsecrets\.GITHUB_TOKEN\b", "", s)) for s in strings(job))


def github_hosted(runs_on: Any) -> bool:
    return isinstance(runs_on, str) and GITHUB_HOSTED.fullmatch(runs_on) is not None


# --- the rules ---------------------------------------------------------------

def check_permissions(wf: dict[str, Any], expected: dict[str, dict[str, str]]) -> None:
    assert wf.get("permissions") == {}, f"workflow-level permissions must be {{}}, not {wf.get('permissions')!r}"
    assert set(wf["jobs"]) == set(expected), f"jobs {sorted(wf['jobs'])}, expected {sorted(expected)}"
    for job_id, perms in expected.items():
        got = wf["jobs"][job_id].get("permissions")
        assert got == perms, f"job {job_id}: permissions {got!r}, expected exactly {perms!r}"


USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>[^\s#]+)\s*(?P<comment>#.*)?$")
PINNED_REF = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@(?:(?P<sha>[0-9a-f]{40})|v\d+\.\d+\.\d+)$")
VERSION_COMMENT = re.compile(r"^#\s*v\d+\.\d+\.\d+\s*$")


def check_pinned(text: str) -> None:
    """Every `uses:` names a full commit SHA with a `# vX.Y.Z` comment, or an exact version tag."""
    lines = [m for m in map(USES_LINE.match, text.splitlines()) if m]
    parsed = yaml.safe_load(text)
    in_yaml = [s["uses"] for _, s in steps(parsed) if "uses" in s]
    in_yaml += [j["uses"] for j in parsed["jobs"].values() if "uses" in j]  # reusable workflows
    # a `uses:` written in flow style ({uses: ...}) would escape the line scan
    assert sorted(m["ref"] for m in lines) == sorted(in_yaml), "every `uses:` must be on a line of its own"
    assert in_yaml, "no `uses:` found"
    for m in lines:
        pinned = PINNED_REF.match(m["ref"])
        assert pinned, f"{m['ref']}: not pinned to a full commit SHA or an exact vX.Y.Z tag"
        if pinned["sha"]:
            assert m["comment"] and VERSION_COMMENT.match(m["comment"]), \
                f"{m['ref']}: a SHA needs its version as a `# vX.Y.Z` comment"


def check_action_inputs(wf: dict[str, Any]) -> None:
    for job_id, step in steps(wf):
        name = action(step)
        if name is None:
            continue
        assert name in ACTION_INPUTS, f"job {job_id}: {name} is not a checked action (see ACTION_INPUTS)"
        unknown = set(step.get("with") or {}) - ACTION_INPUTS[name]
        assert not unknown, f"job {job_id}: {name} has no input(s) {sorted(unknown)}"
        if name == "actions/checkout":
            assert (step.get("with") or {}).get("persist-credentials") is False, \
                f"job {job_id}: checkout must not leave the token in .git/config (persist-credentials: false)"


def check_pulumi_cli_matches_sdk(wf: dict[str, Any], pin: str) -> None:
    found = [s for _, s in steps(wf) if action(s) == PULUMI_ACTION]
    assert found, "no pulumi/actions step"
    for step in found:
        version = str(step.get("with", {}).get("pulumi-version"))
        assert version == pin, f"pulumi-version {version}, but requirements.txt pins the SDK at {pin}"


def check_preview_workflow(wf: dict[str, Any]) -> None:
    on = triggers(wf)
    assert set(on) == {"pull_request"}, f"preview must run on pull_request only, not {sorted(on)}"
    tests, preview = wf["jobs"]["unit-tests"], wf["jobs"]["preview"]
    # the unit tests run whether or not a stack is configured
    assert "if" not in tests, "the unit-tests job must always run"
    runs = [s["run"] for j, s in steps(wf) if j == "unit-tests" and "run" in s]
    pytest_runs = [r for r in runs if re.search(r"-m pytest\b", r)]
    assert len(pytest_runs) == 1, f"one pytest run expected in unit-tests, found {len(pytest_runs)}"
    assert re.search(r"\btests/unit\b", pytest_runs[0]), "pytest must be given tests/unit"
    assert not re.search(r"\btests(?:/e2e)?/?(?:\s|$)", pytest_runs[0]), "the e2e lab tests are not for GitHub runners"
    # the preview: off until the stack variable is set
    assert "vars.PULUMI_STACK != ''" in str(preview.get("if", "")), "preview job needs `if: vars.PULUMI_STACK != ''`"
    # forks get no secrets: their preview could only fail
    assert "github.event.pull_request.head.repo.full_name == github.repository" in str(preview["if"]), \
        "preview job must skip pull requests from forks"
    assert " || " not in str(preview["if"]), "every condition of the preview job must hold"
    assert preview.get("needs") in ("unit-tests", ["unit-tests"]), "preview must wait for the unit tests"
    # a newer push cancels the older run, so an older preview never overwrites the newer comment
    concurrency = wf.get("concurrency") or {}
    assert "github.event.pull_request.number" in str(concurrency.get("group")), "one concurrency group per pull request"
    assert concurrency.get("cancel-in-progress") is True, "a new push must cancel the older preview"
    (step,) = pulumi_steps(wf, "preview")
    args = step.get("with") or {}
    assert args.get("command") == "preview", f"command {args.get('command')!r}"
    assert args.get("stack-name") == STACK_VAR, f"stack-name {args.get('stack-name')!r}"
    assert args.get("comment-on-pr") is True, "the preview must be posted on the pull request"
    assert args.get("edit-pr-comment") is True, "the comment must be edited in place on new pushes"


def check_deploy_workflow(wf: dict[str, Any]) -> None:
    on = triggers(wf)
    assert on == {"push": {"branches": ["main"]}}, f"deploy must run on push to main only, not {on!r}"
    (job_id,) = wf["jobs"]
    job = wf["jobs"][job_id]
    env = job.get("environment")
    env_name = env.get("name") if isinstance(env, dict) else env
    assert env_name, "the deploy job needs a protected environment"
    assert "vars.PULUMI_STACK != ''" in str(job.get("if", "")), "deploy job needs `if: vars.PULUMI_STACK != ''`"
    # and its own switch: GitHub makes a missing environment on first use, unprotected
    assert "vars.PULUMI_DEPLOY == 'true'" in str(job.get("if", "")), "deploy job needs `vars.PULUMI_DEPLOY == 'true'`"
    assert " || " not in str(job["if"]), "every condition of the deploy job must hold"
    concurrency = wf.get("concurrency") or job.get("concurrency")
    assert isinstance(concurrency, dict) and concurrency.get("group"), "deploys need a concurrency group"
    assert concurrency.get("cancel-in-progress") is False, "a running `pulumi up` must never be cancelled"
    (step,) = pulumi_steps(wf, job_id)
    args = step.get("with") or {}
    assert args.get("command") == "up", f"command {args.get('command')!r}"
    assert args.get("stack-name") == STACK_VAR, f"stack-name {args.get('stack-name')!r}"


DUMPS_ENVIRONMENT = re.compile(r"(?m)(?:^|[;&|]\s*)(?:printenv\b|env\s*(?:$|[;&|>])|set\s+-[a-z]*x|export\s+-p\b)")


def check_no_secret_in_scripts(wf: dict[str, Any]) -> None:
    """Secrets reach only the pulumi/actions steps, through their env; no `run:` sees, prints or dumps one."""
    for where, env in [("workflow", wf.get("env"))] + [(f"job {j}", job.get("env")) for j, job in wf["jobs"].items()]:
        assert not any("secrets" in s for s in strings(env)), f"{where} env holds a secret: every step would get it"
    secret_vars = set()
    for job_id, step in steps(wf):
        has_secret = any("secrets" in s for s in strings(step))
        if has_secret:
            assert action(step) == PULUMI_ACTION, \
                f"job {job_id}: step {step.get('name') or step.get('uses') or step.get('run')!r} gets a secret"
            secret_vars |= {k for k, v in (step.get("env") or {}).items() if "secrets" in str(v)}
    for job_id, step in steps(wf):
        script = step.get("run")
        if script is None:
            continue
        assert not re.search(r"\bsecrets\b", script), f"job {job_id}: a run script names the secrets context"
        for var in secret_vars:
            assert not re.search(rf"\$\{{?{var}\b", script), f"job {job_id}: a run script expands ${var}"
        assert not DUMPS_ENVIRONMENT.search(script), f"job {job_id}: a run script dumps the environment"


def check_secrets_behind_environment(name: str, wf: dict[str, Any]) -> None:
    """A job that gets secrets gets them from its environment (required reviewers), no other job gets any."""
    expected = ENVIRONMENTS.get(name, {})
    for job_id, job in wf["jobs"].items():
        if uses_secrets(job):
            assert job_id in expected, f"job {job_id} of {name} uses secrets: only {sorted(expected)} may"
        if job_id in expected:
            got = environment_name(job)
            assert got == expected[job_id], f"job {job_id}: environment {got!r}, expected {expected[job_id]!r}"
    assert set(expected) <= set(wf["jobs"]), f"{name}: no job(s) {sorted(set(expected) - set(wf['jobs']))}"


def check_pull_request_runners(wf: dict[str, Any]) -> None:
    """Jobs that a pull request starts (and can rewrite) run on GitHub-hosted runners only."""
    on = set(triggers(wf))
    if not on & PR_EVENTS:
        return
    for job_id, job in wf["jobs"].items():
        runs_on = job.get("runs-on")
        assert "vars." not in str(runs_on) and "self-hosted" not in str(runs_on), \
            f"job {job_id} runs on {runs_on!r}: a pull request could reach that runner"
        assert github_hosted(runs_on), f"job {job_id}: runs-on {runs_on!r} is not one GitHub-hosted label"


def check_self_hosted_only_for_deploy(name: str, wf: dict[str, Any]) -> None:
    """The deploy runner (a self-hosted one, in adminCidrs) serves deploy.yml's deploy job only,
    which runs only on push to main, in the production environment."""
    for job_id, job in wf["jobs"].items():
        runs_on = job.get("runs-on")
        if "uses" in job and runs_on is None:
            continue  # a reusable workflow: checked where it is defined
        if github_hosted(runs_on):
            continue
        where = f"{name}: job {job_id} on {runs_on!r}"
        assert (name, job_id) == ("deploy.yml", "deploy"), f"{where}: only deploy.yml's deploy job may leave GitHub's runners"
        assert runs_on == DEPLOY_RUNS_ON, f"{where}: expected {DEPLOY_RUNS_ON!r}"
        assert triggers(wf) == {"push": {"branches": ["main"]}}, f"{where}: must run on push to main only"
        assert environment_name(job) == "production", f"{where}: must run in the production environment"


ADVICE = re.compile(r"\b(?:add|adds|added|adding|copy|copies|copied|copying|set|sets|setting|store|stored|storing|"
                    r"put|putting|duplicate|duplicated|mirror|mirrored|configure|configured)\b", re.I)
NEGATION = re.compile(r"\b(?:do not|don't|does not|doesn't|never|must not|should not|not)\s+(?:\S+\s+){0,3}$", re.I)


def sentences(text: str):
    """Sentences of prose (Markdown, or a workflow's comments and values), a table row as one."""
    text = re.sub(r"(?m)^[ \t]*#+[ \t]?", "", text)  # comment marks and Markdown headings
    for paragraph in re.split(r"\n\s*\n", text):
        prose = []
        for line in paragraph.splitlines():
            if line.lstrip().startswith("|"):
                yield line
            else:
                prose.append(line)
        yield from re.split(r"(?<=[.!?;])\s+", " ".join(" ".join(prose).split()))


def check_no_dependabot_secret_advice(text: str) -> None:
    """No sentence that names Dependabot and secrets advises putting secrets there (unless to say: don't)."""
    for sentence in sentences(text):
        if not (re.search(r"dependabot", sentence, re.I) and re.search(r"\bsecrets?\b", sentence, re.I)):
            continue
        for advice in ADVICE.finditer(sentence):
            assert NEGATION.search(sentence[:advice.start()]), \
                f"advises Dependabot secrets ({advice[0]!r}): {sentence.strip()!r}"


# --- the real files ----------------------------------------------------------

@pytest.fixture(scope="module")
def preview():
    return load(PREVIEW)


@pytest.fixture(scope="module")
def deploy():
    return load(DEPLOY)


def run_linter(*paths: Path) -> subprocess.CompletedProcess:
    """check-jsonschema (requirements.txt) with its vendored GitHub workflow schema (SchemaStore's)."""
    linter = Path(sys.executable).parent / "check-jsonschema"
    if not os.access(linter, os.X_OK):
        message = "check-jsonschema is not installed: the workflows were NOT linted (pip install -r requirements.txt)"
        if IN_CI:
            pytest.fail(message + " -- required under CI=true")
        pytest.skip("SKIPPED CHECK: " + message)
    return subprocess.run([str(linter), "--builtin-schema", "vendor.github-workflows", *map(str, paths)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_workflows_pass_the_github_workflow_schema():
    # every workflow file, not only the two checked below
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert PREVIEW in files and DEPLOY in files, files
    out = run_linter(*files)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_linter_reports_a_broken_workflow(tmp_path):
    # the linter really reads the file: an unknown permission scope is reported
    broken = PREVIEW.read_text().replace("pull-requests: write", "pull-request: write")
    path = tmp_path / "broken.yml"
    path.write_text(broken)
    out = run_linter(path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "pull-request" in out.stdout + out.stderr


@pytest.mark.parametrize("path", [PREVIEW, DEPLOY, IMAGE], ids=lambda p: p.name)
def test_permissions_are_the_minimal_ones(path):
    check_permissions(load(path), PERMISSIONS[path.name])


@pytest.mark.parametrize("path", [PREVIEW, DEPLOY, IMAGE], ids=lambda p: p.name)
def test_every_action_is_pinned(path):
    check_pinned(path.read_text())


def test_each_action_is_pinned_to_the_same_commit_everywhere():
    refs: dict[str, set[str]] = {}
    for path in (PREVIEW, DEPLOY, IMAGE):
        for _, step in steps(load(path)):
            if "uses" in step:
                refs.setdefault(action(step), set()).add(step["uses"])
    assert refs and all(len(r) == 1 for r in refs.values()), refs


@pytest.mark.parametrize("path", [PREVIEW, DEPLOY, IMAGE], ids=lambda p: p.name)
def test_actions_get_only_inputs_they_have(path):
    check_action_inputs(load(path))


@pytest.mark.parametrize("path", [PREVIEW, DEPLOY], ids=lambda p: p.name)
def test_pulumi_cli_is_the_release_of_the_pinned_sdk(path):
    check_pulumi_cli_matches_sdk(load(path), pulumi_pin())


def test_preview_runs_on_pull_requests_and_posts_a_comment(preview):
    check_preview_workflow(preview)


def test_deploy_runs_only_on_push_to_main_behind_an_environment(deploy):
    check_deploy_workflow(deploy)


@pytest.mark.parametrize("path", [PREVIEW, DEPLOY, IMAGE], ids=lambda p: p.name)
def test_no_secret_is_echoed(path):
    check_no_secret_in_scripts(load(path))


ALL_WORKFLOWS = sorted(WORKFLOWS.glob("*.y*ml"))


@pytest.mark.parametrize("path", ALL_WORKFLOWS, ids=lambda p: p.name)
def test_secrets_only_behind_an_approved_environment(path):
    check_secrets_behind_environment(path.name, load(path))


def test_the_unit_tests_get_no_secrets_and_a_github_hosted_runner(preview):
    job = preview["jobs"]["unit-tests"]
    assert not any("secrets" in s for s in strings(job)), "the unit tests need no secret, not even GITHUB_TOKEN's"
    assert "environment" not in job
    assert job["runs-on"] == "ubuntu-24.04"


def test_github_token_is_no_environment_secret(preview):
    # the run's own token is not a stored secret: a job may pass it without an environment
    wf = copy.deepcopy(preview)
    wf["jobs"]["unit-tests"]["steps"][0]["with"]["token"] = "${{ secrets.GITHUB_TOKEN }}"
    check_secrets_behind_environment("preview.yml", wf)


@pytest.mark.parametrize("path", ALL_WORKFLOWS, ids=lambda p: p.name)
def test_pull_request_jobs_run_on_github_hosted_runners(path):
    check_pull_request_runners(load(path))


def test_preview_names_no_runner_variable():
    # no runs-on of preview.yml comes from a variable (the deploy runner's, or any other)
    runs_on = [j.get("runs-on") for j in load(PREVIEW)["jobs"].values()]
    assert runs_on and not any("vars." in str(r) for r in runs_on), runs_on


@pytest.mark.parametrize("path", ALL_WORKFLOWS, ids=lambda p: p.name)
def test_the_deploy_runner_serves_only_the_deploy_on_main(path):
    check_self_hosted_only_for_deploy(path.name, load(path))


def test_the_deploy_job_may_use_the_deploy_runner(deploy):
    # the rule above must not pass only because nothing asks for the deploy runner
    assert deploy["jobs"]["deploy"]["runs-on"] == DEPLOY_RUNS_ON


@pytest.mark.parametrize("path", [README, *ALL_WORKFLOWS], ids=lambda p: p.name)
def test_no_advice_to_give_dependabot_the_secrets(path):
    check_no_dependabot_secret_advice(path.read_text())


def test_readme_documents_the_environments():
    """Each environment a workflow names is described in the README, with its required reviewers."""
    text = README.read_text()
    section = text[text.index("## Pull requests"):]
    section = section[:section.index("\n## ", 1)]
    for envs in ENVIRONMENTS.values():
        for env in envs.values():
            assert re.search(rf"`{env}`\s+environment|environment[^.]*`{env}`", section), env
    assert "Required reviewers" in section


# --- every rule can fail -----------------------------------------------------

def _job(wf, job_id):
    return wf["jobs"][job_id]


def _pulumi_with(wf, job_id):
    return pulumi_steps(wf, job_id)[0]["with"]


def _add_run(wf, job_id, script, **env):
    step = {"run": script}
    if env:
        step["env"] = env
    _job(wf, job_id)["steps"].append(step)


def _set_on(wf, value):
    wf.pop(True, None)
    wf["on"] = value


Mutation = Callable[[dict], None]
P, D = "preview.yml", "deploy.yml"

BROKEN_DICTS: list[tuple[str, str, str, Mutation]] = [
    # (workflow, rule, what is broken, how)
    (P, "permissions", "workflow-level permissions dropped", lambda wf: wf.pop("permissions")),
    (P, "permissions", "preview job may write issues",
     lambda wf: _job(wf, "preview")["permissions"].update({"issues": "write"})),
    (P, "permissions", "preview job cannot comment",
     lambda wf: _job(wf, "preview")["permissions"].pop("pull-requests")),
    (P, "permissions", "unit tests may write contents",
     lambda wf: _job(wf, "unit-tests")["permissions"].update({"contents": "write"})),
    (D, "permissions", "deploy job gets an OIDC token",
     lambda wf: _job(wf, "deploy")["permissions"].update({"id-token": "write"})),
    (D, "permissions", "write-all at workflow level", lambda wf: wf.update(permissions="write-all")),
    (P, "inputs", "misspelt pulumi/actions input",
     lambda wf: _pulumi_with(wf, "preview").update({"comment-on-prr": True})),
    (P, "inputs", "checkout keeps the token",
     lambda wf: _job(wf, "preview")["steps"][0]["with"].update({"persist-credentials": True})),
    (D, "inputs", "an action nobody checked", lambda wf: _job(wf, "deploy")["steps"].append(
        {"uses": "someone/some-action@0123456789abcdef0123456789abcdef01234567"})),
    (D, "cli", "CLI older than the SDK", lambda wf: _pulumi_with(wf, "deploy").update({"pulumi-version": "3.100.0"})),
    (P, "cli", "CLI not pinned", lambda wf: _pulumi_with(wf, "preview").pop("pulumi-version")),
    (P, "preview", "pull_request_target", lambda wf: _set_on(wf, {"pull_request_target": None})),
    (P, "preview", "also on push", lambda wf: _set_on(wf, {"pull_request": None, "push": None})),
    (P, "preview", "no PR comment", lambda wf: _pulumi_with(wf, "preview").update({"comment-on-pr": False})),
    (P, "preview", "a new comment on every push", lambda wf: _pulumi_with(wf, "preview").pop("edit-pr-comment")),
    (P, "preview", "comment-on-pr as the string 'false'",
     lambda wf: _pulumi_with(wf, "preview").update({"comment-on-pr": "false"})),
    (P, "preview", "pulumi up instead of preview", lambda wf: _pulumi_with(wf, "preview").update({"command": "up"})),
    (P, "preview", "a hard-coded stack", lambda wf: _pulumi_with(wf, "preview").update({"stack-name": "dev"})),
    (P, "preview", "preview runs with no stack set", lambda wf: _job(wf, "preview").pop("if")),
    (P, "preview", "unit tests skipped with no stack",
     lambda wf: _job(wf, "unit-tests").update({"if": "vars.PULUMI_STACK != ''"})),
    (P, "preview", "the e2e lab tests on a runner", lambda wf: [
        s.update(run=s["run"].replace("tests/unit", "tests")) for _, s in steps(wf) if "pytest" in s.get("run", "")]),
    (P, "preview", "preview before the tests pass", lambda wf: _job(wf, "preview").pop("needs")),
    (P, "preview", "preview for forks",
     lambda wf: _job(wf, "preview").update({"if": "vars.PULUMI_STACK != ''"})),
    (P, "preview", "an older preview may overwrite a newer comment",
     lambda wf: wf["concurrency"].update({"cancel-in-progress": False})),
    (P, "preview", "one concurrency group for all pull requests",
     lambda wf: wf["concurrency"].update({"group": "preview"})),
    (D, "deploy", "also on workflow_dispatch",
     lambda wf: _set_on(wf, {"push": {"branches": ["main"]}, "workflow_dispatch": None})),
    (D, "deploy", "on every branch", lambda wf: _set_on(wf, {"push": None})),
    (D, "deploy", "on pull requests", lambda wf: _set_on(wf, {"pull_request": {"branches": ["main"]}})),
    (D, "deploy", "no environment", lambda wf: _job(wf, "deploy").pop("environment")),
    (D, "deploy", "on with no stack set", lambda wf: _job(wf, "deploy").pop("if")),
    (D, "deploy", "on as soon as the stack is set (no deploy switch)",
     lambda wf: _job(wf, "deploy").update({"if": "vars.PULUMI_STACK != ''"})),
    (D, "deploy", "either switch turns it on",
     lambda wf: _job(wf, "deploy").update({"if": "vars.PULUMI_STACK != '' || vars.PULUMI_DEPLOY == 'true'"})),
    (D, "deploy", "no concurrency group", lambda wf: wf.pop("concurrency")),
    (D, "deploy", "a newer push cancels a running up", lambda wf: wf["concurrency"].update({"cancel-in-progress": True})),
    (D, "deploy", "destroy instead of up", lambda wf: _pulumi_with(wf, "deploy").update({"command": "destroy"})),
    (P, "secrets", "a secret echoed", lambda wf: _add_run(wf, "preview", "echo ${{ secrets.DIGITALOCEAN_TOKEN }}")),
    (D, "secrets", "a secret in a script's env, then printed",
     lambda wf: _add_run(wf, "deploy", 'echo "$T"', T="${{ secrets.PULUMI_ACCESS_TOKEN }}")),
    (P, "secrets", "a secret's env var expanded in a script",
     lambda wf: _add_run(wf, "preview", 'curl -H "Authorization: token ${PULUMI_ACCESS_TOKEN}" x')),
    (D, "secrets", "secrets at job level, seen by every step",
     lambda wf: _job(wf, "deploy").update(env={"DIGITALOCEAN_TOKEN": "${{ secrets.DIGITALOCEAN_TOKEN }}"})),
    (P, "secrets", "the environment dumped", lambda wf: _add_run(wf, "unit-tests", "printenv | sort")),
    (P, "secrets", "bash tracing", lambda wf: _add_run(wf, "unit-tests", "set -eux\npip list")),
    (D, "secrets", "the secrets context as JSON", lambda wf: _add_run(wf, "deploy", "echo '${{ toJSON(secrets) }}'")),
    (P, "environment", "preview secrets with no environment", lambda wf: _job(wf, "preview").pop("environment")),
    (P, "environment", "preview in the production environment",
     lambda wf: _job(wf, "preview").update(environment="production")),
    (P, "environment", "preview in an environment named as a mapping, but another one",
     lambda wf: _job(wf, "preview").update(environment={"name": "staging"})),
    (P, "environment", "the unit tests get a secret",
     lambda wf: _job(wf, "unit-tests")["steps"][0]["with"].update(token="${{ secrets.PULUMI_ACCESS_TOKEN }}")),
    (P, "environment", "the unit tests get every secret as JSON",
     lambda wf: _add_run(wf, "unit-tests", "true", S="${{ toJSON(secrets) }}")),
    (D, "environment", "deploy in the preview environment", lambda wf: _job(wf, "deploy").update(environment="preview")),
    (D, "environment", "a second job with secrets and no environment", lambda wf: wf["jobs"].update(
        notify={"runs-on": "ubuntu-24.04", "steps": [{"run": "true", "env": {"T": "${{ secrets.DIGITALOCEAN_TOKEN }}"}}]})),
    (D, "environment", "a reusable workflow given every secret",
     lambda wf: wf["jobs"].update(more={"uses": "./.github/workflows/more.yml", "secrets": "inherit"})),
    (P, "pr-runners", "unit tests on the deploy runner",
     lambda wf: _job(wf, "unit-tests").update({"runs-on": DEPLOY_RUNS_ON})),
    (P, "pr-runners", "preview on a self-hosted runner", lambda wf: _job(wf, "preview").update({"runs-on": "self-hosted"})),
    (P, "pr-runners", "preview on self-hosted labels",
     lambda wf: _job(wf, "preview").update({"runs-on": ["self-hosted", "linux"]})),
    (P, "pr-runners", "unit tests on a runner group", lambda wf: _job(wf, "unit-tests").update(
        {"runs-on": {"group": "deployers"}})),
    (P, "pr-runners", "preview on a label from a variable",
     lambda wf: _job(wf, "preview").update({"runs-on": "${{ vars.PREVIEW_RUNNER }}"})),
    (D, "pr-runners", "deploy.yml also on pull requests",
     lambda wf: _set_on(wf, {"push": {"branches": ["main"]}, "pull_request": None})),
    (D, "pr-runners", "deploy.yml on pull_request_target", lambda wf: _set_on(wf, {"pull_request_target": None})),
    (P, "deploy-runner", "unit tests on the deploy runner",
     lambda wf: _job(wf, "unit-tests").update({"runs-on": DEPLOY_RUNS_ON})),
    (P, "deploy-runner", "preview on a self-hosted runner", lambda wf: _job(wf, "preview").update({"runs-on": "self-hosted"})),
    (D, "deploy-runner", "a second job on the deploy runner", lambda wf: wf["jobs"].update(
        cleanup={"runs-on": DEPLOY_RUNS_ON, "steps": [{"run": "true"}]})),
    (D, "deploy-runner", "the deploy runner also on workflow_dispatch",
     lambda wf: _set_on(wf, {"push": {"branches": ["main"]}, "workflow_dispatch": None})),
    (D, "deploy-runner", "the deploy runner on every branch", lambda wf: _set_on(wf, {"push": None})),
    (D, "deploy-runner", "the deploy runner outside production", lambda wf: _job(wf, "deploy").pop("environment")),
    (D, "deploy-runner", "the deploy runner in another environment",
     lambda wf: _job(wf, "deploy").update(environment="staging")),
    (D, "deploy-runner", "another variable names the runner",
     lambda wf: _job(wf, "deploy").update({"runs-on": "${{ vars.SOME_RUNNER }}"})),
]

RULES: dict[str, Callable[[str, dict], None]] = {
    "permissions": lambda name, wf: check_permissions(wf, PERMISSIONS[name]),
    "inputs": lambda name, wf: check_action_inputs(wf),
    "cli": lambda name, wf: check_pulumi_cli_matches_sdk(wf, pulumi_pin()),
    "preview": lambda name, wf: check_preview_workflow(wf),
    "deploy": lambda name, wf: check_deploy_workflow(wf),
    "secrets": lambda name, wf: check_no_secret_in_scripts(wf),
    "environment": check_secrets_behind_environment,
    "pr-runners": lambda name, wf: check_pull_request_runners(wf),
    "deploy-runner": check_self_hosted_only_for_deploy,
}


@pytest.mark.parametrize("name, rule, what, mutate", BROKEN_DICTS, ids=[f"{b[1]}: {b[2]}" for b in BROKEN_DICTS])
def test_each_rule_catches_a_broken_copy(name, rule, what, mutate):
    wf = load(WORKFLOWS / name)
    RULES[rule](name, copy.deepcopy(wf))  # the real file passes the rule ...
    mutate(wf)
    with pytest.raises(AssertionError):  # ... and the broken copy does not
        RULES[rule](name, wf)


CHECKOUT_SHA = "actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1"
BROKEN_TEXTS = [
    ("a major tag", lambda t: t.replace(CHECKOUT_SHA, "actions/checkout@v7")),
    ("a branch", lambda t: t.replace(CHECKOUT_SHA, "actions/checkout@main")),
    ("a short SHA", lambda t: t.replace(CHECKOUT_SHA, CHECKOUT_SHA[:-30])),
    ("a SHA without its version", lambda t: t.replace(" # v7.0.1", "", 1)),
    ("a SHA with a vague version", lambda t: t.replace(" # v7.0.1", " # v7", 1)),
    ("a flow-style step", lambda t: t.replace(
        "    steps:\n", "    steps:\n      - {uses: actions/cache@v4}\n", 1)),
]


def assert_rule_catches(check, text: str, mutate) -> None:
    """`check` passes on `text` and fails on its broken copy."""
    check(text)
    broken = mutate(text)
    assert broken != text, "the mutation did not apply"
    with pytest.raises(AssertionError):
        check(broken)


@pytest.mark.parametrize("what, mutate", BROKEN_TEXTS, ids=[b[0] for b in BROKEN_TEXTS])
def test_pinning_rule_catches_a_broken_copy(what, mutate):
    assert_rule_catches(check_pinned, PREVIEW.read_text(), mutate)


def test_an_exact_version_tag_is_accepted():
    check_pinned(PREVIEW.read_text().replace(
        "actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1 # v7.0.1", "actions/checkout@v7.0.1"))


OLD_DEPENDABOT_ADVICE = ("Dependabot's pull requests get only Dependabot's secrets, so their\n"
                         "preview fails unless the same secrets are added there as well.")
BROKEN_DOCS = [
    (README, "the old advice", lambda t: t.replace("## Pull requests\n", f"## Pull requests\n\n{OLD_DEPENDABOT_ADVICE}\n", 1)),
    (README, "copy them to Dependabot", lambda t: t + "\nCopy the preview's secrets to Dependabot's secrets too.\n"),
    (README, "a Settings row", lambda t: t + "\n| `DIGITALOCEAN_TOKEN` | Dependabot secret | set it for Dependabot too |\n"),
    (PREVIEW, "a workflow comment", lambda t: t.replace(
        "name: preview\n", "# Dependabot: add the same secrets under Dependabot secrets.\nname: preview\n", 1)),
]


@pytest.mark.parametrize("path, what, mutate", BROKEN_DOCS, ids=[f"{b[0].name}: {b[1]}" for b in BROKEN_DOCS])
def test_dependabot_rule_catches_a_broken_copy(path, what, mutate):
    assert_rule_catches(check_no_dependabot_secret_advice, path.read_text(), mutate)


def test_a_warning_against_dependabot_secrets_is_no_advice():
    check_no_dependabot_secret_advice("Do not copy these secrets to Dependabot: they would skip the review.")


def test_deploy_installs_the_pinned_phala_cli_before_pulumi_up(deploy):
    """dstack spokes with `phala` settings are deployed by Phala's CLI from `pulumi up`: the runner
    must have the version the program's scripts name, exactly."""
    from components.nodes import dstack

    steps = deploy["jobs"]["deploy"]["steps"]
    names = [s.get("name", s.get("uses", "")) for s in steps]
    install = names.index("Install the Phala Cloud CLI (pinned)")
    up = next(i for i, s in enumerate(steps) if s.get("uses", "").startswith(PULUMI_ACTION))
    assert install < up
    step = steps[install]
    assert step["env"]["PHALA_CLI_VERSION"] == dstack.PHALA_CLI_VERSION
    assert re.fullmatch(r"\d+\.\d+\.\d+", dstack.PHALA_CLI_VERSION)
    assert 'npm install --global --no-fund --no-audit "phala@${PHALA_CLI_VERSION}"' in step["run"]
    assert steps[up]["env"]["DSTACK_VPN_PHALA_API_KEY"] == "${{ secrets.PHALA_CLOUD_API_KEY }}"


def test_the_image_is_published_from_main_with_no_secret_but_the_runs_token(tmp_path):
    """The spoke image: built on push to main by image/build.py and pushed with its digest
    unchanged; the registry login reads the run's token from stdin, never an argument."""
    wf = load(IMAGE)
    assert triggers(wf)["push"]["branches"] == ["main"] and set(triggers(wf)) == {"push"}
    (job,) = wf["jobs"].values()
    assert not uses_secrets(job) and github_hosted(job["runs-on"])
    (build,) = [s for _, s in steps(wf) if "image.build" in (s.get("run") or "")]
    assert "--push" in build["run"] and "--password-stdin" in build["run"]
    assert build["env"]["REGISTRY_TOKEN"] == "${{ github.token }}"
    assert "$REGISTRY_TOKEN" not in build["run"].replace('printf \'%s\' "$REGISTRY_TOKEN" |', "")
    # what the image is built from is what starts the workflow
    watched = triggers(wf)["push"]["paths"]
    from image import build as image_build
    sources = ["image/build.py", "templates/dstack/entrypoint.sh", "templates/scripts/_kernel_wireguard.sh",
               "templates/wireguard/watchdog.sh", "status/dstack_vpn_status.py"]
    assert len(image_build.files()) == 3  # the entrypoint, the status program, the watchdog: sources above
    for path in sources:
        assert any(path == p or path.startswith(p.rstrip("*")) for p in watched), path
