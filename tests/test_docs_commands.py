"""What README.md and docs/ show is what the code does: every command parses, runs somewhere, every link lands.

The commands come from the fenced code blocks. `vae ...` lines are parsed by the real command line (an unknown
option, a missing argument or a bad value fails here) without running them; `make` targets, `python -m`
modules, `python FILE` scripts and pip extras must exist. A command's *form* is its subcommand with the
arguments and options it gives, e.g. "generate --n --out --run"; each documented form must be one that
`make demo` runs or one listed in RUN_BY with the test that runs it, so a newly documented command fails here
until something runs it. Nothing here trains or runs a command.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import typer.main

from vaecli.cli.app import app

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Documented ahead of the change that adds it: while what an entry names is missing, its checks are skipped
# with this reason; as soon as it exists it is checked like everything else.
AWAITED: dict[str, str] = {}

# Documented forms that no test runs yet, with why: skipped with the reason (pytest -ra lists them).
NOT_RUN_YET: dict[str, str] = {}

# Each documented form that `make demo` does not run: (the test file, the test that runs it).
RUN_BY = {
    "curves --out --run": (
        "tests/test_curves_tensorboard.py",
        "test_vae_curves_draws_the_same_bytes_twice_and_follows_the_metrics",
    ),
    "curves --run": (
        "tests/test_curves_tensorboard.py",
        "test_vae_curves_draws_the_same_bytes_twice_and_follows_the_metrics",
    ),
    "evaluate --checkpoint --json --k --run --split": (
        "tests/test_resume.py",
        "test_best_and_latest_checkpoints_and_evaluate",
    ),
    "evaluate --images --k --run": ("tests/test_evaluate.py", "test_the_table_names_every_figure"),
    "export RUN --checkpoint --out": (
        "tests/test_export.py",
        "test_the_exported_file_generates_what_vae_generate_does_without_vaecli",
    ),
    "generate --n --out --run --seed": (
        "tests/test_inference_devices.py",
        "test_four_devices_generate_and_reconstruct_what_one_does",
    ),
    "generate --n --out --run --seed --temperature": (
        "tests/test_samplers.py",
        "test_the_prior_stays_the_default_with_the_same_bytes",
    ),
    "generate --n --out --temperature": ("tests/test_cli.py", "test_generate_from_the_newest_run_is_deterministic"),
    "interpolate FIRST SECOND --out --run --spherical --steps": (
        "tests/test_latent_commands.py",
        "test_interpolate_writes_one_row_with_the_inputs_at_the_ends",
    ),
    "interpolate FIRST SECOND --out --run --steps": (
        "tests/test_latent_commands.py",
        "test_interpolate_writes_one_row_with_the_inputs_at_the_ends",
    ),
    "latent --images --out --run": (
        "tests/test_latent_commands.py",
        "test_latent_draws_the_codes_on_their_principal_axes_the_same_every_time",
    ),
    "latent --out --run --split": (
        "tests/test_latent_commands.py",
        "test_a_two_dimensional_latent_gets_the_decoded_manifold_beside_its_codes",
    ),
    "reconstruct --run": ("tests/test_cli.py", "test_reconstruct_test_images_and_user_files"),
    "reconstruct INPUTS --mean --out --samples": ("tests/test_cli.py", "test_reconstruct_test_images_and_user_files"),
    "reconstruct INPUTS --out --run": ("tests/test_bad_input.py", "test_an_existing_output_is_replaced_whole"),
    "reconstruct INPUTS --out --samples": ("tests/test_cli.py", "test_reconstruct_test_images_and_user_files"),
    "train --config --coordinator --num-processes --out --process-id": (
        "tests/test_multiprocess.py",
        "test_two_processes_train_as_one_process_with_two_devices_and_resume_in_one",
    ),
    "train --config --out": (
        "tests/test_multiprocess.py",
        "test_two_processes_train_as_one_process_with_two_devices_and_resume_in_one",
    ),
    "train --config --out --set": ("tests/test_resume.py", "test_best_and_latest_checkpoints_and_evaluate"),
    "train --config --set": ("tests/test_folder_cli.py", "test_train_generate_reconstruct_on_an_image_folder"),
    "train --resume": ("tests/test_resume.py", "test_sigkill_during_a_save_then_resume_gives_bit_identical_weights"),
    "train --resume --set": ("tests/test_resume.py", "test_resume_refuses_changes_that_would_alter_the_run"),
}


@dataclass(frozen=True)
class Command:
    """One documented command line: where it is shown, and its words as a shell splits them."""

    where: str
    words: tuple[str, ...]

    @property
    def program(self) -> str:
        return Path(self.words[0]).name

    @property
    def line(self) -> str:
        return shlex.join(self.words)


# ---- reading the documents ----------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
NOT_SHELL = {"yaml", "yml", "json", "toml", "python", "py"}
ENVIRONMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
LAUNCHERS = {"srun", "mpirun"}
PROGRAMS = {"vae", "make", "python", "python3", "pip"}


def split_fences(path: Path) -> tuple[list[tuple[int, str]], str]:
    """(the numbered lines inside shell-like fenced blocks, the text outside every fenced block)."""
    inside, outside, fence, shell = [], [], None, False
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        opening = FENCE.match(text)
        if fence is None and opening:
            fence, shell = opening.group(1), opening.group(2).lower() not in NOT_SHELL
        elif fence is not None and text.strip().startswith(fence):
            fence = None
        elif fence is not None:
            if shell:
                inside.append((number, text))
            continue
        outside.append(text if fence is None and not opening else "")
    return inside, "\n".join(outside)


def command_words(text: str) -> tuple[str, ...] | None:
    """The words of a command line (prompt, environment and launcher left out), or None when it runs none of
    PROGRAMS (output, a comment, a file listing)."""
    text = text.strip().removeprefix("$ ")
    first_words = text.split()
    while first_words and (ENVIRONMENT.match(first_words[0]) or first_words[0] in LAUNCHERS):
        first_words.pop(0)
    if not first_words or Path(first_words[0]).name not in PROGRAMS:
        return None
    words = shlex.split(text, comments=True)
    while ENVIRONMENT.match(words[0]) or words[0] in LAUNCHERS:
        words.pop(0)
    return tuple(words)


def documented_commands() -> list[Command]:
    commands = []
    for path in DOCUMENTS:
        joined: list[tuple[int, str]] = []
        for number, text in split_fences(path)[0]:
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + text.strip())
            else:
                joined.append((number, text))
        for number, text in joined:
            words = command_words(text)
            if words:
                commands.append(Command(f"{path.relative_to(REPO)}:{number}", words))
    return commands


def demo_commands() -> list[Command]:
    """The `vae` lines of the Makefile's demo recipe, its variables filled in."""
    makefile = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*?)\s*$", makefile, flags=re.MULTILINE))
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert recipe, "the Makefile has no demo recipe"
    commands = []
    for text in recipe.group(1).splitlines():
        filled = re.sub(r"\$\((\w+)\)", lambda match: variables[match.group(1)], text.strip())
        words = command_words(filled)
        if words and Path(words[0]).name == "vae":
            commands.append(Command("Makefile demo", words))
    return commands


