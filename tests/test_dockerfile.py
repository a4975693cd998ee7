"""The container image (Dockerfile, .dockerignore), checked statically against what uses it.

No container engine runs here, so nothing is built: the Dockerfile is parsed (instructions with
line continuations and comments, ARG defaults substituted as Docker does) and compared with the
files that name the image or depend on its contents:

* the base image is rayproject/ray at the Ray version every KubeRay manifest pins as `rayVersion`
  and cluster/gpu-cluster.yaml runs, a version within setup.py's ray range and of the installed
  ray's minor release (the machine that submits jobs), with a Python setup.py accepts;
* USER is the `runAsUser`/`runAsGroup` of the pods, WORKDIR their `workingDir` and the jobs'
  `working_dir`, and the files the manifests' commands name (trainer/launch.py, configs/...) are
  copied there;
* every COPY source exists and survives .dockerignore, whose rules are evaluated with Docker's
  matching semantics (implemented here: moby's patternmatcher) and keep the virtualenv, the git
  history and run outputs out of the build context;
* torch is installed first, with a default that satisfies setup.py, then the project; setup.py is
  copied before the code, so a code change does not reinstall the dependencies;
* the README shows how to build and push the image under the name the manifests use.

tests/k8s/test_manifests.py checks the manifests themselves (schemas, pod policy, that overlays
replace the image placeholder) and tests/cluster/test_cluster_configs.py that the cluster config's
image is the installed Ray; neither reads the Dockerfile.
"""

from __future__ import annotations

import ast
import json
import os
import posixpath
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SETUP_PY = ROOT / "setup.py"
README = ROOT / "README.md"
K8S = ROOT / "k8s"
CLUSTER_YAML = ROOT / "cluster" / "gpu-cluster.yaml"
# The image name of the manifests (a placeholder each overlay replaces through kustomize `images:`).
IMAGE_NAME = "vsrn-dist"
BASE_REPOSITORY = "rayproject/ray"
# The user and group of the rayproject/ray images, by name, for a USER given by name.
BASE_IMAGE_USERS = {"ray": 1000, "root": 0}
BASE_IMAGE_GROUPS = {"users": 100, "root": 0}


# --------------------------------------------------------------------------------------------------
# Dockerfile parsing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: KEYWORD and its argument text with continuations joined."""

    keyword: str
    text: str
    line: int  # first line of the instruction, 1-based


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions as BuildKit does: `\\` at the end of a line continues
    the instruction, comment lines and empty lines inside a continued instruction are dropped,
    and `#` starts a comment only at the beginning of a line."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and (not stripped or stripped.startswith("#")):
            continue  # comment or blank line within a continuation
        if not parts:
            start = number
        line = raw.rstrip()
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        joined = "".join(parts).strip()
        parts = []
        keyword, _, rest = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
    assert not parts, "the Dockerfile ends inside a continued instruction"
    return instructions


_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}"
                       r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def substitute(text: str, variables: dict[str, str]) -> str:
    """Docker's variable substitution (${VAR}, $VAR, ${VAR:-default}, ${VAR:+alternative}) for
    the instructions that support it; an unknown variable becomes empty, as in Docker."""
    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain")
        value = variables.get(name, "")
        if match.group("op") == "-":
            return value or match.group("word")
        if match.group("op") == "+":
            return match.group("word") if value else ""
        return value
    return _VARIABLE.sub(replace, text)


def _split_arg(text: str) -> tuple[str, str | None]:
    """`NAME=default`, `NAME="default"` or `NAME` -> (name, default or None)."""
    name, eq, default = text.partition("=")
    if not eq:
        return name.strip(), None
    words = shlex.split(default)
    return name.strip(), " ".join(words) if words else ""


def _flags_and_words(text: str) -> tuple[dict[str, str], list[str]]:
    """Leading `--flag=value` options and the remaining words of COPY/ADD/RUN (JSON form too)."""
    flags: dict[str, str] = {}
    rest = text
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    if rest.startswith("["):
        return flags, [str(w) for w in json.loads(rest)]
    return flags, rest.split()


