"""The docs stay true to the code: docs/cli.md against the argument parser, README.md short, every
relative link pointing at a file (and heading), every `onnxq ...` command naming real options."""

import argparse
import re
from pathlib import Path

import pytest

from onnxq.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "cli.md"
README_LIMIT = 12 * 1024

HEADING = re.compile(r"^(#{1,6}) (.*)$")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LONG_OPTION = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
FENCED = re.compile(r"```[a-z]*\n(.*?)```", flags=re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands(parser=None, path=("onnxq",)) -> dict[str, argparse.ArgumentParser]:
    """Every command path ("onnxq", "onnxq quantize", "onnxq zoo export", ...) and its parser."""
    parser = parser or build_parser()
    found = {" ".join(path): parser}
    for name, sub in _subparsers(parser).items():
        found.update(_commands(sub, path + (name,)))
    return found


def _long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _sections(text: str) -> dict[str, str]:
    """`## onnxq quantize`-style sections of cli.md: a section runs to the next heading of its
    level or above, or to the next command heading at any level."""
    lines = text.splitlines()
    starts = []
    for i, line in enumerate(lines):
        m = HEADING.match(line)
        if m:
            starts.append((i, len(m.group(1)), m.group(2).strip().strip("`")))
    sections = {}
    for k, (i, level, title) in enumerate(starts):
        if not re.fullmatch(r"onnxq( [a-z][\w-]*)*", title):
            continue
        end = len(lines)
        for j, other_level, other_title in starts[k + 1:]:
            if other_level <= level or other_title.startswith("onnxq"):
                end = j
                break
        assert title not in sections, f"docs/cli.md has two sections {title!r}"
        sections[title] = "\n".join(lines[i + 1:end])
    return sections


def _option_spans(text: str):
    """(line, options) for every code span that starts with '-': the spans that document options."""
    for line in text.splitlines():
        for span in CODE_SPAN.findall(line):
            if span.startswith("-"):
                yield line, LONG_OPTION.findall(span.replace("\\|", "|"))


def _commands_in(text: str):
    """Every `onnxq <subcommand> ...` written in the text, in code spans or code blocks
    (continuation lines of a block belong to the command above them)."""
    prose = re.sub(FENCED, "", text)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose) if s.startswith("onnxq ")]
    for block in re.findall(FENCED, text):
        current = None
        for line in block.splitlines():
            if line.startswith("onnxq "):
                if current:
                    spans.append(current)
                current = line
            elif current and line.startswith(" "):
                current += " " + line
            else:
                if current:
                    spans.append(current)
                current = None
        if current:
            spans.append(current)
    return spans


def _resolve(words, commands):
    """The longest command path the words start with, and the words after it."""
    path = "onnxq"
    for k, word in enumerate(words[1:], start=1):
        if f"{path} {word}" not in commands:
            return path, words[k:]
        path = f"{path} {word}"
    return path, []


@pytest.fixture(scope="module")
def cli_sections():
    return _sections(CLI_MD.read_text(encoding="utf-8"))


def test_every_command_has_a_section(cli_sections):
    missing = sorted(set(_commands()) - set(cli_sections))
    assert not missing, f"docs/cli.md has no section for {missing} (add a '## <command>' heading)"
    unknown = sorted(set(cli_sections) - set(_commands()))
    assert not unknown, f"docs/cli.md documents commands the parser does not have: {unknown}"


@pytest.mark.parametrize("command", sorted(_commands()))
def test_section_documents_exactly_the_parsers_options(cli_sections, command):
    parser = _commands()[command]
    section = cli_sections.get(command, "")
    written = {opt for _, opts in _option_spans(section) for opt in opts} - {"--help"}
    options = set(_long_options(parser))
    missing, unknown = sorted(options - written), sorted(written - options)
    assert not missing, f"{command}: options missing from its section of docs/cli.md: {missing}"
    assert not unknown, f"{command}: docs/cli.md names options its parser does not have: {unknown}"


@pytest.mark.parametrize("command", sorted(_commands()))
def test_option_rows_show_defaults_and_choices(cli_sections, command):
    rows = list(_option_spans(cli_sections.get(command, "")))
    for option, action in _long_options(_commands()[command]).items():
        row = next((line for line, opts in rows if option in opts), "")
        if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
            assert str(action.default) in row, f"{command} {option}: its default {action.default!r} is not in its row"
        for choice in action.choices or ():
            assert str(choice) in row, f"{command} {option}: choice {choice!r} is not in its row"


def test_commands_in_the_docs_use_real_options():
    commands = _commands()
    wrong = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for cmd in _commands_in(doc.read_text(encoding="utf-8")):
            path, rest = _resolve(cmd.split(), commands)
            known = _long_options(commands[path])
            wrong += [f"{doc.name}: `{path} {opt}`" for opt in LONG_OPTION.findall(" ".join(rest)) if opt not in known]
    assert not wrong, "options that do not exist: " + "; ".join(wrong)


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move reference text into docs/"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces to '-'."""
    seen, anchors = {}, set()
    for title in re.findall(r"^#{1,6} (.*)$", re.sub(FENCED, "", page.read_text(encoding="utf-8")), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("doc", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_point_to_files(doc):
    source = ROOT / doc
    broken = []
    for target in LINK.findall(source.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        page = source.parent / path if path else source
        if not page.exists() or (anchor and page.suffix == ".md" and anchor not in _anchors(page)):
            broken.append(target)
    assert not broken, f"{doc} links to missing files or headings: {broken}"
