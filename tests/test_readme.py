"""The README and docs/ in step with the code: commands, options, variables, paths and links.

Pure and fast: it reads the Markdown, walks the ``bridgehook`` click group, records which variables
``Settings.from_env`` asks for, and looks at the files. A renamed command, option, variable or module
fails here until the documentation says the same.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import click

from bridgehook.cli import main
from tests.support import settings_variables

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Where commands are documented: the README names every one, the runbook gives every option.
COMMAND_DOCS = (README, ROOT / "docs" / "operations.md")
# Packages whose environment reads are user configuration (not the fake's, the benchmarks' or tests').
CONFIGURED = ("service", "workers", "api", "bridgehook")
# Local state of `make run`, named in the docs but not in the repository.
RUNTIME_DIRS = {".bridgehook", ".venv", ".venv-deploy"}
PACKAGES = ("service", "workers", "api", "bridgehook", "fakebridge", "benchmarks")


# -- reading Markdown ------------------------------------------------------------------------------


@dataclass
class Doc:
    path: Path
    prose: list[str]  # lines outside fenced code blocks
    code: list[str]  # lines inside them

    @classmethod
    def read(cls, path: Path) -> Doc:
        prose: list[str] = []
        code: list[str] = []
        fenced = False
        for line in path.read_text().splitlines():
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
                continue
            (code if fenced else prose).append(line)
        return cls(path, prose, code)

    def spans(self) -> Iterator[str]:
        """Inline code, with a table's escaped pipes (``\\|``) read as pipes."""
        for line in self.prose:
            for match in re.finditer(r"(`+)(.+?)\1", line):
                yield match.group(2).strip().replace("\\|", "|")

    def headings(self) -> list[str]:
        return [line.lstrip("#").strip() for line in self.prose if re.match(r"#{1,6} ", line)]

    def links(self) -> Iterator[str]:
        for line in self.prose:
            yield from re.findall(r"\]\(([^)\s]+)\)", line)

    def section(self, title: str) -> list[str]:
        """The prose lines under the level-2 heading ``title``, up to the next level-2 heading."""
        lines: list[str] = []
        inside = False
        for line in self.prose:
            if line.startswith("## "):
                inside = line[3:].strip() == title
            elif inside:
                lines.append(line)
        assert lines, f"{self.path.name}: no section {title!r}"
        return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Doc) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in doc.headings():
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


# -- commands ---------------------------------------------------------------------------------------


def invocations(doc: Doc) -> Iterator[list[str]]:
    """The words after ``bridgehook`` wherever the docs show it run: inline code that starts with it,
    and code-block lines that start with it (after a ``$`` prompt or ``.venv/bin/``) or run it after
    ``--`` (``kubectl exec … -- bridgehook …``)."""
    start = re.compile(r"^(?:\$\s+)?(?:\.venv/bin/)?bridgehook(?=\s|$)(.*)$")
    after_dashes = re.compile(r"\s--\s+bridgehook(?=\s|$)(.*)$")
    lines = [*doc.spans(), *(line.split(" # ")[0] for line in doc.code)]
    for line in lines:
        line = line.strip()
        match = start.match(line) or after_dashes.search(line)
        if match:
            yield match.group(1).split()


def option_names(command: click.Command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)} | {
        "--help",
        "-h",
    }


@dataclass
class Mention:
    path: tuple[str, ...]  # ("dlq", "replay")
    options: list[str]


@functools.cache
def placeholders() -> dict[str, list[str]]:
    """Options that a synopsis names by one word, defined on a code-block line of their own:
    ``FILTERS: [--type T] [--item ID] …`` (in docs/operations.md)."""
    found: dict[str, list[str]] = {}
    for path in (README, *DOCS):
        for line in Doc.read(path).code:
            match = re.fullmatch(r"([A-Z][A-Z_]+): (.*-.*)", line.strip())
            if match:
                found[match.group(1)] = match.group(2).split()
    return found


def tokens(words: list[str], defined: Mapping[str, list[str]]) -> Iterator[str]:
    """The words of a synopsis without its punctuation (``[--rate R]``, ``(ID… | --all)``)."""
    for word in words:
        for token in re.sub(r"[\[\]()|…,;]", " ", word).split():
            if token in defined:
                yield from tokens(defined[token], {})
            else:
                yield token


