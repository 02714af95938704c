"""How pytest-xdist hands the suite's tests to its workers (tests/conftest.py's hook).

A scope is a module, or a whole directory whose conftest builds session fixtures (trained
runs, tokenizers): `LoadScopeScheduling` sends each scope whole to one worker, so every module
and session fixture is built once. The scope is computed from the node id's path, so it does
not depend on how a node id is tagged: round 8's `--dist loadgroup` with `xdist_group` marks
never grouped anything here, because xdist 3.8 tags a node id by assigning `item._nodeid`,
which pytest 9.2 no longer reads (each module's fixtures were built on both workers).
"""

from pathlib import Path

SESSION_FIXTURE_DIRS = ("data", "eval", "synth")


def scope(nodeid: str) -> str:
    """`tests/data/test_x.py::test_y[a]` -> `data`; `tests/train/test_z.py::t` -> `train/test_z.py`."""
    parts = Path(nodeid.split("::", 1)[0]).parts
    parts = parts[parts.index("tests") + 1 :] if "tests" in parts else parts
    return parts[0] if parts[0] in SESSION_FIXTURE_DIRS else "/".join(parts)


def make_scheduler(config, log):
    """The scheduler for `--dist loadscope`; None (xdist's own) for any other `--dist`."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrFixtureDirectory(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope(nodeid)

    return ModuleOrFixtureDirectory(config, log)