# ---- parsing a `vae` command without running it -----------------------------------------------------------


@cache
def vae_group():
    return typer.main.get_command(app)


def form_of(command: Command) -> str:
    """Parse `command` with the real `vae` command line and return its form, e.g. "generate --n --out --run".

    Fails the test when `vae` would refuse it before running anything: an unknown command or option, a missing
    argument, a value of the wrong type, or a synopsis ([--option], a|b, ...) shown as a command.
    """
    synopsis = [word for word in command.words if word.startswith(("[", "<")) or word in ("|", "...")]
    assert not synopsis, f"{command.where}: `{command.line}` is a synopsis, not a command: show a real command"
    assert len(command.words) > 1, f"{command.where}: `{command.line}` names no command"
    name, *arguments = command.words[1:]
    subcommand = vae_group().commands.get(name)
    if subcommand is None and f"vae {name}" in AWAITED:
        pytest.skip(f"{command.where}: {AWAITED[f'vae {name}']}")
    assert subcommand is not None, f"{command.where}: `{command.line}`: vae has no command {name!r}"
    try:
        context = subcommand.make_context(name, list(arguments), resilient_parsing=False)
    except Exception as error:  # Click's usage errors, with the message `vae` itself would print
        message = error.format_message() if hasattr(error, "format_message") else repr(error)
        pytest.fail(f"{command.where}: `{command.line}` is refused: {message}")
    given = [param for param in subcommand.params if context.get_parameter_source(param.name).name == "COMMANDLINE"]
    arguments_given = [param.name.upper() for param in given if not param.opts[0].startswith("-")]
    options_given = sorted(max(param.opts, key=len) for param in given if param.opts[0].startswith("-"))
    return " ".join([name, *arguments_given, *options_given])


