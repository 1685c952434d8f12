"""The documentation against the CLI: every ``pomt`` command line in README.md and docs/ parses
(each option exists with that spelling and value form), and every option a command's
``--help`` lists is documented in README.md where README documents that command.

Command lines are taken from the fenced code blocks; a line ending in ``\\`` continues on
the next, ``# ...`` comments are dropped, ``[--opt value]`` brackets mark optional parts
and are kept without the brackets, and ``sudo "$(command -v pomt)"``, ``sudo pomt``,
``VAR=value pomt`` and ``torchrun ... -m pomt_cli`` are read as ``pomt``. The lines are parsed
by the click command behind the Typer app (options, their values, types, ranges and choices;
callbacks included), never run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from pomt_cli.cli.app import _click_errors, app

ROOT = Path(__file__).resolve().parents[1]
#: The documents checked; docs/gpu/ holds dated reports of runs, kept as they were written.
DOCS = ["README.md", "docs/ARCHITECTURE.md", "docs/FORMATS.md", "docs/PERFORMANCE.md"]
#: Placeholders the docs write in place of a value, and a value of the right form for each.
PLACEHOLDERS = {"RUNTIME": "eager", "PRESET": "cpu", "REPORT": "report.json", "DIR": "runs/x"}

_LAUNCHER = re.compile(
    r"""^(?:[A-Z_]+=\S+\s+)*(?:sudo\s+(?:"\$\(command -v pomt\)"|pomt)|pomt|torchrun\s.*?-m\s+pomt_cli)\s+""")


def fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every line in the fenced code blocks of ``text``."""
    lines, inside, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def command_lines(text: str) -> list[tuple[int, list[str]]]:
    """(line number, arguments after ``pomt``) of every pomt command line in the code blocks."""
    found = []
    for number, line in fenced_lines(text):
        line = line.strip()
        match = _LAUNCHER.match(line)
        if not match:
            continue
        rest = re.sub(r"\s#.*$", "", line[match.end():])
        rest = rest.replace("[", " ").replace("]", " ")
        args = [PLACEHOLDERS.get(arg, arg) for arg in shlex.split(rest)]
        found.append((number, args))
    return found


def parse(args: list[str]) -> None:
    """Parse ``pomt ARGS`` as the CLI would, down to the leaf command; run nothing.

    Raises:
        click's UsageError (or BadParameter): an unknown option, a bad value, a missing one.
    """
    command = typer.main.get_command(app)
    # pomt's own options act while parsing (--install-completion writes to the home
    # folder): they are only looked up.
    own = {o for p in command.params for o in p.opts}
    if args and args[0] in own:
        return
    if args and args[0].startswith("-"):
        raise _click_errors.NoSuchOption(args[0])
    context = command.make_context("pomt", list(args), resilient_parsing=False)
    while hasattr(command, "resolve_command"):
        # Typer's group keeps the subcommand's name apart from its arguments, as click does.
        protected = getattr(context, "_protected_args", None) or getattr(context, "protected_args", [])
        name, command, rest = command.resolve_command(context, [*protected, *context.args])
        context = command.make_context(name, rest, parent=context)


def documented_commands() -> list[tuple[str, int, list[str]]]:
    return [(doc, number, args) for doc in DOCS
            for number, args in command_lines((ROOT / doc).read_text(encoding="utf-8"))]


def test_the_extraction_reads_continuations_launchers_comments_and_brackets():
    text = "\n".join([
        "```bash",
        'sudo "$(command -v pomt)" clocks lock --device orin',
        "pomt bench --model m \\",
        "     --method none   # a comment",
        "POMT_CACHE_DIR=/tmp/c pomt refine r.json [--candidates 3]",
        "torchrun --nproc_per_node 2 -m pomt_cli estimate-accuracy --data digits",
        "python scripts/x.py",
        "```",
        "pomt demo --not-in-a-block",
    ])
    assert command_lines(text) == [
        (2, ["clocks", "lock", "--device", "orin"]),
        (3, ["bench", "--model", "m", "--method", "none"]),
        (5, ["refine", "r.json", "--candidates", "3"]),
        (6, ["estimate-accuracy", "--data", "digits"]),
    ]


