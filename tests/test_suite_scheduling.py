"""The suite's xdist scheduling (tests/suite_scheduling.py): one scope per module, one per directory
whose conftest builds session fixtures, so no module or session fixture is built twice."""

import suite_scheduling


def test_each_module_and_each_session_fixture_directory_is_one_scope():
    scope = suite_scheduling.scope
    assert scope("tests/data/test_pipeline.py::test_a[x-1]") == "data"
    assert scope("tests/data/test_fuzz.py::test_b") == "data"
    assert scope("tests/synth/test_synth.py::test_c") == "synth"
    assert scope("tests/train/test_step.py::test_d[fsdp]") == "train/test_step.py"
    assert scope("tests/train/test_step.py::test_e") == "train/test_step.py"
    assert scope("tests/test_config.py::test_f") == "test_config.py"
    assert scope("tests/infer/test_chat_hf.py::test_g[a::b]") == "infer/test_chat_hf.py"


def test_another_dist_mode_keeps_xdists_scheduler():
    class Config:
        def getvalue(self, name):
            return {"dist": "load"}[name]

    assert suite_scheduling.make_scheduler(Config(), log=None) is None