@cache
def demo_forms() -> frozenset[str]:
    return frozenset(form_of(command) for command in demo_commands())


@cache
def functions_in(file_name: str) -> dict[str, str]:
    """The top-level functions of a test file by name, each with its source (decorators included)."""
    source = (REPO / file_name).read_text()
    lines = source.splitlines()
    return {
        node.name: "\n".join(lines[min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1 : node.end_lineno])
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef)
    }


# ---- commands in fenced blocks -----------------------------------------------------------------------------

COMMANDS = documented_commands()


def shown(program: str) -> list:
    chosen = [command for command in COMMANDS if command.program.startswith(program)]
    return [pytest.param(command, id=f"{command.where} {command.line}") for command in chosen]


def test_the_documents_show_their_commands():
    """The collector finds the README's commands (a change in how fences are written would otherwise pass)."""
    in_readme = {command.line for command in COMMANDS if command.where.startswith("README.md:")}
    assert {"make demo", "make test"} <= in_readme
    assert len([line for line in in_readme if line.startswith("vae ")]) >= 10


@pytest.mark.parametrize("command", shown("vae"))
def test_each_documented_vae_command_parses(command: Command):
    """form_of parses the command with the real command line, failing the test on anything `vae` would refuse."""
    assert form_of(command).split()[0] == command.words[1]


@pytest.mark.parametrize("command", shown("vae"))
def test_each_documented_vae_command_form_is_run_by_make_demo_or_a_test(command: Command):
    form = form_of(command)
    if form in NOT_RUN_YET:
        pytest.skip(f"{command.where}: `{form}` is run by no test yet: {NOT_RUN_YET[form]}")
    assert form in demo_forms() or form in RUN_BY, (
        f"{command.where}: `{command.line}` (form `{form}`) is run neither by make demo nor by a test in RUN_BY: "
        "show a form that is run, or add the test that runs it to RUN_BY"
    )


def exists(command_name: str) -> bool:
    return command_name in vae_group().commands


def test_the_tables_of_forms_hold_documented_forms_only_once():
    documented = {form_of(command) for command in COMMANDS if command.program == "vae" and exists(command.words[1])}
    listed = set(RUN_BY) | {form for form in NOT_RUN_YET if exists(form.split()[0])}
    assert listed <= documented, f"forms no document shows any more: {sorted(listed - documented)}"
    assert not set(RUN_BY) & set(NOT_RUN_YET), f"run by a test now: {sorted(set(RUN_BY) & set(NOT_RUN_YET))}"
    assert not listed & demo_forms(), f"make demo runs these already: {sorted(listed & demo_forms())}"


@pytest.mark.parametrize(("form", "runner"), sorted(RUN_BY.items()))
def test_the_test_named_for_each_form_exists_and_gives_its_options(form: str, runner: tuple[str, str]):
    """A wrong entry would make a form look run: the test must exist, and its file name the command and each
    option of the form (options are often given by a fixture or a helper, so the file, not the function)."""
    file_name, test_name = runner
    assert (REPO / file_name).is_file(), f"RUN_BY[{form!r}]: no file {file_name}"
    assert test_name.startswith("test_") and test_name in functions_in(file_name), f"no {file_name}::{test_name}"
    source = (REPO / file_name).read_text()
    name, *rest = form.split()
    for word in [name, *(word for word in rest if word.startswith("--"))]:
        assert f'"{word}"' in source, f"RUN_BY[{form!r}]: {file_name} never gives {word!r}"


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), flags=re.MULTILINE))


@pytest.mark.parametrize("command", shown("make"))
def test_each_documented_make_target_exists(command: Command):
    for target in (word for word in command.words[1:] if not word.startswith("-") and "=" not in word):
        if target not in makefile_targets() and f"make {target}" in AWAITED:
            pytest.skip(f"{command.where}: {AWAITED[f'make {target}']}")
        assert target in makefile_targets(), f"{command.where}: the Makefile has no target {target!r}"