@dataclass(frozen=True)
class Copy:
    """A COPY/ADD of the build context: sources relative to the context, absolute destination."""

    keyword: str
    sources: list[str]
    destination: str  # normalized, absolute
    into_directory: bool  # the sources go into `destination` (trailing `/`, `.` or several sources)
    chown: str | None
    line: int


@dataclass
class Image:
    """What the final stage of a Dockerfile produces, as far as these tests need it."""

    base: str
    args: dict[str, str | None]  # ARG defaults of the final stage (after substitution)
    user: str | None = None
    workdir: str = "/"
    copies: list[Copy] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # (keyword, text, line) of the final stage in order: RUN texts are not substituted
    steps: list[Instruction] = field(default_factory=list)


def build_image(instructions: list[Instruction], build_args: dict[str, str] | None = None) -> Image:
    """Evaluate the instructions the way a build would (without running anything): global ARGs
    are visible in FROM only, an ARG after FROM without a value re-declares the global one,
    --build-arg values replace defaults, WORKDIR is relative to the previous one, and a FROM that
    names an earlier stage inherits that stage's base. Returns the final stage."""
    build_args = build_args or {}
    global_args: dict[str, str] = {}
    stages: dict[str, Image] = {}
    current: Image | None = None
    for ins in instructions:
        if ins.keyword == "ARG":
            name, default = _split_arg(ins.text)
            scope = current.args if current is not None else None
            inherited = global_args.get(name)
            if current is not None:
                default = substitute(default, _visible(current)) if default is not None else None
            value = build_args.get(name, default if default is not None else inherited)
            if scope is None:
                global_args[name] = value if value is not None else ""
            else:
                scope[name] = value
            continue
        if ins.keyword == "FROM":
            words = substitute(ins.text, global_args).split()
            words = [w for w in words if not w.startswith("--")]
            base = words[0]
            if base.lower() in stages:  # FROM an earlier stage
                parent = stages[base.lower()]
                current = Image(base=parent.base, args={}, user=parent.user, workdir=parent.workdir,
                                env=dict(parent.env))
            else:
                current = Image(base=base, args={})
            if len(words) >= 3 and words[1].upper() == "AS":
                stages[words[2].lower()] = current
            continue
        assert current is not None, f"line {ins.line}: {ins.keyword} before FROM"
        current.steps.append(ins)
        variables = _visible(current)
        if ins.keyword == "USER":
            current.user = substitute(ins.text, variables)
        elif ins.keyword == "WORKDIR":
            current.workdir = posixpath.normpath(posixpath.join(current.workdir, substitute(ins.text, variables)))
        elif ins.keyword == "ENV":
            for word in shlex.split(substitute(ins.text, variables)):
                name, _, value = word.partition("=")
                current.env[name] = value
        elif ins.keyword in ("COPY", "ADD"):
            flags, words = _flags_and_words(substitute(ins.text, variables))
            if "from" in flags:
                continue  # from another stage or image, not from the build context
            *sources, destination = words
            into_directory = destination.endswith("/") or destination in (".", "..") or len(sources) > 1
            destination = posixpath.normpath(posixpath.join(current.workdir, destination))
            current.copies.append(Copy(ins.keyword, sources, destination, into_directory, flags.get("chown"),
                                       ins.line))
    assert current is not None, "no FROM"
    return current


def _visible(image: Image) -> dict[str, str]:
    """The variables an instruction of the stage sees: its ARGs, overridden by its ENVs."""
    visible = {k: v for k, v in image.args.items() if v is not None}
    visible.update(image.env)
    return visible


