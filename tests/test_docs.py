"""The README and CI stay true: the support table is the capability records, CI runs the Quick start."""

import pathlib
import re

from dispatch.docs import README_BEGIN, README_END, support_table

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_support_table_is_generated_from_the_capability_records():
    readme = (ROOT / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme, "support table markers missing from README.md"
    table = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert table == support_table(), "README table is stale: regenerate with `python -m dispatch list --markdown`"


def test_quick_start_has_two_commands_and_ci_runs_them_exactly():
    commands = quick_start_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"CI does not run the README command {command!r}"
    # torch is pinned before anything could resolve an unpinned CUDA build.
    assert all("torch==2.13.0" in c for c in commands)


def test_readme_contract_table_is_generated_from_the_contract():
    from dispatch.contract import markdown_table

    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- contract-table:begin", "<!-- contract-table:end -->"
    table = readme.split(begin, 1)[1].split("-->", 1)[1].split(end, 1)[0].strip()
    assert table == markdown_table(), "README contract table is stale: regenerate from dispatch.contract.markdown_table()"