@pytest.mark.parametrize("command", shown("python"))
def test_each_documented_python_module_or_script_exists(command: Command):
    if command.words[1] == "-m":
        assert importlib.util.find_spec(command.words[2]) is not None, f"{command.where}: no module {command.words[2]}"
        return
    script = command.words[1]
    if not (REPO / script).is_file() and script in AWAITED:
        pytest.skip(f"{command.where}: {AWAITED[script]}")
    assert (REPO / script).is_file(), f"{command.where}: no file {script}"


@pytest.mark.parametrize("command", shown("pip"))
def test_each_documented_pip_extra_exists(command: Command):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for word in command.words:
        for names in re.findall(r"^\.\[([\w,-]+)\]$", word):
            missing = set(names.split(",")) - set(extras)
            assert not missing, f"{command.where}: pyproject.toml has no extra {sorted(missing)}"


# ---- commands, links and paths in the prose ------------------------------------------------------------------


def prose(path: Path) -> str:
    return split_fences(path)[1]


def inline_vae_commands() -> list:
    found = []
    for path in DOCUMENTS:
        for span in re.findall(r"`([^`]+)`", prose(path)):
            words = tuple(span.split())
            if words[0] == "vae":
                found.append(pytest.param(Command(str(path.relative_to(REPO)), words), id=f"{path.name} {span}"))
    return found


@pytest.mark.parametrize("command", inline_vae_commands())
def test_each_vae_command_in_the_prose_parses(command: Command):
    """`vae train --resume RUN` in a sentence is held to the same standard, short of being run."""
    if command.words in (("vae",), ("vae", "--help")):
        return
    if len(command.words) == 2 or command.words[2:] == ("--help",):  # a command's name, or its help
        name = command.words[1]
        assert exists(name) or f"vae {name}" in AWAITED, f"{command.where}: no command {name!r}"
        return
    form_of(command)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of `path`: lower case, punctuation dropped, each space a hyphen."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", prose(path), flags=re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        duplicate = sum(1 for existing in anchors if re.fullmatch(rf"{re.escape(anchor)}(-\d+)?", existing))
        anchors.add(f"{anchor}-{duplicate}" if duplicate else anchor)
    return anchors


def relative_links() -> list:
    found = []
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
            if not re.match(r"^[a-z]+:", target):
                found.append(pytest.param(path, target, id=f"{path.name} {target}"))
    return found


@pytest.mark.parametrize(("path", "target"), relative_links())
def test_each_relative_link_and_picture_lands(path: Path, target: str):
    file_part, _, anchor = target.partition("#")
    linked = (path.parent / file_part).resolve() if file_part else path
    assert linked.exists(), f"{path.name}: the link {target} leads to no file"
    if anchor:
        assert anchor in heading_anchors(linked), f"{path.name}: {linked.name} has no heading #{anchor}"


def test_the_readme_links_every_docs_page():
    linked = {
        (REPO / target.partition("#")[0]).resolve()
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(REPO / "README.md"))
    }
    unlinked = [page.name for page in DOCUMENTS[1:] if page.resolve() not in linked]
    assert not unlinked, f"README.md links none of {unlinked}"


REPOSITORY_PATH = re.compile(r"(?<![\w/.~-])((?:vaecli|tests|configs|benchmarks|examples)/[\w./-]*[\w/])")


def test_each_repository_path_named_exists():
    missing = []
    for path in DOCUMENTS:
        for named in REPOSITORY_PATH.findall(prose(path)):
            if not (REPO / named).exists() and named not in AWAITED:
                missing.append(f"{path.name}: {named}")
    assert not missing, f"paths that do not exist: {missing}"


def test_the_readme_names_the_modules_of_each_subpackage_that_exist():
    """The Development table: `vaecli/models/` | ... `vae.py` ...: each module named is in that folder."""
    missing = []
    for folder, cells in re.findall(r"^\| `((?:vaecli/\w+|benchmarks)/)` \|(.*)$", prose(REPO / "README.md"), re.M):
        named = [f"{folder}{name}" for name in re.findall(r"`(\w+\.py)`", cells)]
        missing += [module for module in named if not (REPO / module).is_file() and module not in AWAITED]
    assert not missing, f"README's Development table names modules that do not exist: {missing}"
