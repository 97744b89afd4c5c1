"""The documentation stays whole as the code and the pages change: every relative link in README.md,
docs/ and the model cards reaches a file in the repository (and a heading, where it names one), every
`tinygen COMMAND` the pages show exists, the README installs the torch that CI installs, and the README
stays a page and a half."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "weights" / "README.md"]

# [text](target) and ![alt](target): the text may hold one level of brackets, the target may carry a "title".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
TORCH_PIN = re.compile(r"\btorch(==|>=|~=|<=)([0-9][\w.+-]*)")


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """The page as (kind, lines) runs: kind is "" for prose, else the fenced block's info string."""
    runs, kind, lines = [], "", []
    for line in text.splitlines():
        fence = re.match(r"^\s*(```|~~~)\s*(\S*)", line)
        if fence:
            runs.append((kind, lines))
            kind = (fence.group(2) or "code") if kind == "" else ""  # an opening fence, or a closing one
            lines = []
            continue
        lines.append(line)
    runs.append((kind, lines))
    return [(k, ls) for k, ls in runs if ls]


def prose(path: Path) -> list[str]:
    return [line for kind, lines in blocks(path.read_text(encoding="utf-8")) if kind == "" for line in lines]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links keep their text, then lowercase, punctuation dropped
    (hyphens and spaces stay), spaces become hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(path: Path) -> list[str]:
    """Link targets in the prose; code spans are left out, so `[x](y)` inside backticks is text."""
    text = "\n".join(prose(path))
    text = re.sub(r"(`+)(?:(?!\1).)+?\1", "", text)
    return [m.group(1) for m in LINK.finditer(text)]


def test_slug_follows_github():
    assert slug("What is in `weights/`") == "what-is-in-weights"
    assert slug("Run a real model") == "run-a-real-model"
    assert slug("Sampling and speed flags") == "sampling-and-speed-flags"
    assert slug("The recipe, at equal time") == "the-recipe-at-equal-time"
    assert slug("Model card: `stories.safetensors`") == "model-card-storiessafetensors"


class _Page:
    """A page given as text, for the parser tests: read_text() is all the helpers call."""

    def __init__(self, text: str) -> None:
        self.text = text

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.text


def test_parsers_skip_code_blocks():
    page = _Page("# Top\n```text\n# not a heading\n[x](missing.md)\n```\n"
                 "See [top](#top) and `[y](nope.md)`.\n# Top\n")
    assert [k for k, _ in blocks(page.text)] == ["", "text", ""]
    assert anchors(page) == {"top", "top-1"}
    assert links(page) == ["#top"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if SCHEME.match(target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_links_into_the_docs():
    targets = links(README)
    assert any(t.startswith("docs/") for t in targets), targets
    assert "weights/README.md" in targets, targets


def shown_commands() -> dict[str, set[str]]:
    """Each `tinygen COMMAND` the pages run, with the words that follow it (a group's subcommand, if
    COMMAND is a group): in code blocks, each `$ ` line and every line of a bash block; in the README,
    each row of the commands table."""
    found: dict[str, set[str]] = {}
    for page in PAGES:
        for kind, lines in blocks(page.read_text(encoding="utf-8")):
            if kind == "":
                continue
            for line in lines:
                if not (line.startswith("$ ") or kind in ("bash", "sh", "shell")):
                    continue
                for m in re.finditer(r"(?:^|[\s|;&(])tinygen\s+([a-z][\w-]*)(?:\s+([a-z][\w-]*))?", line):
                    found.setdefault(m.group(1), set()).update([m.group(2)] if m.group(2) else [])
    for m in re.finditer(r"^\|\s*`([a-z][\w-]*)`\s*\|", README.read_text(encoding="utf-8"), re.MULTILINE):
        found.setdefault(m.group(1), set())
    return found


SHOWN = shown_commands()


def test_the_pages_show_the_main_commands():
    assert {"sample", "chat", "train", "attention"} <= SHOWN.keys(), SHOWN.keys()


@pytest.mark.parametrize("name", sorted(SHOWN))
def test_shown_command_exists(cli, name):
    r = cli(name, "--help")
    assert r.rc == 0, f"`tinygen {name} --help` exited {r.rc}: {r.err}"
    assert f"tinygen {name}" in r.out, r.out
    if re.search(r"^\s*Commands:", r.out, re.MULTILINE):  # a group: the word after it is one of its commands
        for sub in sorted(SHOWN[name]):
            r = cli(name, sub, "--help")
            assert r.rc == 0, f"`tinygen {name} {sub} --help` exited {r.rc}: {r.err}"


def test_readme_installs_the_torch_ci_installs():
    ours = set(TORCH_PIN.findall(README.read_text(encoding="utf-8")))
    ci = set(TORCH_PIN.findall((ROOT / ".ci" / "run").read_text(encoding="utf-8")))
    assert len(ci) == 1, ci
    assert ours == ci, f"README pins {ours}, .ci/run installs {ci}"


def test_readme_is_a_page_and_a_half():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README.md has {n} lines; move detail into docs/"
