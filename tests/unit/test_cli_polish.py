"""The command line's finish, without a gateway: every command's --help has a summary and an
example that parses, every command that prints records takes --json, shell completion works,
and colour and progress appear on a terminal only.

The command tree is walked (`typer.main.get_command`), so a command added later is checked
too; the only exceptions are `EXCEPTIONS`, each with its reason. Examples are parsed by the
command line itself with every callback replaced by a recorder, so nothing runs.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from gateway.cli import app
from gateway.cli.common import Progress, colour_on, print_table

PROGRAM = "gateway"  # the console script, pyproject.toml [project.scripts]

# (command path, check) -> why the check does not apply to that command. Nothing else is exempt.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("gateway serve", "json"): "runs the service until stopped; it prints no records",
    ("gateway devices export", "json"): (
        "writes the devices as a file in the format --format chooses (csv, or jsonl: already "
        "one JSON document a line), to --out or stdout; --json would be a third format"
    ),
}

Command = Any  # typer's vendored click Command (typer._click), which typer does not export


def walk(command: Command, path: str = PROGRAM) -> Iterator[tuple[str, Command]]:
    """Every command of the tree, groups included, as (``gateway devices list``, command)."""
    yield path, command
    if hasattr(command, "list_commands"):  # a group (typer's click is vendored: no click.Group)
        ctx = typer.Context(command, info_name=path)
        for name in command.list_commands(ctx):
            yield from walk(command.get_command(ctx, name), f"{path} {name}")


def runs_itself(command: Command) -> bool:
    """A leaf, or a group whose callback does work when no subcommand is given."""
    return not hasattr(command, "list_commands") or bool(command.invoke_without_command)


def examples(help_text: str) -> list[str]:
    """The command lines in a help text: lines (after ``Example:``) that start with the program
    name, a trailing backslash joining the next line."""
    found: list[str] = []
    pending = ""
    for raw in help_text.splitlines():
        line = pending + raw.strip().removeprefix("Example:").strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith(PROGRAM + " "):
            found.append(line)
    return found


def argv(example: str) -> list[str]:
    """An example's arguments after the program name, up to a redirection or a pipe."""
    words = shlex.split(example)[1:]
    for index, word in enumerate(words):
        if word in ("|", "&&", ";") or word.startswith((">", "<")):
            return words[:index]
    return words


def recorded(root: Command) -> list[str]:
    """Replace every callback of the tree by one that records its command path; the list fills
    as commands are invoked."""
    calls: list[str] = []

    def recorder(path: str) -> Callable[..., None]:
        return lambda **_params: calls.append(path)

    for path, command in walk(root):
        command.callback = recorder(path)
    return calls


def problems(typer_app: typer.Typer) -> list[str]:
    """What the rules find wrong with an app's commands, one line each (empty: all well)."""
    found: list[str] = []
    root = typer.main.get_command(typer_app)
    calls = recorded(root)
    for path, command in walk(root):
        summary = (command.help or "").strip().split("\n\n")[0]
        if not summary or not command.get_short_help_str(limit=200).strip():
            found.append(f"{path}: no help line (first docstring line)")
        elif "\n" in summary:
            found.append(f"{path}: help line runs over lines (end the docstring's first paragraph)")
        if not runs_itself(command):
            continue
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        exempt = (path, "json") in EXCEPTIONS
        if "--json" not in options and not exempt:
            found.append(f"{path}: no --json option (or an entry in EXCEPTIONS with its reason)")
        if "--json" in options and exempt:
            found.append(f"{path}: takes --json now; drop its entry in EXCEPTIONS")
        lines = examples(command.help or "")
        if "Example" not in (command.help or "") or not lines:
            found.append(f"{path}: no example in --help ('Example: {path} ...' in its docstring)")
        for line in lines:
            calls.clear()
            try:
                root.main(argv(line), prog_name=PROGRAM, standalone_mode=False)
            except Exception as exc:  # noqa: BLE001 - any refusal of an example is the finding
                found.append(f"{path}: example {line!r} does not parse: {exc}")
                continue
            if path not in calls:
                found.append(f"{path}: example {line!r} runs {calls[-1] if calls else 'nothing'}")
    return found


def test_every_command_has_help_an_example_and_json() -> None:
    """Every command has a help line; every one that runs has an example of itself that parses
    and a --json option, but for the commands EXCEPTIONS names with a reason."""
    assert problems(app) == []


def test_the_walk_reaches_every_level() -> None:
    """The walk finds top-level commands, subcommands and a group that lists by itself (so that
    an empty walk cannot pass the test above), and every exception names a real command."""
    paths = dict(walk(typer.main.get_command(app)))
    assert {"gateway serve", "gateway devices list", "gateway profiles conformance"} <= set(paths)
    assert runs_itself(paths["gateway connect-failures"])
    assert not runs_itself(paths["gateway devices"])
    assert {path for path, _ in EXCEPTIONS} <= set(paths)


Json = Annotated[bool, typer.Option("--json")]


