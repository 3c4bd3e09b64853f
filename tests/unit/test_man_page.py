"""unbounded-agent(8) is the CLI's own help: the checked-in page is what packaging/manpage.py makes from
the parser and the template (`make man` after changing either), it names every command, option and
exit code, keeps the template's prose, and formats without warnings."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from unbounded_agent import cli
from unbounded_agent.reasons import Reason

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "packaging" / "man" / "unbounded-agent.8"


def load_generator():
    spec = importlib.util.spec_from_file_location("manpage", REPO / "packaging" / "manpage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subcommands():
    sub = next(a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def test_the_checked_in_page_is_what_the_cli_says_now():
    assert PAGE.read_text() == load_generator().render(), "packaging/man/unbounded-agent.8 is out of date: run `make man`"


def test_every_command_and_option_and_its_help_is_on_the_page():
    page = PAGE.read_text()
    assert len(subcommands()) == 6
    for name, parser in subcommands().items():
        assert f"\n.B unbounded-agent {name}\n" in page  # the synopsis
        assert f"\n.TP\n.B {name}" in page  # the command's entry
        if parser.description:
            assert parser.description in page
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option.replace("-", "\\-") in page, f"{name} {option}"
            if action.help and "%" not in action.help and action.option_strings != ["-h", "--help"]:
                assert action.help in page, f"{name}: {action.help}"


def test_the_exit_codes_of_every_reason_are_on_the_page():
    page = PAGE.read_text()
    section = page[page.index(".SH EXIT STATUS"):]
    for reason in Reason:
        if reason is not Reason.SUCCEEDED:
            assert f".TP\n.B {reason.exit_code}\n{reason.value}\n" in section


def test_the_templates_prose_is_kept():
    page = PAGE.read_text()
    for heading in (".SH DESCRIPTION", ".SH THE OPERATION QUEUE", ".SH FILES", ".SH EXIT STATUS"):
        assert heading in page
    assert "/var/lib/unbounded-agent-ops/" in page and "/run/unbounded-agent-install.lock" in page
    assert "@" not in page.replace("unbounded-upgrade@", "")  # every placeholder was filled


def test_a_changed_help_text_makes_the_page_out_of_date(monkeypatch):
    generator = load_generator()
    original = cli.build_parser

    def changed():
        p = original()
        p._actions[-1].choices["status"]._actions[-1].help = "a different help text"
        return p

    monkeypatch.setattr(generator.cli, "build_parser", changed)
    assert generator.render() != PAGE.read_text()


def test_the_page_formats_without_warnings():
    if shutil.which("groff") is None:
        if os.environ.get("CI"):
            pytest.fail("groff is missing (Debian's groff-base)")
        pytest.skip("groff is missing (Debian's groff-base)")
    r = subprocess.run(["groff", "-man", "-ww", "-z", str(PAGE)], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (0, "")
