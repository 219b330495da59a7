"""docs/cloud_tpu.md: its launch.py commands parse with today's flags.

The recipe's commands run inside `gcloud ... ssh --command='...'`, which the
README's check (tests/cli/test_readme.py) does not look into; this one does.
"""

import os
import re
import shlex

from conftest import ROOT


def recipe_launch_arguments() -> list[list[str]]:
    """The arguments after `launch.py` of every launch command in the recipe."""
    with open(os.path.join(ROOT, "docs", "cloud_tpu.md")) as f:
        text = f.read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        block = re.sub(r"\\\n\s*", " ", block)
        for match in re.finditer(r"launch\.py ([^>'\"\n&]*)", block):
            found.append(shlex.split(match.group(1)))
    return found


def test_recipe_launch_commands_parse():
    import launch

    commands = recipe_launch_arguments()
    assert commands, "the recipe lost its launch.py command"
    for args in commands:
        launch.check(args)  # UsageError (an unknown flag, a bad value) fails here
        # The pod-slice variant of section 4: the same command with --distributed.
        launch.check([*args, "--distributed"])
    assert any("--experiment=locality" in args for args in commands)
