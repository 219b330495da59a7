"""The README and the pages under docs/ stay true: the README's example is
examples/api.py and runs, the library page's example runs, every `propmaps` /
`python launch.py` command in them parses with the current flags, the quick start
has its two commands, and every relative link resolves."""

import glob
import os
import re
import shlex
import sys

import numpy as np
import pytest
from conftest import ROOT

EXAMPLE_SECTION = "## The library in one example"
EXAMPLE_FILE = os.path.join(ROOT, "examples", "api.py")
LIBRARY_PAGE = os.path.join("docs", "library.md")
PAPER_CONFIG = "pj.attack.AttackConfig(generations=10)"
SMALL_CONFIG = "pj.attack.AttackConfig(population=100, generations=10)"
LIBRARY_SECTION = "## Use from your own JAX code"
# The pages whose commands and links are checked: the README and docs/*.md.
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)


def read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def python_block(page: str, section: str) -> str:
    """The first python block of `section` (a heading line) of `page`."""
    text = read(page)
    assert section in text, f"{page} lost its section {section!r}"
    match = re.search(r"```python\n(.*?)```", text.split(section, 1)[1], re.DOTALL)
    assert match, f"no python block in the {page} section {section!r}"
    return match.group(1)


def test_readme_example_is_examples_api_py():
    with open(EXAMPLE_FILE, encoding="utf-8") as f:
        assert python_block("README.md", EXAMPLE_SECTION) == f.read()


def test_readme_example_runs(cifar10_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # it reads a committed run, relative to the root
    monkeypatch.delenv("PROPMAPS_RUN", raising=False)
    with open(EXAMPLE_FILE, encoding="utf-8") as f:
        code = f.read()
    # The example as written, at a quarter of the paper's population: the attack
    # is most of its time (CI runs it as it is, from the installed wheel).
    assert code.count(PAPER_CONFIG) == 1, f"examples/api.py lost {PAPER_CONFIG!r}"
    code = code.replace(PAPER_CONFIG, SMALL_CONFIG)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, EXAMPLE_FILE, "exec"), namespace)
    assert namespace["config"].population == 100
    result, maps, run = namespace["result"], namespace["maps"], namespace["run"]
    study = namespace["study"]
    assert result.pixels.shape == (len(namespace["images"]), 1, 5)
    # The maps of the result: LeNet's convolutions, forward order, one per image.
    assert list(maps["pm"]["max"]) == ["conv1", "conv2"]
    assert maps["pm"]["max"]["conv1"].shape == (8, 28, 28)
    # The locality study counts what the attack found.
    logits = namespace["apply_fn"](namespace["variables"], namespace["images"])
    right = np.asarray(logits).argmax(-1) == namespace["labels"]
    found = study.summary["original_correct"]
    assert (found["successes"], found["n"]) == (
        (result.success & right).sum(),
        right.sum(),
    )
    assert run.pixels.shape == (1000, 1, 5) and run.success.sum() > 4
    out = capsys.readouterr().out
    assert "fooled" in out and "| on nearby pixels |" in out


def test_library_page_example_runs(capsys):
    code = python_block(LIBRARY_PAGE, LIBRARY_SECTION)
    namespace: dict = {"__name__": "library_example"}
    exec(compile(code, LIBRARY_PAGE, "exec"), namespace)
    result, maps, layers = namespace["result"], namespace["maps"], namespace["layers"]
    images = namespace["images"]
    assert result.pixels.shape == (len(images), 1, 5)
    assert list(maps) == list(layers) == ["conv1", "conv2"]
    assert maps["conv1"].shape == images.shape[:3]
    assert "success" in capsys.readouterr().out


# --- Every `propmaps ...` / `python launch.py ...` command parses with today's flags.

PATH_FLAGS = ("weights", "init_weights", "cifar10_path")
PLACEHOLDER = "/path/to/"


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the README's bash blocks: continuation lines joined, split at
    `&&` and `;`, comments dropped; each as its words (shlex)."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.DOTALL):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for part in re.split(r"&&|;", line):
                if part.strip():
                    commands.append(shlex.split(part, comments=True))
    return commands


def environment(words: list[str]) -> dict[str, str]:
    """The leading VAR=value words of a command, taken off `words`."""
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env


def launch_commands(text: str) -> list[tuple[dict[str, str], list[str]]]:
    """(environment assignments, arguments after the command) of every `propmaps`
    or `python launch.py` command in `text`."""
    out = []
    for words in shell_commands(text):
        env = environment(words)
        if words and words[0] == "propmaps":
            out.append((env, words[1:]))
        elif len(words) >= 2 and words[1] == "launch.py":
            assert words[0] in ("python", "python3"), words
            out.append((env, words[2:]))
    return out


