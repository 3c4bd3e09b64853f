"""Every service we ship keeps the sandbox README records for it: on the test host, with the package installed
(and the generator's drop-ins in place), `systemd-analyze security` rates no unit worse than its row in
README's "Hardened units" table, and every unit has a row."""

import pytest
from exposure import analyzed_name, exposure, recorded

pytestmark = pytest.mark.testhost


def test_no_unit_is_more_exposed_than_readme_records(installed_host, repo_root):
    table = recorded(repo_root / "README.md")
    shipped = sorted(p.name for p in (repo_root / "units").glob("*.service"))
    assert sorted(table) == shipped, "README's table and units/ list different services"
    measured = {}
    for unit in shipped:
        name = analyzed_name(unit)
        r = installed_host.run(["systemd-analyze", "security", "--no-pager", name])
        measured[unit] = exposure(r.stdout, name)
    worse = {u: (measured[u], table[u]) for u in shipped if measured[u] > table[u]}
    report = "\n".join(f"{u}: {measured[u]} (README: {table[u]})" for u in shipped)
    assert worse == {}, f"more exposed than recorded (measured, recorded): {worse}\n{report}"
