"""README command 2 is exactly what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
    commands = readme_commands()
    assert len(commands) >= 2
    assert all("\n" not in c for c in commands[:2])
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines


def test_both_commands_pin_torch_before_the_project():
    for command in readme_commands()[:2]:
        torch_at = command.index("torch==2.14.1 torchvision==0.29.1")
        assert torch_at < command.index("pip install -q -e")


def test_ci_installs_the_packages_of_the_real_slurm_cluster_before_the_suite():
    from slurm_cluster import PACKAGES

    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    (install,) = [i for i, line in enumerate(lines) if "apt-get install" in line]
    assert set(PACKAGES) <= set(re.findall(r"[\w.-]+", lines[install]))
    assert install < lines.index(readme_commands()[1])