def resolve(words: list[str]) -> tuple[Mention, list[str]]:
    """Walk ``words`` down the click group; return what was named and what does not exist."""
    command: click.Command = main
    path: list[str] = []
    options: list[str] = []
    problems: list[str] = []
    for token in tokens(words, placeholders()):
        shown = " ".join(["bridgehook", *path])
        if token.startswith("-") and token.strip("-"):
            name = token.split("=")[0]
            options.append(name)
            if name not in option_names(command):
                problems.append(f"`{shown}` has no option {name}")
        elif isinstance(command, click.Group) and not options:
            if token not in command.commands:
                problems.append(f"`{shown}` has no command {token!r}")
                break
            command = command.commands[token]
            path.append(token)
        # else: an argument or a metavar (ID, WHEN, N…) of a command that takes no subcommand
    return Mention(tuple(path), options), problems


def cli_commands() -> dict[tuple[str, ...], click.Command]:
    """Every command and group of the CLI, by path, the root excluded."""
    found: dict[tuple[str, ...], click.Command] = {}

    def walk(group: click.Group, prefix: tuple[str, ...]) -> None:
        for name, command in group.commands.items():
            found[(*prefix, name)] = command
            if isinstance(command, click.Group):
                walk(command, (*prefix, name))

    walk(main, ())
    return found


def mentions(paths: tuple[Path, ...]) -> tuple[list[Mention], list[str]]:
    found: list[Mention] = []
    problems: list[str] = []
    for path in paths:
        for words in invocations(Doc.read(path)):
            mention, wrong = resolve(words)
            found.append(mention)
            problems += [f"{path.name}: {p}" for p in wrong]
    return found, problems


def test_every_command_and_option_named_exists() -> None:
    _, problems = mentions((README, *DOCS))
    assert not problems, "\n".join(problems)


def test_every_command_is_in_the_readme_and_every_option_documented() -> None:
    readme, _ = mentions((README,))
    named = {m.path[:n] for m in readme for n in range(1, len(m.path) + 1)}
    missing = [" ".join(path) for path in cli_commands() if len(path) == 1 and path not in named]
    assert not missing, f"top-level commands the README does not name: {missing}"

    documented, _ = mentions(COMMAND_DOCS)
    named = {m.path for m in documented}
    options: dict[tuple[str, ...], set[str]] = {}
    for m in documented:
        options.setdefault(m.path, set()).update(m.options)
    problems = []
    for path, command in cli_commands().items():
        if isinstance(command, click.Group):
            continue
        shown = "bridgehook " + " ".join(path)
        if path not in named:
            problems.append(f"`{shown}` is not documented")
        for param in command.params:
            if isinstance(param, click.Option) and not set(param.opts) & options.get(path, set()):
                problems.append(f"`{shown}` option {param.opts[-1]} is not documented")
    assert not problems, "\n".join(problems)


def test_options_named_alone_exist() -> None:
    """An option in inline code on its own (`--json`) belongs to some command."""
    everything = set().union(*(option_names(c) for c in cli_commands().values()))
    problems = []
    for path in COMMAND_DOCS:
        for span in Doc.read(path).spans():
            match = re.fullmatch(r"(--?[a-z][a-z-]*)(?:[ =]\S+)?", span)
            if match and match.group(1) not in everything:
                problems.append(f"{path.name}: no command has {match.group(1)}")
    assert not problems, "\n".join(problems)


def test_make_targets_named_exist() -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = {
        m.group(1) for doc in (README, *DOCS) for m in re.finditer(r"`make ([a-z][\w-]*)`", doc.read_text())
    }
    assert named, "the docs name no make target"
    assert named <= targets, named - targets


# -- configuration ----------------------------------------------------------------------------------


def other_variables() -> set[str]:
    """Variables read by name outside Settings (``os.environ.get("BRIDGEHOOK_HOME")``, ``env["X"]``)."""
    read = re.compile(
        r"""\b(?:environ|env)\s*(?:\.get|\.setdefault|\.pop)?\s*[(\[]\s*["']([A-Z][A-Z0-9_]+)["']"""
    )
    getenv = re.compile(r"""\bgetenv\(\s*["']([A-Z][A-Z0-9_]+)["']""")
    names: set[str] = set()
    for package in CONFIGURED:
        for source in (ROOT / package).rglob("*.py"):
            text = source.read_text()
            names.update(read.findall(text), getenv.findall(text))
    return names