def test_the_docs_hold_command_lines_of_every_command():
    commands = {args[0] for _, _, args in documented_commands()}
    assert commands >= {"profile", "clocks", "estimate-accuracy", "compute-r", "refine", "bench", "demo",
                        "export"}


@pytest.mark.parametrize("args", [
    ["profile", "--budgte", "1"],
    ["profile", "--tokens", "197-17-20"],
    ["bench", "--method", "pomt", "--runtime", "eager,tensorflow"],
    ["compute-r", "--alpha", "x"],
    ["clocks", "lock", "--dryrun"],
    ["refine"],
])
def test_a_broken_command_line_does_not_parse(args):
    with pytest.raises(Exception) as caught:
        parse(args)
    assert "UsageError" in [c.__name__ for c in type(caught.value).__mro__]


@pytest.mark.parametrize(("doc", "number", "args"), documented_commands(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_command_line_parses(doc, number, args):
    try:
        parse(args)
    except Exception as e:  # noqa: BLE001 - the message is the finding
        pytest.fail(f"{doc}:{number}: pomt {shlex.join(args)}: {type(e).__name__}: {e}")


def readme_sections() -> dict[str, str]:
    """README's text per command (``### `pomt NAME` `` sections), each with the text that
    documents options of several commands: the "Commands" introduction before the first
    command, and for profile and bench the "Runtimes" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    intro, *parts = re.split(r"^### ", commands, flags=re.M)
    sections = {}
    runtimes = next(p for p in parts if p.startswith("Runtimes"))
    for part in parts:
        match = re.match(r"`pomt ([\w-]+)`", part)
        if match:
            sections[match.group(1)] = intro + part
    for name in ("profile", "bench"):
        sections[name] += runtimes
    return sections


def undocumented_options(sections: dict[str, str]) -> list[str]:
    """``pomt COMMAND --option`` for every option none of whose names its command's section
    mentions (``--lock-clocks / --no-lock-clocks`` is documented by either)."""
    missing = []

    def visit(command, path: list[str]) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                visit(sub, [*path, name])
            return
        section = sections.get(path[0], "")
        for param in command.params:
            names = [o for o in [*param.opts, *param.secondary_opts] if o.startswith("-")]
            if names and not any(re.search(re.escape(n) + r"(?![\w-])", section) for n in names):
                missing.append(f"pomt {' '.join(path)} {names[-1]}")

    visit(typer.main.get_command(app), [])
    return missing


def test_every_option_of_every_command_is_documented_in_its_readme_section():
    missing = undocumented_options(readme_sections())
    assert not missing, "options --help lists that README does not document:\n" + "\n".join(missing)


def test_every_option_of_pomt_itself_is_in_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    options = [o for p in typer.main.get_command(app).params for o in p.opts if o != "--help"]
    assert "--version" in options
    assert [o for o in options if o not in readme] == []


def test_an_option_left_out_of_its_section_is_found():
    sections = readme_sections()
    sections["refine"] = sections["refine"].replace("--rounds", "--round-count")
    sections["profile"] = sections["profile"].replace("--lock-clocks", "").replace("--no-lock-clocks", "")
    missing = undocumented_options(sections)
    assert "pomt refine --rounds" in missing
    assert "pomt profile --no-lock-clocks" in missing
    assert "pomt bench --rounds" not in missing


#: (command, option, the code's default, how README states it). A default changed in the code
#: fails here until README says the new one.
README_DEFAULTS = [
    ("profile", "--rel-precision", 0.01, "`--rel-precision` (1%)"),
    ("profile", "--budget", 1.0, "its `--budget` (1 s)"),
    ("profile", "--passes", 2, "`--passes` times (2)"),
    ("profile", "--warmup", 3, "`--warmup` (3)"),
    ("profile", "--min-samples", 10, "`--min-samples` (10)"),
    ("profile", "--top-steps", 8, "`--top-steps` (8)"),
    ("profile", "--runtime", "eager", "(default `eager`, PyTorch as it is)"),
    ("profile", "--compile-backend", "inductor", "(`--compile-backend`, default `inductor`"),
    ("profile", "--output-dir", "runs", "takes `--output-dir` (default `runs/`)"),
    ("profile", "--model", "deit_small_patch16_224", "`--model` defaults to the paper's model, `deit_small_patch16_224`"),
    ("estimate-accuracy", "--batch-size", 64, "`--batch-size` (64) images per forward pass"),
    ("estimate-accuracy", "--torch-device", "auto", "`--torch-device` (`auto`: CUDA where available"),
    ("estimate-accuracy", "--seed", 0, "`--seed` (0) for the random orders"),
    ("refine", "--candidates", 3, "(`--candidates`, 3)"),
    ("refine", "--rounds", 6, "(`--rounds` 6, `--budget` 0.5 s per setting and round)"),
    ("refine", "--budget", 0.5, "(`--rounds` 6, `--budget` 0.5 s per setting and round)"),
    ("bench", "--rounds", 6, "`--rounds` (6) and `--budget` (0.5 s)"),
    ("bench", "--budget", 0.5, "`--rounds` (6) and `--budget` (0.5 s)"),
    ("bench", "--rel-precision", 0.01, "`--rel-precision` (1%)"),
    ("bench", "--eval-batch-size", 64, "(`--eval-batch-size`, 64 images per forward pass"),
    ("demo", "--output-dir", "runs/demo", "[--output-dir runs/demo]"),
    ("demo", "--budget", 0.25, "`--budget` (0.25 s)"),
    ("export", "--opset", 18, "`--opset`, default 18"),
    ("export", "--seed", 0, "(seeded by `--seed`, 0)"),
]


def option_default(command_name: str, option: str):
    command = typer.main.get_command(app).commands[command_name]
    param = next(p for p in command.params if option in p.opts)
    default = param.default
    default = getattr(default, "value", default)  # an Enum choice
    return str(default) if isinstance(default, Path) else default


@pytest.mark.parametrize(("command", "option", "default", "stated"), README_DEFAULTS)
def test_the_defaults_readme_states_are_the_codes(command, option, default, stated):
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert option_default(command, option) == default, f"pomt {command} {option}: update README ({stated!r})"
    assert stated in readme, f"README no longer says {stated!r}"


def test_the_alpha_readme_states_is_the_codes():
    from pomt_cli.selection import DEFAULT_ALPHA

    assert f"`--alpha A` (default {DEFAULT_ALPHA:g})" in (ROOT / "README.md").read_text(encoding="utf-8")


def inline_spans(text: str) -> list[list[str]]:
    """The words of every inline ``pomt ...`` code span outside the fenced blocks (most name a
    command and some of its options, not a whole command line)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [shlex.split(" ".join(m.group(1).split()).replace("...", " "))
            for m in re.finditer(r"`pomt ([^`]+)`", text)]


def unknown_inline_options(words: list[str]) -> list[str]:
    """The ``--options`` of an inline span that its command does not have; [] where the words
    name no command (``pomt r=56 @3`` is a setting, ``lock|restore`` two commands)."""
    command = typer.main.get_command(app)
    for i, word in enumerate(words):
        if word.startswith("-"):
            break
        commands = getattr(command, "commands", None)
        if commands is None:
            break
        if word not in commands:
            return []
        command = commands[word]
    known = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"--help"}
    return [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in known]


def test_every_option_in_an_inline_pomt_span_exists():
    unknown = [f"{doc}: pomt {shlex.join(words)}: {bad}" for doc in DOCS
               for words in inline_spans((ROOT / doc).read_text(encoding="utf-8"))
               if (bad := unknown_inline_options(words))]
    assert not unknown, "\n".join(unknown)
    assert unknown_inline_options(["refine", "--candidate", "3"]) == ["--candidate"]
    assert unknown_inline_options(["profile", "--method", "pomt"]) == []
    assert unknown_inline_options(["r=56", "@3"]) == []


def test_the_presets_readme_points_to_are_the_bundled_ones():
    """README sends a user to configs/devices/ for a TOML of their own: that copy must be
    the presets pomt loads (src/pomt_cli/configs/devices/), file for file."""
    shown = ROOT / "configs" / "devices"
    bundled = ROOT / "src" / "pomt_cli" / "configs" / "devices"
    assert "(`configs/devices/`" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert sorted(p.name for p in shown.glob("*.toml")) == sorted(p.name for p in bundled.glob("*.toml"))
    for path in bundled.glob("*.toml"):
        assert (shown / path.name).read_bytes() == path.read_bytes(), f"configs/devices/{path.name} differs"
