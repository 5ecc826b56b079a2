"""The docs stay true: links and anchors resolve, shown commands parse with their CLI's own parser (and their
config files pass the schema), make targets exist, Python examples compile, YAML examples are valid run configs,
the config reference equals the schema's. Covers README.md, docs/*.md, docs/study/README.md and
benchmarks/RESULTS.md."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from speeder_rt.train.config import RunConfig, load_run_config, run_config_from_dict
from speeder_rt.train.config_reference import COMMAND, anchor, render
from speeder_rt.train.config_reference import main as config_reference_main
from speeder_rt.utils.schema import schema_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docs" / "study" / "README.md",
        ROOT / "benchmarks" / "RESULTS.md"]
SHELL_LANGS = {"bash", "shell", "sh", "console"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target>[^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*#*\s*$")
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|root|tmp|mnt|scratch)/")
REPO_PATH = re.compile(r"^(?:configs|benchmarks|tests|examples|docs|csrc|include)/[\w./-]+$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_blocks(text: str) -> tuple[list[tuple[int, str]], list[tuple[str, int, str]]]:
    """(prose lines with their numbers, fenced blocks as (language, first line number, body))."""
    prose: list[tuple[int, str]] = []
    blocks: list[tuple[str, int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, start, body = m.group("fence"), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m.group("indent")):])
            i += 1
        blocks.append((m.group("lang").lower(), start, "\n".join(body)))
        i += 1
    return prose, blocks


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (a repeated heading gets -1, -2, ...)."""
    prose, _ = split_blocks(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group("text")).replace("`", "").replace("*", "")
        slug = anchor(text)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def _prose_without_code(line: str) -> str:
    return re.sub(r"`[^`]*`", "", line)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_links_and_anchors_resolve(doc: Path) -> None:
    prose, _ = split_blocks(doc.read_text(encoding="utf-8"))
    broken = []
    for number, line in prose:
        for m in LINK.finditer(_prose_without_code(line)):
            target = m.group("target")
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            resolved = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{_rel(doc)}:{number}: {target}"
            if not resolved.is_relative_to(ROOT):
                broken.append(f"{where}: outside the repository")
            elif not resolved.exists():
                broken.append(f"{where}: no such file")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                broken.append(f"{where}: no heading with anchor #{fragment} in {_rel(resolved)}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_no_machine_paths(doc: Path) -> None:
    hits = [f"{_rel(doc)}:{n}: {line.strip()}" for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
            if MACHINE_PATH.search(line) or "../shared" in line]
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def shell_commands() -> list[tuple[str, list[str]]]:
    """Every command line of the shell blocks: (doc:line, words), continuation lines joined, comments and a
    console prompt dropped; a line that shlex cannot split is a failure of its own."""
    out = []
    for doc in DOCS:
        _, blocks = split_blocks(doc.read_text(encoding="utf-8"))
        for lang, start, body in blocks:
            if lang not in SHELL_LANGS:
                continue
            logical, first = "", 0
            for offset, line in enumerate(body.splitlines()):
                if lang == "console":
                    if not line.startswith("$ ") and not logical:
                        continue  # the command's output
                    line = line.removeprefix("$ ")
                if not logical:
                    first = start + 1 + offset
                if line.rstrip().endswith("\\"):
                    logical += line.rstrip()[:-1] + " "
                    continue
                logical += line
                if logical.strip():
                    lexer = shlex.shlex(logical, posix=True, punctuation_chars=True)
                    lexer.whitespace_split, lexer.commenters = True, "#"
                    words = list(lexer)
                    if words:  # not a comment line
                        out.append((f"{_rel(doc)}:{first}", words))
                logical = ""
    return out


COMMANDS = shell_commands()
OPERATORS = re.compile(r"^[|&;<>()]+$")


def module_invocations() -> list[tuple[str, str, list[str]]]:
    """``(doc:line, module, args)`` for every ``-m speeder_rt.X ...`` (python, torchrun) in a shell block."""
    found = []
    for where, words in COMMANDS:
        for i, word in enumerate(words[:-1]):
            if word == "-m" and words[i + 1].startswith("speeder_rt"):
                args = []
                for arg in words[i + 2:]:
                    if OPERATORS.match(arg):
                        break
                    args.append(arg)
                found.append((where, words[i + 1], args))
    return found


INVOCATIONS = module_invocations()


def test_docs_show_commands() -> None:
    """The extraction works (a wrong fence pattern would make every command test vacuous)."""
    modules = {module for _, module, _ in INVOCATIONS}
    assert {"speeder_rt.train", "speeder_rt.eval", "speeder_rt.export", "speeder_rt.serve", "speeder_rt.study",
            "speeder_rt.demo"} <= modules, modules


def build_parser(module: str):
    imported = importlib.import_module(module)
    if hasattr(imported, "__path__"):  # a package: its __main__
        imported = importlib.import_module(module + ".__main__")
    assert hasattr(imported, "build_parser"), f"{module} exposes no build_parser() for its command line"
    return imported.build_parser()


@pytest.mark.parametrize("where,module,args", INVOCATIONS, ids=[w for w, _, _ in INVOCATIONS])
def test_command_parses(where: str, module: str, args: list[str]) -> None:
    parser = build_parser(module)
    try:
        parsed = parser.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: python -m {module} {shlex.join(args)}: the parser refused it (exit {e.code})")
    config = getattr(parsed, "config", None)
    if isinstance(config, str) and (ROOT / config).is_file():
        load_run_config(ROOT / config)  # the shown config passes the schema


def test_shown_repository_files_exist() -> None:
    missing = [f"{where}: {word}" for where, words in COMMANDS for word in words
               if REPO_PATH.match(word) and not any(c in word for c in "*?{") and not (ROOT / word).exists()]
    assert not missing, "commands name files that are not in the repository:\n" + "\n".join(missing)


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {name for line in text.splitlines() if (m := re.match(r"^([\w.-]+)\s*:(?!=)", line))
            for name in [m.group(1)]}


def test_make_targets_exist() -> None:
    targets = make_targets()
    shown = [(where, word) for where, words in COMMANDS if words[0] == "make"
             for word in words[1:] if "=" not in word and not word.startswith("-")]
    assert shown, "no make command found in the docs"
    unknown = [f"{where}: make {target}" for where, target in shown if target not in targets]
    assert not unknown, f"targets not in the Makefile ({sorted(targets)}):\n" + "\n".join(unknown)


def test_python_examples_compile() -> None:
    for doc in DOCS:
        _, blocks = split_blocks(doc.read_text(encoding="utf-8"))
        for lang, start, body in blocks:
            if lang == "python":
                compile(body, f"{_rel(doc)}:{start}", "exec")


def test_yaml_examples_are_run_configs() -> None:
    shown = 0
    for doc in DOCS:
        _, blocks = split_blocks(doc.read_text(encoding="utf-8"))
        for lang, start, body in blocks:
            if lang in ("yaml", "yml"):
                run_config_from_dict(yaml.safe_load(body), f"{_rel(doc)}:{start}")
                shown += 1
    assert shown, "no YAML example found in the docs"


def test_config_reference_is_generated(tmp_path: Path) -> None:
    """The shown command, run: its output equals docs/config_reference.md."""
    out = tmp_path / "config_reference.md"
    assert config_reference_main(["--out", str(out)]) == 0
    written = (ROOT / "docs" / "config_reference.md").read_text(encoding="utf-8")
    assert written == out.read_text(encoding="utf-8") == render(), (
        f"docs/config_reference.md differs from the schema: run `{COMMAND}`")


def test_config_reference_keys_and_defaults_are_the_schemas() -> None:
    """Each documented key (outside the mpo list) set to its documented default is accepted and read back."""
    checked = 0
    for section in schema_reference(RunConfig, RunConfig()):
        for key in section.keys:
            if key.section or "[i]" in key.path:
                continue
            *parents, name = key.path.split(".")
            raw: dict = {}
            node = raw
            for parent in parents:
                node = node.setdefault(parent, {})
            node[name] = key.default
            value = run_config_from_dict(raw, "reference")
            for part in key.path.split("."):
                value = value[part] if isinstance(value, dict) else getattr(value, part)
            assert value == key.default, key.path
            checked += 1
    assert checked > 50, checked