def dockerfile_image(build_args: dict[str, str] | None = None) -> Image:
    return build_image(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")), build_args)


def steps(image: Image, keyword: str) -> list[Instruction]:
    return [s for s in image.steps if s.keyword == keyword]


def resolve_user(user: str) -> tuple[int, int | None]:
    """USER `name|uid[:group|gid]` -> (uid, gid or None), names as in the base image."""
    name, _, group = user.partition(":")
    uid = int(name) if name.isdigit() else BASE_IMAGE_USERS[name]
    gid = (int(group) if group.isdigit() else BASE_IMAGE_GROUPS[group]) if group else None
    return uid, gid


# --------------------------------------------------------------------------------------------------
# .dockerignore with Docker's semantics (github.com/moby/patternmatcher)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    regex: re.Pattern[str]
    exclusion: bool  # a `!` rule: re-includes what earlier rules excluded


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """moby's translation of a pattern: `*` and `?` stay within one path element, `**` spans any
    number of them (`**/` also none), `[...]` is a character class, `\\` escapes."""
    out = "^"
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1:i + 2] == "*":
                i += 1
                if pattern[i + 1:i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 >= len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch in "[]":
            out += ch
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


def parse_dockerignore(text: str) -> list[IgnoreRule]:
    """Read .dockerignore as Docker does: `#` lines are comments, surrounding whitespace is
    trimmed, `!` negates, patterns are cleaned (filepath.Clean) and a leading `/` is dropped."""
    rules = []
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        pattern = raw.strip()
        if not pattern:
            continue
        exclusion = pattern.startswith("!")
        if exclusion:
            pattern = pattern[1:].strip()
        pattern = posixpath.normpath(pattern)
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern.lstrip("/")
        rules.append(IgnoreRule(pattern, _pattern_regex(pattern), exclusion))
    return rules


def is_ignored(path: str, rules: list[IgnoreRule]) -> bool:
    """moby's MatchesOrParentMatches: the rules in order, each matched against the path and each
    of its parent directories (so a rule for a directory excludes everything below it); the last
    rule that matches decides, `!` rules re-including."""
    path = posixpath.normpath(path)
    parts = path.split("/")
    parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
    matched = False
    for rule in rules:
        if rule.exclusion != matched:
            continue  # an inclusion cannot change an excluded path, an exclusion an included one
        if rule.regex.match(path) or any(rule.regex.match(p) for p in parents):
            matched = not rule.exclusion
    return matched


def dockerignore_rules() -> list[IgnoreRule]:
    return parse_dockerignore(DOCKERIGNORE.read_text(encoding="utf-8"))


def context_files(under: Path, rules: list[IgnoreRule]) -> Iterator[str]:
    """The files below `under` that the build context holds, relative to the repository root.
    Excluded directories are not entered unless a `!` rule could re-include something in them."""
    prune = not any(r.exclusion for r in rules)
    for directory, dirnames, filenames in os.walk(under):
        relative = Path(directory).relative_to(ROOT).as_posix()
        if prune:
            dirnames[:] = [d for d in dirnames if not is_ignored(posixpath.join(relative, d), rules)]
        for name in filenames:
            path = posixpath.normpath(posixpath.join(relative, name))
            if not is_ignored(path, rules):
                yield path


def image_files(image: Image, rules: list[IgnoreRule]) -> dict[str, str]:
    """Absolute path in the image -> repository path, for every file the COPY/ADD steps bring."""
    files: dict[str, str] = {}
    for copy in image.copies:
        for source in copy.sources:
            path = ROOT / source
            if path.is_dir():  # the directory's contents go into the destination
                for file in context_files(path, rules):
                    relative = posixpath.relpath(file, Path(source).as_posix())
                    files[posixpath.join(copy.destination, relative)] = file
            elif path.is_file():
                target = posixpath.join(copy.destination, path.name) if copy.into_directory else copy.destination
                files[posixpath.normpath(target)] = Path(source).as_posix()
    return files


# --------------------------------------------------------------------------------------------------
# What the other files say
# --------------------------------------------------------------------------------------------------


def k8s_documents() -> list[tuple[Path, Any]]:
    """Every YAML document under k8s/ (base, components, overlays and their patches)."""
    documents = []
    for path in sorted(K8S.rglob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                documents.append((path, document))
    return documents


def values_of(key: str, node: Any) -> Iterator[Any]:
    """Every value of `key` anywhere in a YAML tree, including JSON patch operations whose path
    ends in that key (an overlay's `- op: replace, path: .../workingDir, value: ...`)."""
    if isinstance(node, dict):
        if "op" in node and isinstance(node.get("path"), str) and node["path"].rsplit("/", 1)[-1] == key \
                and "value" in node:
            yield node["value"]
        for k, v in node.items():
            if k == key:
                yield v
            yield from values_of(key, v)
    elif isinstance(node, list):
        for item in node:
            yield from values_of(key, item)


def k8s_values(key: str) -> list[tuple[Path, Any]]:
    return [(path, v) for path, doc in k8s_documents() for v in values_of(key, doc)]


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings_in(v)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def setup_keywords() -> dict[str, Any]:
    """The literal keyword arguments of setup.py's setup() call (read, not executed)."""
    tree = ast.parse(SETUP_PY.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    raise AssertionError("setup.py has no setup() call")


def setup_requirement(name: str) -> Requirement:
    (requirement,) = [Requirement(r) for r in setup_keywords()["install_requires"] if Requirement(r).name == name]
    return requirement


def base_ray_version(base: str) -> tuple[str, str]:
    """rayproject/ray:<version>-<python>-<variant> -> (version, python tag)."""
    repository, _, tag = base.rpartition(":")
    assert repository == BASE_REPOSITORY, base
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-(py3\d+)-gpu", tag)
    assert match, f"{base}: expected rayproject/ray:<ray version>-py3XX-gpu"
    return match.group(1), match.group(2)


def readme_section(title: str) -> str:
    """The text of a README section (heading to the next heading of the same or a higher level),
    ignoring `#` lines inside code blocks."""
    lines = README.read_text(encoding="utf-8").splitlines()
    in_code, level, out = False, 0, []
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"(#+) (.*)", line) if not in_code else None
        if heading and level and len(heading.group(1)) <= level:
            break
        if heading and heading.group(2).strip() == title:
            level = len(heading.group(1))
            continue
        if level:
            out.append(line)
    assert level, f"README.md has no section {title!r}"
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# The parsers themselves
# --------------------------------------------------------------------------------------------------


def test_parser_joins_continuations_and_substitutes_args() -> None:
    text = (
        "# comment\n"
        "ARG VERSION=1.2.3\n"
        "FROM repo/img:${VERSION}-x AS base\n"
        "ARG VERSION\n"
        "ARG SPEC=\"pkg==1.0\"\n"
        "ENV A=1 \\\n"
        "    B=two\n"
        "USER 1000:100\n"
        "WORKDIR /app\n"
        "WORKDIR sub\n"
        "RUN echo one \\\n"
        "# a comment inside the continuation\n"
        "\n"
        "    && echo $VERSION\n"
        "COPY --chown=1000:100 a.txt b/ ./\n"
        "COPY [\"x y\", \"/dst/\"]\n"
        "COPY --from=base /etc/passwd /tmp/\n"
    )
    instructions = parse_dockerfile(text)
    assert [i.keyword for i in instructions] == ["ARG", "FROM", "ARG", "ARG", "ENV", "USER", "WORKDIR", "WORKDIR",
                                                 "RUN", "COPY", "COPY", "COPY"]
    run = instructions[8]
    assert run.text == "echo one     && echo $VERSION" and run.line == 11
    image = build_image(instructions)
    assert image.base == "repo/img:1.2.3-x"
    assert image.args == {"VERSION": "1.2.3", "SPEC": "pkg==1.0"}
    assert image.env == {"A": "1", "B": "two"}
    assert (image.user, image.workdir) == ("1000:100", "/app/sub")
    assert [(c.sources, c.destination, c.into_directory, c.chown) for c in image.copies] == [
        (["a.txt", "b/"], "/app/sub", True, "1000:100"), (["x y"], "/dst", True, None)]
    # --build-arg replaces the default in FROM and in the stage
    overridden = build_image(instructions, {"VERSION": "9.9.9"})
    assert overridden.base == "repo/img:9.9.9-x" and overridden.args["VERSION"] == "9.9.9"
    assert substitute("${X:-d} ${Y:+alt} $Y", {"Y": "y"}) == "d alt y"


def test_dockerignore_matcher_follows_dockers_semantics() -> None:
    rules = parse_dockerignore("# comment\n  /runs  \n*.egg-info\n**/__pycache__\n*.py[co]\ndocs\n!docs/keep.md\n"
                               "a?c\nlogs/**\n")
    assert [r.pattern for r in rules][:2] == ["runs", "*.egg-info"]  # leading / dropped, comment skipped
    excluded = ["runs", "runs/x/checkpoint_1/model.bin", "vsrn_dist.egg-info/PKG-INFO", "__pycache__/a.pyc",
                "model/__pycache__/vsrn.cpython-311.pyc", "x.pyc", "docs/report/a.png", "abc", "logs/a/b"]
    kept = ["model/runs", "model/x.egg-info/PKG-INFO",  # no implicit **/ as in gitignore
            "model/x.pyc",  # * stops at /
            "docs/keep.md",  # re-included by the ! rule
            "model/my__pycache__",  # `**/` spans whole path elements only
            "abbc", "logs", "setup.py", "trainer/launch.py"]
    assert [p for p in excluded if not is_ignored(p, rules)] == []
    assert [p for p in kept if is_ignored(p, rules)] == []


# --------------------------------------------------------------------------------------------------
# The Dockerfile against the rest of the repository
# --------------------------------------------------------------------------------------------------


def test_base_image_is_rays_gpu_image_at_the_manifests_ray_version() -> None:
    image = dockerfile_image()
    ray_version, python_tag = base_ray_version(image.base)
    manifests = k8s_values("rayVersion")
    # the RayJob and the RayCronJob at least: the check must not pass on no manifest at all
    assert len({path for path, _ in manifests}) >= 2, manifests
    assert {str(v) for _, v in manifests} == {ray_version}, manifests
    cluster_image = yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))["docker"]["image"]
    assert base_ray_version(cluster_image) == (ray_version, python_tag), cluster_image
    # the version is an ARG (so it can be changed in one place) whose default is the pinned one
    assert "RAY_VERSION" in image.args and dockerfile_image({"RAY_VERSION": "0.0.1"}).base.startswith(
        f"{BASE_REPOSITORY}:0.0.1-"), image.base
    # the image's Python is one setup.py accepts
    python = Version(f"{python_tag[2]}.{python_tag[3:]}")
    assert python in SpecifierSet(setup_keywords()["python_requires"]), python_tag


