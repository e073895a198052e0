"""Every command that README.md and docs/RESULTS.md quote is parsed by the current CLI's own argparse parser.

A renamed or removed flag (or script) then fails here, naming the doc line, instead of leaving a dead command in the
docs. Checked: lines of fenced code blocks and inline `code` spans that run a console script of pyproject.toml
(`vla-...`, also as `.venv/bin/vla-...`) or `python <repo file>.py` (`benchmarks/*.py`, `space_app/app.py`); each
such module exposes `build_parser()`. Nothing is run. docs/experiments/ is history (commands as they ran on their
date) and is not checked.

Placeholders: `<a|b>` becomes `a`, any other `<name>` becomes `1`, `x|y|z` becomes `x`, `[optional]` brackets are
dropped, and `...` stands for "more arguments" (the command is then checked as a fragment, like an inline span:
required arguments may be missing, but every flag given must exist and take the values given; an inline span may
end with a bare flag, which names it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/RESULTS.md")
PYTHONS = ("python", "python3")


@dataclass(frozen=True)
class DocCommand:
    where: str  # "README.md:42"
    text: str  # the command as quoted
    whole: bool  # a line of a code block (all required arguments given) rather than an inline fragment


def console_scripts() -> dict[str, str]:
    """Console script name -> "module:function", from pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def quoted_commands(markdown: str, name: str) -> list[DocCommand]:
    """Candidate commands: each line of a fenced code block (split at `&&` / `;`) and each inline code span."""
    found, fenced = [], False
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        where = f"{name}:{number}"
        if fenced:
            found += [DocCommand(where, part.strip(), True) for part in re.split(r"&&|;", line) if part.strip()]
        else:
            table = line.lstrip().startswith("|")
            for span in re.findall(r"`([^`]+)`", line):
                found.append(DocCommand(where, span.replace("\\|", "|") if table else span, False))
    return found


def resolve(words: list[str], scripts: dict[str, str]) -> tuple[str, list[str]] | None:
    """(what runs: a console script name or a repo-relative .py path, its arguments), or None if not a project CLI."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1] if "/bin/" in words[0] else words[0]
    if program in scripts:
        return program, words[1:]
    if program in PYTHONS and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:]
    return None


def fill_placeholders(words: list[str]) -> tuple[list[str], bool]:
    """Doc placeholders -> parseable arguments; also whether the command elides arguments (`...`)."""
    out, elided = [], False
    for word in words:
        if word.startswith("["):
            word = word[1:]
        if word.endswith("]") and "[" not in word:
            word = word[:-1]
        word = re.sub(r"<([^<>]*)>", lambda m: m.group(1).split("|")[0] if "|" in m.group(1) else "1", word)
        if "|" in word:
            word = word.split("|")[0]
        if word in ("...", "…", ""):
            elided = True
            continue
        out.append(word)
    return out, elided


@functools.cache
def script_module(path: Path) -> ModuleType:
    """A `python <file>.py` script imported as a module (its `if __name__ == "__main__"` part does not run)."""
    spec = importlib.util.spec_from_file_location(f"docs_cli_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def load_parser(program: str, scripts: dict[str, str]) -> argparse.ArgumentParser:
    """A fresh copy of the CLI's own parser, from its module's build_parser(); AssertionError naming what is missing."""
    if program in scripts:
        module = importlib.import_module(scripts[program].split(":")[0])
    else:
        assert (REPO / program).is_file(), f"no such script {program}"
        module = script_module(REPO / program)
    assert hasattr(module, "build_parser"), f"{program}: its module has no build_parser() to check commands with"
    return module.build_parser()


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A CLI's subcommands (`vla-generate demos|play|...`), by name; empty for a CLI without them."""
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [parser, *(p for sub in subparsers(parser).values() for p in every_parser(sub))]


def chosen_parser(parser: argparse.ArgumentParser, args: list[str]) -> argparse.ArgumentParser:
    """The parser that reads the flags of `args`: the subcommand's, when args name one."""
    chosen = next((subparsers(parser)[a] for a in args if a in subparsers(parser)), None)
    return parser if chosen is None else chosen_parser(chosen, args)


def optional_everything(parser: argparse.ArgumentParser) -> None:
    """A fragment may leave out required arguments: only the flags it does give are checked."""
    for one in every_parser(parser):
        for action in one._actions:
            action.required = False
            if action.nargs in (None, argparse.ONE_OR_MORE) and not action.option_strings:
                action.nargs = argparse.ZERO_OR_MORE if action.nargs == argparse.ONE_OR_MORE else argparse.OPTIONAL
        for group in one._mutually_exclusive_groups:
            group.required = False


def check(command: DocCommand, scripts: dict[str, str]) -> str | None:
    """None if `command` parses; else a one-line failure naming the doc line. Only for project CLIs (`resolve`)."""
    program, args = resolve(shlex.split(command.text, comments=True), scripts)
    args, elided = fill_placeholders(args)
    try:
        parser = load_parser(program, scripts)
    except AssertionError as e:
        return f"{command.where}: `{command.text}`: {e}"
    for one in every_parser(parser):
        one.allow_abbrev = False  # a doc must spell flags out: `--out` passing as `--output-dir` hides a rename
    if elided or not command.whole:
        optional_everything(parser)
        mentioned = chosen_parser(parser, args)._option_string_actions.get(args[-1]) if args else None
        if not command.whole and mentioned is not None and mentioned.nargs != 0:
            args = args[:-1]  # prose naming a flag (`vla-rollout --policy`): that it exists is the check
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()
        return f"{command.where}: `{command.text}`: {message[-1] if message else 'argparse refused it'}"
    return None


