"""unipelt_fast._autotune: the shared config chooser the launchers call."""

import pytest

from unipelt_fast import _autotune


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    _autotune.reset()
    monkeypatch.delenv("UNIPELT_AUTOTUNE", raising=False)
    yield
    _autotune.reset()


def test_times_once_per_key_and_keeps_the_fastest(monkeypatch):
    timed = []

    def fake_fastest(configs, launch):
        timed.append(tuple(configs))
        return 2

    monkeypatch.setattr(_autotune, "_fastest", fake_fastest)
    launched = []
    cfgs = ["a", "b", "c"]
    assert _autotune.choose("k", (1,), cfgs, launched.append) == "c"
    assert _autotune.choose("k", (1,), cfgs, launched.append) == "c"
    assert timed == [("a", "b", "c")]  # the second call is a lookup
    assert _autotune.choose("k", (2,), cfgs, launched.append) == "c"
    assert len(timed) == 2  # a new key is timed again
    assert _autotune.chosen() == {"k(1,)": "'c'", "k(2,)": "'c'"}


def test_pinned_and_single_config_never_time(monkeypatch):
    monkeypatch.setattr(_autotune, "_fastest", lambda c, launch: pytest.fail("timed"))
    assert _autotune.choose("k", 0, ["only"], lambda c: None) == "only"
    monkeypatch.setenv("UNIPELT_AUTOTUNE", "0")
    assert _autotune.choose("k", 0, ["a", "b"], lambda c: None) == "a"


def test_record_all_launches_every_other_candidate(monkeypatch):
    monkeypatch.setattr(_autotune, "RECORD_ALL", True)
    launched = []
    assert _autotune.choose("k", 0, ["a", "b", "c"], launched.append) == "a"
    assert launched == ["b", "c"]  # the launcher itself then launches "a"


def test_no_configs_is_an_error():
    with pytest.raises(ValueError, match="no candidate configs"):
        _autotune.choose("k", 0, [], lambda c: None)


def test_spilling_candidates_are_never_kept(monkeypatch):
    """A candidate whose compiled kernel spills (ptxas's n_spills, on what ``launch``
    returns) is dropped however fast it times; if every one spills, the default is kept."""
    import triton.testing

    class Kernel:
        def __init__(self, n_spills):
            self.n_spills = n_spills

    ms = {"a": 3.0, "b": 1.0, "c": 2.0}  # b is fastest but spills
    spill = {"a": 0, "b": 128, "c": 0}
    current = []

    def launch(c):
        current[:] = [c]
        return Kernel(spill[c])

    monkeypatch.setattr(triton.testing, "do_bench", lambda f, **kw: (f(), ms[current[0]])[1])
    assert _autotune.choose("k", 0, ["a", "b", "c"], launch) == "c"
    spill.update(a=8, c=8)
    assert _autotune.choose("k", 1, ["a", "b", "c"], launch) == "a"
    assert _autotune.spills([Kernel(0), Kernel(4)]) and not _autotune.spills(None)