def test_pinned_ray_is_in_setups_range_and_the_installed_minor_release() -> None:
    """The image's Ray must satisfy setup.py (else `pip install -e` replaces it) and be the Ray
    release of the machine that runs `ray job submit` / `ray up` against it."""
    ray_version = Version(base_ray_version(dockerfile_image().base)[0])
    assert ray_version in setup_requirement("ray").specifier, (ray_version, str(setup_requirement("ray")))
    installed = Version(installed_version("ray"))
    assert ray_version.release[:2] == installed.release[:2], (ray_version, installed)


def test_ray_is_pinned_to_the_base_images_version_when_the_project_is_installed() -> None:
    """pip must not move Ray off `rayVersion` while resolving the project's dependencies."""
    image = dockerfile_image()
    installs = [s.text for s in steps(image, "RUN") if "pip install -e" in s.text]
    assert len(installs) == 1, installs
    assert re.search(r"ray\[[^\]]*\]==\$\{?RAY_VERSION\}?", installs[0]), installs[0]
    assert image.args.get("RAY_VERSION") == base_ray_version(image.base)[0], image.args


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    image = dockerfile_image()
    rules = dockerignore_rules()
    assert image.copies, "no COPY of the build context"
    for copy in image.copies:
        for source in copy.sources:
            assert not Path(source).is_absolute() and ".." not in Path(source).parts, (copy.line, source)
            assert (ROOT / source).exists(), f"Dockerfile line {copy.line}: {source} does not exist"
            assert not is_ignored(source, rules), f"Dockerfile line {copy.line}: .dockerignore excludes {source}"
            if (ROOT / source).is_dir():
                assert any(context_files(ROOT / source, rules)), f"{source}: nothing left in the context"


