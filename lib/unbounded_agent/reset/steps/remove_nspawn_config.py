"""``unbounded-agent-reset-remove-nspawn-config.service``, reset step 4: remove
/etc/systemd/nspawn/kube{1,2}.nspawn and the systemd-nspawn@kube{1,2}.service.d overrides."""

from __future__ import annotations

from ..step import MACHINES, UNIT_DIR, Step, plan_paths, remove_path

NSPAWN_DIR = "/etc/systemd/nspawn"


def nspawn_config_paths() -> list[str]:
    out = []
    for m in MACHINES:
        out += [f"{NSPAWN_DIR}/{m}.nspawn", f"{UNIT_DIR}/systemd-nspawn@{m}.service.d"]
    return out


class RemoveNspawnConfig(Step):
    name, number, phase = "remove-nspawn-config", 4, 1
    title = "remove the machines' .nspawn files and unit overrides"

    def plan(self, ctx):
        return plan_paths(ctx, nspawn_config_paths())

    def apply(self, ctx, rec):
        for p in nspawn_config_paths():
            remove_path(ctx, rec, p)


STEP = RemoveNspawnConfig()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