def is_project_command(command: DocCommand, scripts: dict[str, str]) -> bool:
    try:
        return resolve(shlex.split(command.text, comments=True), scripts) is not None
    except ValueError:  # unbalanced quotes: prose in backticks, not a command
        return False


def failures(markdown: str, name: str) -> tuple[list[str], int]:
    """(failures, number of project commands checked) for one markdown text."""
    scripts = console_scripts()
    commands = [c for c in quoted_commands(markdown, name) if is_project_command(c, scripts)]
    return [p for c in commands if (p := check(c, scripts))], len(commands)


@pytest.mark.parametrize("doc", DOCS)
def test_every_quoted_command_parses_with_the_current_cli(doc: str) -> None:
    problems, checked = failures((REPO / doc).read_text(), doc)
    assert not problems, "commands in the docs that the CLIs no longer accept:\n" + "\n".join(problems)
    assert checked >= 10, f"{doc}: only {checked} project commands found: is the extraction broken?"


def test_a_bogus_flag_fails_naming_the_doc_line() -> None:
    doc = "\n".join([
        "# Title",
        "```",
        "vla-train --model mlp --config configs/mlp_bc.yaml --bogus-flag 1",
        "```",
        "| command | what |",
        "| --- | --- |",
        "| `python benchmarks/evaluate.py --vla V --no-such-option` | x |",
        "and inline `.venv/bin/vla-rollout --policy DIR --env dreamland` too.",
    ])
    problems, checked = failures(doc, "DOC.md")
    assert checked == 3
    assert [p.split(":")[0] + ":" + p.split(":")[1] for p in problems] == ["DOC.md:3", "DOC.md:7", "DOC.md:8"]
    assert "--bogus-flag" in problems[0] and "--no-such-option" in problems[1] and "dreamland" in problems[2]


def test_placeholders_become_arguments_and_are_still_checked() -> None:
    good = "\n".join([
        "```",
        "vla-rollout --policy runs/<mlp_bc_s0|mlp_s0>/best --world-model DIR [DIR ...] --env dream\\|real --seed <k>",
        "vla-pool-world-models --inputs runs/wm_s0/best ... runs/wm_s9/best --out runs/wm_pool10/best",
        "HF_DATASETS_CACHE=x .venv/bin/vla-preprocess --inputs data/raw --out data/hf   # a comment --not-a-flag",
        "bash scripts/setup.sh && .venv/bin/vla-pipeline [--quick|--full]",
        "```",
        "| `vla-train --model world\\|policy\\|mlp --config configs/<x>.yaml` | inline, in a table |",
        "`vla-generate play ... --out data/raw_play --perturb-prob 0.05` and `vla-rollout --video`: fragments",
        "prose naming a subcommand's flag: `vla-generate dagger --handover-on-stall`, `vla-generate rollouts --policy`",
        "prose naming a flag: what `vla-rollout --policy` accepts",
    ])
    problems, checked = failures(good, "GOOD.md")
    assert not problems and checked == 10
    bad = "\n".join([
        "```",
        "vla-rollout --policy P --env <heaven|dream>",  # the first alternative is what is checked
        "vla-preprocess --out data/hf",  # a whole command that misses a required flag
        "vla-train ... --seed <k>",  # elided, but --seed is no vla-train flag
        "python benchmarks/no_such_benchmark.py --x 1",
        "vla-train --config c.yaml --out runs/x",  # an abbreviation of --output-dir: a doc spells flags out
        "vla-generate --tasks lift --out data/raw",  # no subcommand
        "vla-generate rollouts --tasks lift --policy p --handover-steps 5",  # a dagger flag
        "```",
        "and `vla-rollout --polcy` in prose, `vla-generate play ... --max-attempts 3` in a fragment",
    ])
    problems, checked = failures(bad, "BAD.md")
    assert checked == 9 and len(problems) == 9
    assert "heaven" in problems[0] and "--inputs" in problems[1] and "--seed" in problems[2]
    assert "no such script benchmarks/no_such_benchmark.py" in problems[3]
    assert "--out" in problems[4] and "invalid choice: 'lift'" in problems[5]
    assert "--handover-steps" in problems[6] and "--polcy" in problems[7] and "--max-attempts" in problems[8]


def test_every_cli_exposes_its_parser() -> None:
    """So any of them can be quoted in the docs and checked here."""
    scripts = console_scripts()
    benchmarks = [*(REPO / "benchmarks").glob("*.py"), *(REPO / "benchmarks" / "diagnostics").glob("*.py")]
    programs = list(scripts) + [str(p.relative_to(REPO)) for p in sorted(benchmarks)]
    programs.append("space_app/app.py")
    for program in programs:
        assert isinstance(load_parser(program, scripts), argparse.ArgumentParser), program