def test_dockerignore_keeps_the_virtualenv_git_and_runs_out() -> None:
    rules = dockerignore_rules()
    must_exclude = [".venv", ".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py",
                    ".git", ".git/HEAD", ".git/objects/ab/cdef", "runs", "runs/coco-vsrn/checkpoint_000000100/x",
                    "model/__pycache__/vsrn.cpython-311.pyc", "trainer/__pycache__/launch.cpython-311.pyc",
                    "vsrn_dist.egg-info/PKG-INFO", "build/lib/model/vsrn.py", ".pytest_cache/v/cache/lastfailed",
                    "trainer/x.pyc"]
    assert [p for p in must_exclude if not is_ignored(p, rules)] == []
    # ... and whatever the Dockerfile copies is kept: every source file of the copied directories
    image = dockerfile_image()
    for copy in image.copies:
        for source in copy.sources:
            path = ROOT / source
            wanted = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                                    and "__pycache__" not in p.parts and p.suffix != ".pyc"]
            dropped = [p.relative_to(ROOT).as_posix() for p in wanted
                       if is_ignored(p.relative_to(ROOT).as_posix(), rules)]
            assert dropped == [], f"{source}: .dockerignore drops files the image needs"
    # the real local directories, where they exist here, are out of the context
    for name in (".venv", ".git", "runs"):
        if (ROOT / name).exists():
            assert not any(context_files(ROOT / name, rules)), name