def configuration_table() -> set[str]:
    names: set[str] = set()
    for line in Doc.read(README).section("Configuration"):
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[1]))
    return names


def test_the_configuration_table_names_exactly_the_variables_the_code_reads() -> None:
    table = configuration_table()
    read = settings_variables() | other_variables()
    assert "REDIS_URL" in read and "BRIDGEHOOK_HOME" in read, "the scan of the code's reads is broken"
    assert not read - table, f"read by the code, missing from the README's table: {sorted(read - table)}"
    assert not table - read, f"in the README's table, read by nothing: {sorted(table - read)}"


# -- paths, modules, links --------------------------------------------------------------------------


def path_problem(span: str) -> str | None:
    """What is wrong with a repository path in inline code (``service/queue.py``,
    ``tests/test_x.py::test_y``, ``k8s/overlays/*/kustomization.yaml``), or None."""
    if re.search(r"[\s=@<>?#]|://|^/", span) or re.search(r"(?<!:):(?!:)", span):
        return None  # a command, URL, endpoint, key or label: not a path
    if "/" not in span and "::" not in span:
        return None
    file, _, test = span.partition("::")
    first = file.split("/")[0]
    if first in RUNTIME_DIRS:
        return None
    if not (ROOT / first).exists():
        looks_like_file = file.endswith("/") or re.search(r"\.(py|md|ya?ml|toml|txt|json|cfg|sh)$", file)
        return f"{span}: no such path" if looks_like_file else None
    matches = list(ROOT.glob(file.rstrip("/")))
    if not matches:
        return f"{span}: no such path"
    if test and not re.search(rf"^\s*(?:async\s+)?def {re.escape(test)}\(", matches[0].read_text(), re.M):
        return f"{span}: no test {test} in {file}"
    return None


def module_problem(span: str) -> str | None:
    """What is wrong with a dotted name in our packages (``workers.jobs.item_created``), or None."""
    if not re.fullmatch(rf"(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+", span):
        return None
    parts = span.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return f"{span}: {'.'.join(parts[:cut])} has no {'.'.join(parts[cut:])}"
            target = getattr(target, attribute)
        return None
    return f"{span}: no such module"


def test_every_path_and_module_named_exists() -> None:
    problems = []
    for path in (README, *DOCS):
        for span in Doc.read(path).spans():
            problem = path_problem(span) or module_problem(span)
            if problem:
                problems.append(f"{path.relative_to(ROOT)}: {problem}")
    assert not problems, "\n".join(problems)


def test_every_link_resolves() -> None:
    docs: Mapping[Path, Doc] = {p: Doc.read(p) for p in (README, *DOCS)}
    problems = []
    for path, doc in docs.items():
        for link in doc.links():
            if re.match(r"[a-z]+:", link):
                continue  # https:, mailto:
            target, _, anchor = link.partition("#")
            file = (path.parent / target).resolve() if target else path
            if not file.exists():
                problems.append(f"{path.name}: {link}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(docs.get(file) or Doc.read(file)):
                problems.append(f"{path.name}: {link}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_checks_see_what_they_check() -> None:
    """The parsers find what is there, so that the tests above cannot pass by finding nothing."""
    assert path_problem("service/context.py") == "service/context.py: no such path"
    assert path_problem("service/queue.py") is None
    assert path_problem("tests/test_readme.py::test_no_such_test")
    assert module_problem("workers.jobs.no_such_job")
    assert resolve(["no-such-command"])[1] and resolve(["serve", "--no-such-option"])[1]
    assert resolve(["dlq", "replay", "(ID…", "|", "--all)", "[--rate", "R]"]) == (
        Mention(("dlq", "replay"), ["--all", "--rate"]),
        [],
    )
    readme, _ = mentions((README,))
    assert len(readme) >= len([p for p in cli_commands() if len(p) == 1])
    assert len(configuration_table()) >= len(settings_variables())