def flag_values(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def problems(text: str) -> list[str]:
    """What is wrong with the launch.py commands of a README text: a command that
    does not parse (unknown experiment or flag, bad value), or a path that is neither
    in the repository, nor written by an earlier command (under its --workdir), nor
    an explicit /path/to/ placeholder."""
    import launch

    found, workdirs = [], []
    for env, args in launch_commands(text):
        command = " ".join(["python launch.py", *args])
        values = flag_values(args)
        try:
            launch.check(args)
        except launch.UsageError as e:
            found.append(f"{command}: {e}")
            workdirs.append(os.path.normpath(values.get("workdir", ".")))
            continue
        paths = {k: v for k, v in values.items() if k.startswith(PATH_FLAGS)}
        paths.update({k: v for k, v in env.items() if k.endswith(("_PATH", "_DIR"))})
        for name, path in paths.items():
            if path.startswith(PLACEHOLDER) or os.path.exists(os.path.join(ROOT, path)):
                continue
            if any(os.path.normpath(path).startswith(w + os.sep) for w in workdirs):
                continue
            found.append(f"{command}: {name}={path} does not exist")
        if "workdir" in values:
            workdirs.append(os.path.normpath(values["workdir"]))
    return found


# docs/cloud_tpu.md's blocks are scripts for gcloud and ssh (multi-line quoted
# commands run on a TPU VM), not commands run from the repository root.
@pytest.mark.parametrize("page", [p for p in PAGES if not p.endswith("cloud_tpu.md")])
def test_launch_commands_parse_with_the_current_flags(page):
    assert problems(read(page)) == []


def test_the_experiments_page_shows_every_main_experiment():
    commands = launch_commands(read(os.path.join("docs", "experiments.md")))
    experiments = {launch_args[0].split("=", 1)[1] for _, launch_args in commands}
    assert {"locality", "attack", "propagation", "statistics", "train"} <= experiments


def test_quick_start_is_two_commands_with_the_data_variable_where_it_works():
    """One installs and runs the main job, one installs and runs the tests; each
    data variable sits right before the command that reads it, not before pip."""
    quick_start = read("README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = shell_commands(quick_start)
    assert len(commands) == 4, commands  # two lines, each `pip install ... && X`
    (install_run, run), (install_test, test) = commands[:2], commands[2:]
    assert install_run[:2] == ["pip", "install"] and "requirements.txt" in install_run
    assert install_test[:2] == ["pip", "install"]
    assert "requirements-dev.txt" in install_test
    assert run[0] == "propmaps" and "--experiment=locality" in run
    assert environment(run) == {}  # CIFAR-10 is downloaded, or see the text
    assert environment(test) == {
        "CIFAR10_PATH": "/path/to/cifar-10-batches-py",
        "KERAS_WEIGHTS_DIR": "/path/to/one-pixel-attack-keras",
    }
    assert test == ["python", "-m", "pytest", "-q", "-rs"] == ci_test_command()
    text = " ".join(quick_start.split())
    assert "`CIFAR10_PATH=/path/to/cifar-10-batches-py` right before `propmaps`" in text


def ci_test_command() -> list[str]:
    """The pytest command of .ci/run (the README's test command)."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        (line,) = [x for x in f if x.startswith("python -m pytest")]
    return shlex.split(line)


def test_readme_check_catches_a_misspelled_flag_and_a_missing_path():
    text = """
```bash
python launch.py --experiment=attack --num_sample=5 \\
    --workdir=runs/a
python launch.py --experiment=evaluate --weights=resnet.h5 --workdir=runs/b
python launch.py --experiment=evaluate --weights=runs/a/model.msgpack --workdir=runs/c
python launch.py --experiment=evaluate --weights=/path/to/resnet.h5 --workdir=runs/c
CIFAR10_PATH=data/nowhere python launch.py --experiment=attack --sample=last
```
"""
    found = problems(text)
    assert len(found) == 3, found
    assert "--num_sample is not a flag of --experiment=attack" in found[0]
    assert "weights=resnet.h5 does not exist" in found[1]
    assert "--sample=last: value should be one of" in found[2]


# --- Every relative link of the pages resolves: to a file, and to its heading.

LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """`text` without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def heading_ids(path: str) -> set[str]:
    """GitHub's ids of the headings of a markdown file: lower case, punctuation
    dropped, spaces as hyphens."""
    with open(path, encoding="utf-8") as f:
        headings = re.findall(r"^#+ (.*)$", prose(f.read()), re.MULTILINE)
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings
    }


def broken_links(page: str) -> list[str]:
    found = []
    for target in LINK.findall(prose(read(page))):
        if re.match(r"[a-z]+:", target):
            continue  # https://, mailto:
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path))
        if not os.path.exists(full):
            found.append(f"{page}: {target} does not exist")
        elif anchor and anchor not in heading_ids(
            full if path else os.path.join(ROOT, page)
        ):
            found.append(f"{page}: {target} names no heading of {path or page}")
    return found


@pytest.mark.parametrize("page", PAGES + ["BENCHMARKS.md"])
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    (tmp_path / "docs").mkdir()
    (tmp_path / "A.md").write_text("# The `top`: one, two\n")
    (tmp_path / "docs" / "b.md").write_text(
        "[ok](../A.md#the-top-one-two) [bad](../A.md#nowhere) [gone](c.md) "
        "[web](https://example.com/x)\n```\n[code](not/checked.md)\n```\n"
    )
    assert broken_links(os.path.join("docs", "b.md")) == [
        "docs/b.md: ../A.md#nowhere names no heading of ../A.md",
        "docs/b.md: c.md does not exist",
    ]