def test_image_runs_as_the_manifests_user() -> None:
    image = dockerfile_image()
    assert image.user, "no USER: the image would run as root"
    uid, gid = resolve_user(image.user)
    assert uid == BASE_IMAGE_USERS["ray"] and uid != 0, image.user
    users = k8s_values("runAsUser")
    assert users and {v for _, v in users} == {uid}, users
    groups = k8s_values("runAsGroup")
    if gid is not None:
        assert groups and {v for _, v in groups} == {gid}, groups
    # the project directory's files belong to that user: `pip install -e` runs as it and writes
    # the egg-info into /app
    for copy in image.copies:
        assert copy.chown is not None, f"Dockerfile line {copy.line}: copied files would belong to root"
        owner, group = resolve_user(copy.chown)
        assert owner == uid and (gid is None or group == gid), f"Dockerfile line {copy.line}: {copy.chown}"


def test_workdir_is_the_manifests_working_directory_and_holds_their_files() -> None:
    image = dockerfile_image()
    assert image.workdir == "/app"
    working_dirs = k8s_values("workingDir")
    assert working_dirs and {v for _, v in working_dirs} == {image.workdir}, working_dirs
    runtime_envs = [yaml.safe_load(v)["working_dir"] for _, v in k8s_values("runtimeEnvYAML")]
    assert len(runtime_envs) >= 2 and set(runtime_envs) == {image.workdir}, runtime_envs
    # every relative file path in a manifest's commands (`python trainer/launch.py --config
    # configs/coco.yaml`, the CronJob's `trainer/evaluate.py`, the overlays' patched entrypoints)
    # is a file of the image under WORKDIR
    files = image_files(image, dockerignore_rules())
    named = {m for _, doc in k8s_documents() for s in strings_in(doc)
             for m in re.findall(r"(?<![\w/:.-])((?:[\w-]+/)+[\w.-]+\.(?:py|ya?ml))\b", s)}
    assert {"trainer/launch.py", "trainer/evaluate.py", "configs/coco.yaml"} <= named, named
    missing = sorted(n for n in named if posixpath.join(image.workdir, n) not in files)
    assert missing == [], f"named in k8s/ but not in the image's {image.workdir}: {missing}"


