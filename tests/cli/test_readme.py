"""The README's "Use from your own JAX code" example runs as written, and every
`python launch.py ...` command in it parses with the current flags."""

import os
import re
import shlex

from conftest import ROOT

SECTION = "## Use from your own JAX code"


def readme_example() -> str:
    """The first python block of the README section SECTION."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    section = text.split(SECTION, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f"no python block in the README section {SECTION!r}"
    return match.group(1)


def test_readme_example_runs(capsys):
    code = readme_example()
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    result, maps, layers = namespace["result"], namespace["maps"], namespace["layers"]
    images = namespace["images"]
    assert result.pixels.shape == (len(images), 1, 5)
    assert list(maps) == list(layers) == ["conv1", "conv2"]
    assert maps["conv1"].shape == images.shape[:3]
    assert "success" in capsys.readouterr().out


# --- Every `python launch.py ...` command of the README parses with today's flags.

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


def launch_commands(text: str) -> list[tuple[dict[str, str], list[str]]]:
    """(environment assignments, arguments after launch.py) of every launch.py
    command in `text`."""
    out = []
    for words in shell_commands(text):
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if len(words) >= 2 and words[1] == "launch.py":
            assert words[0] in ("python", "python3"), words
            out.append((env, words[2:]))
    return out


def readme_text() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


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


def test_readme_launch_commands_parse_with_the_current_flags():
    commands = launch_commands(readme_text())
    experiments = {launch_args[0].split("=", 1)[1] for _, launch_args in commands}
    assert {"locality", "attack", "propagation", "statistics", "train"} <= experiments
    assert problems(readme_text()) == []


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
