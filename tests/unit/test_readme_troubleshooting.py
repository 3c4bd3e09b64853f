"""README's troubleshooting section keeps up with the reasons: every failure reason has a row, with its exit
code and a message as the product prints it (`<reason>: <message>`)."""

import re
from pathlib import Path

from unbounded_agent.reasons import Reason

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(\w+)` \((\d+)\) \| `([^`]+)`", re.M)


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def test_every_failure_reason_has_a_row_with_its_exit_code_and_a_real_message():
    rows = {name: (int(code), message) for name, code, message in ROW.findall(section("Troubleshooting"))}
    assert sorted(rows) == sorted(r.value for r in Reason if r is not Reason.SUCCEEDED)
    for name, (code, message) in rows.items():
        assert code == Reason(name).exit_code, name
        assert message.startswith(f"{name}: "), name