def test_every_package_of_setup_is_stubbed_for_the_dependency_layer_and_copied() -> None:
    """The dependency layer installs from setup.py alone, with empty stand-ins for its packages
    (setuptools refuses a missing package directory); the real packages are copied afterwards."""
    image = dockerfile_image()
    (install,) = [s for s in steps(image, "RUN") if "pip install -e" in s.text]
    stubbed = re.search(r"for \w+ in ([\w. \\\n]+);", install.text)
    assert stubbed, install.text
    packages = set(setup_keywords()["packages"])
    assert set(stubbed.group(1).replace("\\", " ").split()) == packages, (stubbed.group(1), packages)
    files = image_files(image, dockerignore_rules())
    for package in packages:
        assert f"{image.workdir}/{package.replace('.', '/')}/__init__.py" in files, package
    # setup.py lists subpackages one by one (a wheel holds only those): none may be missing.
    on_disk = {str(init.parent.relative_to(ROOT)).replace("/", ".") for top in {p.split(".")[0] for p in packages}
               for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk <= packages, sorted(on_disk - packages)


def test_default_torch_satisfies_setup_and_is_installed_before_the_project() -> None:
    image = dockerfile_image()
    spec = image.args.get("TORCH_SPEC")
    assert spec, "no TORCH_SPEC build argument"
    requirement = Requirement(spec)
    assert requirement.name == "torch"
    (pinned,) = [s for s in requirement.specifier if s.operator == "=="]  # a reproducible default
    assert Version(pinned.version) in setup_requirement("torch").specifier, (spec, str(setup_requirement("torch")))
    index = image.args.get("TORCH_INDEX_URL")
    assert index and index.startswith("https://download.pytorch.org/whl/cu"), index  # a CUDA build by default
    runs = steps(image, "RUN")
    torch_step = next(i for i, s in enumerate(runs) if "$TORCH_SPEC" in s.text or "${TORCH_SPEC}" in s.text)
    assert "TORCH_INDEX_URL" in runs[torch_step].text, runs[torch_step].text
    project_step = next(i for i, s in enumerate(runs) if "pip install -e" in s.text)
    assert torch_step < project_step, "torch must be installed before the project, or pip picks its own torch"


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    """Layer order for the build cache: torch, then setup.py and its dependencies, then the code,
    so that editing the code rebuilds only the last (small) layers."""
    image = dockerfile_image()
    order = image.steps
    position = {id(s): i for i, s in enumerate(order)}
    torch_step = next(s for s in order if s.keyword == "RUN" and "TORCH_SPEC" in s.text)
    install = next(s for s in order if s.keyword == "RUN" and "pip install -e" in s.text)
    copies = [s for s in order if s.keyword in ("COPY", "ADD")]
    setup_copy = [c for c in copies if _flags_and_words(c.text)[1][:-1] == ["setup.py"]]
    assert len(setup_copy) == 1, "setup.py must be copied on its own before the dependencies are installed"
    assert position[id(torch_step)] < position[id(setup_copy[0])] < position[id(install)]
    code_copies = [c for c in copies if c is not setup_copy[0]]
    assert code_copies and all(position[id(c)] > position[id(install)] for c in code_copies), \
        "code copied before the dependency layer invalidates it on every change"


def test_readme_shows_how_to_build_and_push_the_manifests_image() -> None:
    section = readme_section("Container image")
    # the name every manifest container uses, and the name the overlays' `images:` replace
    container_images = {v for path, v in k8s_values("image") if isinstance(v, str)
                        and "overlays" not in path.parts}
    assert container_images == {IMAGE_NAME}, container_images
    overlay_images = [entry for path, doc in k8s_documents() if path.name == "kustomization.yaml"
                      for entry in (doc.get("images") or [])]
    assert overlay_images and {e["name"] for e in overlay_images} == {IMAGE_NAME}, overlay_images
    builds = re.findall(r"docker build (?:.* )?-t (\S+)(.*)", section)
    assert builds, "no `docker build -t ...` in the README section"
    for reference, _ in builds:
        assert reference.split(":")[0].rsplit("/", 1)[-1] == IMAGE_NAME, reference
    pushes = re.findall(r"docker push (\S+)", section)
    assert pushes and all(p in {r for r, _ in builds} for p in pushes), (pushes, builds)
    # the build arguments shown exist in the Dockerfile, and the CUDA one is shown
    declared = set(dockerfile_image().args)
    shown = set(re.findall(r"--build-arg (\w+)=", section))
    assert "TORCH_INDEX_URL" in shown and shown <= declared, (shown, declared)
    # where the manifests get the pushed image from: the overlays' `images:` entries
    assert "images:" in section and "k8s/overlays" in section
    for entry in overlay_images:
        assert entry["newName"] in section, f"README does not name the overlays' image {entry['newName']}"
