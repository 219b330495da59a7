"""The README's "Use from your own JAX code" example runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
