"""A small Dockerfile and .dockerignore reader, for tests/test_deploy_static.py.

* `parse_dockerfile`: the build arguments and the stages, each with its
  instructions (continuations joined, comments dropped, `${ARG}` expanded in
  FROM); `Stage.env` applies the stage's ENV lines as Docker does;
* `build_context`: the files .dockerignore lets into the build context
  (Docker's rules: the last matching pattern wins, `!` re-includes, a pattern
  matching a directory covers everything inside it).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from docker.utils.build import exclude_paths


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name}, found {len(found)}"
        return found[0]

    def env(self, start: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(start or {})
        for instruction in self.all("ENV"):
            apply_env(env, instruction.args)
        return env


def apply_env(env: dict[str, str], args: str) -> None:
    """`ENV A=1 B="x y" PATH="/opt/venv/bin:${PATH}"`, expanded against what is set so far."""
    for item in shlex.split(args):
        key, sep, value = item.partition("=")
        assert sep, f"ENV {args}: use the KEY=value form"
        env[key] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), value)


def logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (and parser directives), also inside continuations
        if stripped.endswith("\\"):
            current += stripped[:-1].strip() + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return lines


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], parts[0])
            alias = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, alias))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(stage: Stage) -> tuple[dict[str, str], list[str]]:
    options, _, command = stage.one("HEALTHCHECK").args.partition("CMD ")
    flags = dict(flag.removeprefix("--").split("=", 1) for flag in options.split())
    return flags, exec_form(command)


# --- .dockerignore: docker-py's own reading of it (installed with testcontainers) -----------------


def build_context(root: Path) -> list[str]:
    """The files under `root` that `root/.dockerignore` lets into the build context.

    docker-py always lists the Dockerfile and the .dockerignore (the daemon needs them to
    build); they are left out here, since the tests ask what the image's COPY can reach."""
    patterns = [
        line.strip()
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    files = (rel for rel in exclude_paths(str(root), patterns) if (root / rel).is_file())
    return sorted(rel for rel in files if rel not in {"Dockerfile", ".dockerignore"})
