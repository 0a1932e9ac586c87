"""The documentation holds together: every relative link in README.md and docs/ resolves (file and
#anchor), every documented command line composes with Hydra, and every comment in conf/ is one line.

Fast: configs are composed, no model is loaded.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import ROOT, job_settings

CONF = ROOT / "conf"
DOCS = ROOT / "docs"
LINKED = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]  # every link must resolve
COMMANDS_IN = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted(CONF.rglob("*.yaml"))]
HISTORY = sorted((DOCS / "results").glob("*.md"))  # commands as they were run: checked, see below
MAX_COMMENT = 120  # characters per conf/ line that carries a comment (docs/configuration.md)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- Markdown ---------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(prose, code): the file's lines twice, once with fenced code blanked and once with everything
    but fenced code blanked, so that line numbers stay the file's."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            prose.append("")
            code.append("")
        elif inside:
            prose.append("")
            code.append(line)
        else:
            prose.append(line)
            code.append("")
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation but `-` and `_`
    dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link and image in `path`, code left out."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    out = []
    for number, line in enumerate(prose, 1):
        line = re.sub(r"(`+)(?:(?!\1).)+\1", "", line)  # inline code is not a link
        targets = [m.group(1) for m in LINK.finditer(line)]
        if m := REFERENCE.match(line):
            targets.append(m.group(1))
        out += [(number, t) for t in targets if not SCHEME.match(t)]
    return out


def broken(path: Path, target: str) -> str | None:
    """Why the link `target` in `path` does not resolve, or None."""
    file_part, _, anchor = target.partition("#")
    file_part = unquote(file_part)
    if not file_part:
        dest = path
    elif file_part.startswith("/"):
        dest = ROOT / file_part.lstrip("/")
    else:
        dest = (path.parent / file_part).resolve()
    if not dest.exists():
        return f"{file_part} does not exist"
    if anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
        return f"{rel(dest)} has no heading #{anchor}"
    return None


def test_slug_follows_github():
    assert slug("Our defaults and the paper's") == "our-defaults-and-the-papers"
    assert slug("`search_from`") == "search_from"
    assert slug("vLLM on the CPU") == "vllm-on-the-cpu"
    assert slug("Step 1: the [tree](formats.md)") == "step-1-the-tree"


@pytest.mark.parametrize("path", LINKED, ids=rel)
def test_every_relative_link_resolves(path):
    bad = [f"{rel(path)}:{line}: ({target}) {why}" for line, target in links(path)
           if (why := broken(path, target))]
    assert not bad, "broken links:\n" + "\n".join(bad)


# --- documented commands ----------------------------------------------------------------------------

ENTRY_CONFIGS = {"iterate.py": "iterate", "evaluate.py": "evaluate", "search.py": "search_run"}
COMMAND = re.compile(r"(?:\.venv/bin/)?python (?:iterate|evaluate|search)\.py\b.*|"
                     r"make demo(?: ARGS=(?:\"[^\"]*\"|'[^']*'))?", re.S)
SYNOPSIS = re.compile(r"(?:^|\s)\[|\.\.\.")  # `[key=value ...]`: a usage line, not a command
PLACEHOLDER = "@placeholder@"
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                          "--config-dir", "-cd", "--info", "-i"}


@dataclass(frozen=True)
class Command:
    file: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{rel(self.file)}:{self.line}: `{self.text}`"


def inline_code(lines: list[str]) -> list[tuple[int, str]]:
    """(line, text) of every inline code span; a span may run over lines within a paragraph."""
    text = "\n".join(lines)
    out = []
    for m in re.finditer(r"(?<!`)(`+)(?!`)((?:(?!\1).)+?)(?<!`)\1(?!`)", text, re.S):
        if "\n\n" not in m.group(2):
            out.append((text.count("\n", 0, m.start()) + 1, m.group(2).replace("\n", " ")))
    return out


def code_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(line, text) of each logical line of code, `\\`-continued lines joined."""
    out, pending, start = [], "", 0
    for number, line in enumerate(lines, 1):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def commands(path: Path) -> list[Command]:
    """The command lines `python iterate.py|evaluate.py|search.py ...` (also through `.venv/bin/`) and
    `make demo ARGS=...` that `path` documents: in Markdown, in inline code and code blocks; in yaml,
    in comments."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".yaml":
        pieces = [(n, line.split("#", 1)[1]) for n, line in enumerate(text.splitlines(), 1) if "#" in line]
    else:
        prose, code = split_fences(text)
        pieces = inline_code(prose) + code_lines(code)
    found = []
    for number, piece in pieces:
        if m := COMMAND.search(piece):
            found.append(Command(path, number, m.group(0).strip()))
    return sorted(found, key=lambda c: c.line)


def shell_words(text: str) -> list[str]:
    """The words of one shell command, up to its first operator (`|`, `&&`, `;`, `>`), comments out.
    A placeholder `<a|b>` becomes its first alternative, any other `<...>` PLACEHOLDER."""
    text = re.sub(r"<([^<>|\s][^<>]*)>", lambda m: m.group(1).split("|")[0] if "|" in m.group(1) else PLACEHOLDER,
                  text)
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    words = []
    for word in lex:
        if word and all(ch in "();<>|&" for ch in word):
            break
        words.append(word)
    return words


@dataclass(frozen=True)
class Invocation:
    config: str  # the entry point's config name
    overrides: list[str]  # sweeps reduced to their first value
    placeholders: list[str]  # keys (or groups) given as <...>: they must exist
    synopsis: bool = False  # `[key=value ...]`: a usage line, not a command


def parse(command: Command) -> Invocation:
    words = shell_words(command.text)
    if words[:2] == ["make", "demo"]:
        config, args = "iterate", shlex.split(words[2].split("=", 1)[1]) if len(words) > 2 else []
    else:
        config, args = ENTRY_CONFIGS[Path(words[1]).name], words[2:]
    if SYNOPSIS.search(command.text):
        return Invocation(config, [], [], synopsis=True)
    multirun, overrides, placeholders, skip = False, [], [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif arg.startswith("-") and not arg.startswith("--") or arg.startswith("--"):
            continue  # --help, --resolve, ...
        elif arg.endswith("=" + PLACEHOLDER):
            placeholders.append(arg.split("=", 1)[0])
        else:
            overrides.append(arg)
    if multirun:
        parsed = OverridesParser.create().parse_overrides(overrides)
        overrides = [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override()
                     else o.input_line for o in parsed]
    return Invocation(config, overrides, placeholders)


def check_composes(command: Command) -> None:
    """Compose `command`'s config as its entry point would, and build the typed settings; raise
    AssertionError naming the file, line and command if that fails."""
    inv = parse(command)
    if inv.synopsis:
        return
    error = composition_error(inv.config, tuple(inv.overrides), tuple(inv.placeholders))
    if error:
        raise AssertionError(f"{command} does not compose: {error}")


@functools.lru_cache(maxsize=None)
def composition_error(config: str, overrides: tuple[str, ...], placeholders: tuple[str, ...]) -> str | None:
    """Why `config` with `overrides` does not compose into settings (None if it does); the keys or
    groups in `placeholders` must exist. Cached: many documents show the same command."""
    try:
        job_settings(config, list(overrides))
        if placeholders:
            with initialize_config_dir(config_dir=str(CONF), version_base=None):
                cfg = compose(config_name=config, overrides=list(overrides))
            for key in placeholders:
                name = key.lstrip("+~").split("@")[0]
                if not ((CONF / name).is_dir() or OmegaConf.select(cfg, name, default=PLACEHOLDER) != PLACEHOLDER):
                    raise KeyError(f"{key}=<...>: no such key or config group")
    except Exception as err:  # noqa: BLE001 -- any failure to compose is the finding
        return f"{type(err).__name__}: " + " ".join(str(err).split())
    return None


DOCUMENTED = [c for path in COMMANDS_IN for c in commands(path)]


def test_commands_are_found():
    """The scan sees the README's commands and the experiment presets' comments."""
    readme = [c.text for c in DOCUMENTED if c.file.name == "README.md"]
    assert any("iterate.py" in t for t in readme) and any("evaluate.py" in t for t in readme)
    assert any(c.file.parent.name == "experiment" for c in DOCUMENTED)


def test_parse_reduces_sweeps_and_placeholders():
    c = Command(
        ROOT / "README.md",
        1,
        "python iterate.py -m search.simulations=8,16,32 'run.name=s${search.simulations}' "
        "'train.loss_type=[sigmoid,sft]' run.seed=<k> tool=<none|python>  # a sweep",
    )
    assert parse(c) == Invocation("iterate", ["search.simulations=8", "run.name=s${search.simulations}",
                                              "train.loss_type=[sigmoid,sft]", "tool=none"], ["run.seed"])
    assert parse(Command(ROOT / "README.md", 1, 'make demo ARGS="run.rounds=3 backend=hf"')).overrides == [
        "run.rounds=3", "backend=hf"]
    assert parse(Command(ROOT / "README.md", 1, "python search.py task=<name> [eval.limit=N]")).synopsis


@pytest.mark.parametrize("wrong", ["serch.simulations=8", "backend=tpu", "run.seed=<k> run.sede=<k>"])
def test_a_wrong_key_or_group_fails(wrong):
    with pytest.raises(AssertionError, match=r"README.md:7: `python iterate.py .*` does not compose"):
        check_composes(Command(ROOT / "README.md", 7, f"python iterate.py {wrong}"))


@pytest.mark.parametrize("command", DOCUMENTED, ids=lambda c: f"{rel(c.file)}:{c.line}")
def test_documented_command_composes(command):
    check_composes(command)


HISTORICAL = [c for path in HISTORY for c in commands(path)]


@pytest.mark.parametrize("command", HISTORICAL, ids=lambda c: f"{rel(c.file)}:{c.line}")
def test_result_page_command_composes(command):
    """docs/results record the commands as they were run; they still compose with today's configs."""
    check_composes(command)


# --- config comments --------------------------------------------------------------------------------

YAMLS = sorted(CONF.rglob("*.yaml"))


def comment_problems(path: Path) -> list[str]:
    """Lines of a conf/ yaml whose comment runs past MAX_COMMENT characters, or continues a key's
    comment on a line of its own (indented deeper than the key below it)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if "#" in line and len(line) > MAX_COMMENT:
            out.append(f"{rel(path)}:{number}: {len(line)} characters (at most {MAX_COMMENT})")
        stripped = line.lstrip()
        if not stripped.startswith("#"):
            continue
        below = next((x for x in lines[number:] if x.strip() and not x.lstrip().startswith("#")), "")
        if len(line) - len(stripped) > len(below) - len(below.lstrip()):
            out.append(f"{rel(path)}:{number}: a comment continued on its own line (one line per key)")
    return out


@pytest.mark.parametrize("path", YAMLS, ids=rel)
def test_config_comments_are_one_short_line(path):
    problems = comment_problems(path)
    assert not problems, "\n".join(problems)