def test_a_command_without_an_example_or_json_is_found() -> None:
    """A new command with a one-line docstring and no --json fails the rules, and so do an
    example with an option the command lacks, an example of another command, and a help line
    wrapped over two lines."""
    toy = typer.Typer(name=PROGRAM, help="A toy.")

    @toy.command()
    def plain(name: str) -> None:
        """Do something."""

    @toy.command()
    def wrong(name: str, json_out: Json = False) -> None:
        """Do something else.

        Example: gateway wrong pump-1 --colour
        """

    @toy.command()
    def elsewhere(name: str, json_out: Json = False) -> None:
        """Do a third thing.

        Example: gateway plain pump-1
        """

    @toy.command()
    def wordy(name: str, json_out: Json = False) -> None:
        """Do a fourth thing, described at such length that
        the sentence goes on.

        Example: gateway wordy pump-1 --json
        """

    found = problems(toy)
    assert any(p.startswith("gateway plain: no --json") for p in found)
    assert any(p.startswith("gateway plain: no example") for p in found)
    assert any(p.startswith("gateway wrong: example") and "--colour" in p for p in found)
    assert any(p.startswith("gateway elsewhere: example") and "runs gateway plain" in p for p in found)
    assert any(p.startswith("gateway wordy: help line runs over") for p in found)
    assert len(found) == 5, found


def test_examples_are_read_from_help_text() -> None:
    """Example lines are found inline, indented, or continued with a backslash; shell
    redirections are not arguments."""
    text = (
        "Intro.\n\nExample: gateway a --x 1\n\nExamples:\n\n  gateway b > out.json\n\n"
        "  gateway c --long \\\n    --more\n\nthen: other-tool gateway"
    )
    assert examples(text) == ["gateway a --x 1", "gateway b > out.json", "gateway c --long --more"]
    assert argv("gateway b --q 'two words' > out.json") == ["b", "--q", "two words"]


# Shell completion ----------------------------------------------------------------------------


def test_bash_completion_script_names_the_program() -> None:
    """``gateway --show-completion bash`` prints a bash script that completes `gateway` through
    _GATEWAY_COMPLETE."""
    result = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name=PROGRAM)
    assert result.exit_code == 0, result.output
    assert "complete -o default -F _gateway_completion gateway" in result.output
    assert "_GATEWAY_COMPLETE=complete_bash" in result.output


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("gateway dev", "1", "devices"),
        ("gateway devices li", "2", "list"),
        ("gateway profiles c", "2", "conformance"),
    ],
)
def test_completion_proposes_commands(words: str, cword: str, expected: str) -> None:
    """Completing a partial command word proposes the command (what bash's script asks for)."""
    env = {"_GATEWAY_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword}
    result = CliRunner().invoke(app, [], prog_name=PROGRAM, env=env)
    assert result.exit_code == 0, result.output
    assert expected in result.output.split()


def test_installed_console_script_completes() -> None:
    """The installed `gateway` script answers completion under its own name (as the shell runs
    it), so the variable in the printed script is the one it reads."""
    script = shutil.which(PROGRAM, path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the gateway console script is not installed next to this Python")
    env = {
        **os.environ,
        "_GATEWAY_COMPLETE": "complete_bash",
        "COMP_WORDS": "gateway dev",
        "COMP_CWORD": "1",
    }
    done = subprocess.run([script], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["devices"]


# Colour and progress -------------------------------------------------------------------------


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def colour_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment where only the stream decides: NO_COLOR unset, an ordinary TERM."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    return monkeypatch


def test_colour_only_on_a_terminal(colour_env: pytest.MonkeyPatch) -> None:
    """Colour on a terminal; never on a pipe or file."""
    assert colour_on(Terminal()) is True
    assert colour_on(io.StringIO()) is False


def test_no_color_and_dumb_terminal_turn_colour_off(colour_env: pytest.MonkeyPatch) -> None:
    """NO_COLOR (any non-empty value) or TERM=dumb turn colour off even on a terminal."""
    colour_env.setenv("NO_COLOR", "1")
    assert colour_on(Terminal()) is False
    colour_env.delenv("NO_COLOR")
    colour_env.setenv("TERM", "dumb")
    assert colour_on(Terminal()) is False


def test_table_coloured_on_a_terminal_plain_when_piped(colour_env: pytest.MonkeyPatch) -> None:
    """A status cell is coloured on a terminal; piped, the same table has no escape at all."""
    rows = [{"id": "pump-1", "status": "revoked"}]
    columns = [("id", "ID"), ("status", "STATUS")]
    terminal = Terminal()
    colour_env.setattr(sys, "stdout", terminal)
    print_table(rows, columns)
    assert "\x1b[31mrevoked" in terminal.getvalue()  # red, CELL_STYLES

    pipe = io.StringIO()
    colour_env.setattr(sys, "stdout", pipe)
    print_table(rows, columns)
    assert "\x1b" not in pipe.getvalue()
    assert pipe.getvalue() == "ID      STATUS\npump-1  revoked\n"


def test_progress_only_on_a_terminal() -> None:
    """Progress writes nothing to a pipe; on a terminal it redraws one line and ends it."""
    pipe = io.StringIO()
    progress = Progress(pipe)
    progress.show("listed 1000/3000 devices")
    progress.done()
    assert pipe.getvalue() == ""

    terminal = Terminal()
    progress = Progress(terminal)
    progress.show("listed 1000/3000 devices")
    progress.show("listed 2000/3000 devices")
    progress.done()
    assert terminal.getvalue() == ("\r\x1b[Klisted 1000/3000 devices\r\x1b[Klisted 2000/3000 devices\n")
